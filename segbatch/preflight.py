"""Storage checked before any work: the input lists, the output takes a write, the weights are there.

`check_storage(spec)` runs before the ledger read and before Ray starts (`segbatch run`, and
`segbatch validate --check-storage`). Every check uses its own filesystem instance with short
timeouts and one retry layer of its own (transient faults only), so a typo'd endpoint fails in
seconds instead of after the nested retries the job itself uses (segbatch/retry.py). Each problem is one :class:`JobError` line naming the
URI, what is wrong and the likely fix (endpoint, credentials, bucket name); :func:`describe_storage_error`
words any storage exception the same way, for failures later in a run.

Credentials and `storage_options` values never appear in a message: an endpoint set through
`storage_options` is named by where it is set, one from `AWS_ENDPOINT_URL` by its value (any user
info in it removed).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs

from segbatch.errors import JobError
from segbatch.retry import RetryPolicy, exception_chain, is_transient
from segbatch.spec import InputSpec, JobSpec, ModelSpec, OutputSpec
from segbatch.storage import _s3_env_options, is_manifest, protocol_of

__all__ = [
    "check_input",
    "check_output",
    "check_storage",
    "check_weights",
    "describe_output_read_error",
    "describe_storage_error",
    "is_storage_error",
]

logger = logging.getLogger(__name__)

#: Seconds to wait for a connection (and for an answer) in a check: storage that takes longer is
#: reported rather than retried.
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 10.0
#: Transient faults (503 SlowDown, a reset connection) are retried this way, here alone rather than in
#: three nested layers; a connection that cannot be made at all (refused, unknown host, connect timeout)
#: is reported at once.
POLICY = RetryPolicy(attempts=4, base_delay=0.2, max_delay=1.0)

_S3 = ("s3", "s3a")
_DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "ExpiredToken",
    "Forbidden",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
    "403",
}
_CREDENTIAL_HINT = (
    "check credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role) "
    "and the bucket's permissions"
)


def check_storage(spec: JobSpec) -> None:
    """Check, before any work, that the input lists, the output can be written and the weights exist.

    Raises:
        JobError: one line naming the key, the URI, the problem and the likely fix.
    """
    check_input(spec.input)
    check_output(spec.output)
    for k, (name, job) in enumerate(spec.layer_jobs()):
        assert job.model is not None
        check_weights(job.model, f"layers.{k}.weights" if name else "model.weights")


def check_input(spec: InputSpec) -> None:
    """The input prefix, glob folder or manifest exists and answers a listing (one page at most)."""
    uri = spec.uri
    try:
        fs, path = _fast_filesystem(uri, spec.storage_options)
        if is_manifest(uri):
            info = _retrying(lambda: fs.info(path))
            if info.get("type") == "directory":
                raise JobError(f"input.uri '{uri}': is a folder, but its name ends like a manifest file")
            return
        if any(ch in path for ch in "*?["):  # a glob: its folder must exist
            base = path.split("*")[0].split("?")[0].split("[")[0]
            path = base.rsplit("/", 1)[0] if "/" in base else base
        if protocol_of(uri) in _S3:
            _retrying(lambda: _s3_first_page(fs, path, uri))
        else:
            _retrying(lambda: fs.info(path))
    except JobError:
        raise
    except Exception as e:  # noqa: BLE001 - every storage failure becomes one line
        raise JobError(describe_storage_error(e, "input.uri", uri, spec.storage_options)) from None


def check_output(spec: OutputSpec) -> None:
    """A small probe object can be written under the output prefix (and is deleted again)."""
    uri = spec.uri
    try:
        fs, root = _fast_filesystem(uri, spec.storage_options)
        probe = f"{root.rstrip('/')}/.segbatch-probe-{uuid.uuid4().hex[:12]}"
        if _is_local(fs):
            os.makedirs(root, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"segbatch write check\n")
        else:
            _retrying(lambda: fs.pipe_file(probe, b"segbatch write check\n"))
    except Exception as e:  # noqa: BLE001
        raise JobError(describe_storage_error(e, "output.uri", uri, spec.storage_options, writing=True)) from None
    try:
        _retrying(lambda: fs.rm_file(probe))
    except Exception as e:  # noqa: BLE001 - the job only needs writes; say what was left behind
        logger.warning(
            "output.uri '%s': could not delete the write-check object %s (%s); it is safe to delete",
            uri,
            probe,
            type(e).__name__,
        )


def check_weights(spec: ModelSpec, key: str = "model.weights") -> None:
    """A checkpoint given as a path or URI exists (reading and verifying it is `resolve_weights`' job);
    `key` is where the job names it (`layers.1.weights` for a layer)."""
    weights = spec.weights
    if weights in ("none", "torchvision") or weights.startswith("builtin:"):
        return
    try:
        fs, path = _fast_filesystem(weights, spec.storage_options)
        info = _retrying(lambda: fs.info(path))
        if info.get("type") == "directory":
            raise JobError(f"{key}: checkpoint '{weights}' is a folder, not a checkpoint file")
    except JobError:
        raise
    except FileNotFoundError as e:
        if protocol_of(weights) in _S3 and _bucket_missing(e):
            raise JobError(describe_storage_error(e, key, weights, spec.storage_options)) from None
        raise JobError(f"{key}: checkpoint '{weights}' not found") from None
    except Exception as e:  # noqa: BLE001
        raise JobError(describe_storage_error(e, key, weights, spec.storage_options)) from None


def describe_storage_error(
    error: BaseException,
    key: str,
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    writing: bool = False,
) -> str:
    """One line for a storage exception: `key 'uri': problem: likely fix`.

    Looks through the exception's causes (s3fs turns botocore's errors into OSErrors and keeps the
    original as the cause), so the same wording comes out whichever layer raised.
    """
    return _describe(error, key, uri, storage_options, writing=writing, where=f"{key} '{uri}'")


def describe_output_read_error(error: BaseException, uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """One line for an output folder that cannot be read, the same from every command that reads one
    (`plan` reading the ledger, `export`, `report`): `cannot read the outputs under 'uri': problem: fix`."""
    return _describe(error, "output.uri", uri, storage_options, writing=False, where=f"cannot read the outputs under '{uri}'")


def _describe(
    error: BaseException, key: str, uri: str, storage_options: dict[str, Any] | None, *, writing: bool, where: str
) -> str:
    options = storage_options or {}
    chain = list(exception_chain(error))
    codes = {c for c in (_error_code(e) for e in chain) if c}
    text = " ".join(str(e) for e in chain).lower()
    remote = protocol_of(uri) not in ("file", "local")
    endpoint = _endpoint(uri, key, options)

    s3 = protocol_of(uri) in _S3
    endpoint_hint = "check AWS_ENDPOINT_URL / endpoint_url" if s3 else "check the network and storage_options"
    if remote and _connection_failed(chain, text):
        return (
            f"{where}: cannot connect to the storage endpoint {endpoint}: {endpoint_hint} "
            "(host, port, http/https) and that the service is reachable"
        )
    if remote and _timed_out(chain):
        return f"{where}: the storage endpoint {endpoint} did not answer in time: {endpoint_hint}"
    if remote and ("NoSuchBucket" in codes or "bucket does not exist" in text):
        return (
            f"{where}: bucket '{_bucket(uri)}' does not exist at {endpoint}: check the bucket name "
            "(and the endpoint, if the bucket is elsewhere)"
        )
    if s3 and _no_credentials(chain):
        return (
            f"{where}: no credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, an "
            "instance role), or storage_options anon: true for a public bucket"
        )
    if remote and (codes & _DENIED_CODES or any(isinstance(e, PermissionError) for e in chain)):
        code = sorted(codes & _DENIED_CODES)[0] if codes & _DENIED_CODES else "access denied"
        action = "writing" if writing else "reading"
        hint = _CREDENTIAL_HINT if s3 else "check the credentials this filesystem uses and the bucket's permissions"
        return f"{where}: {code} while {action} at {endpoint}: {hint}"
    if any(isinstance(e, PermissionError) for e in chain):
        what = "create or write in" if writing else "read"
        return f"{where}: permission denied: cannot {what} this path; check its owner and permissions"
    if any(isinstance(e, (NotADirectoryError, FileExistsError)) for e in chain):
        return f"{where}: a part of this path is a file, not a folder; check the path"
    if any(isinstance(e, IsADirectoryError) for e in chain):
        return f"{where}: is a folder; expected a file"
    if any(isinstance(e, FileNotFoundError) for e in chain) or "NoSuchKey" in codes:
        if key == "model.weights":
            return f"model.weights: checkpoint '{uri}' not found"
        if writing and not remote:
            return f"{where}: cannot create this folder (a parent folder is missing or not writable); check the path"
        return f"{where}: not found (no such folder, prefix or file); check the path"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    detail = f": {_redact(first, options)}" if first else ""
    return f"{where}: {type(error).__name__}{detail}"


def is_storage_error(error: BaseException) -> bool:
    """An OSError or a storage client's exception, not one Ray wrapped from a task (those keep their traceback)."""
    if type(error).__module__.split(".")[0] == "ray":
        return False
    if isinstance(error, OSError):
        return True
    return any(type(e).__module__.split(".")[0] in _STORAGE_MODULES for e in exception_chain(error))


_STORAGE_MODULES = {"botocore", "aiobotocore", "s3fs", "aiohttp", "fsspec", "gcsfs", "google", "adlfs", "azure"}


# --- helpers -------------------------------------------------------------------------------------


def _fast_filesystem(uri: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """As `segbatch.storage.filesystem`, but a fresh instance that tries once with short timeouts."""
    options = dict(storage_options or {})
    if protocol_of(uri) in _S3:
        options = {**_s3_env_options(), **options}
        config = dict(options.get("config_kwargs") or {})
        config.update(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": 1, "mode": "standard"},
        )
        options["config_kwargs"] = config
    options["skip_instance_cache"] = True
    fs, path = url_to_fs(uri, **options)
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs' own retry loop around botocore's (class attribute, default 5)
    return fs, path


T = TypeVar("T")


def _retrying(fn: Callable[[], T]) -> T:
    """`fn()`, again after a transient fault (:data:`POLICY`), but never when no connection could be made."""
    for attempt in range(POLICY.attempts):
        try:
            return fn()
        except Exception as e:
            chain = list(exception_chain(e))
            text = " ".join(str(x) for x in chain).lower()
            if attempt + 1 >= POLICY.attempts or not is_transient(e) or _connection_failed(chain, text):
                raise
            logger.info("storage check: retrying after %s (attempt %d of %d)", type(e).__name__, attempt + 1, POLICY.attempts)
            time.sleep(POLICY.backoff(attempt))
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _s3_first_page(fs: Any, path: str, uri: str) -> None:
    """One ListObjectsV2 request of at most one key: the bucket exists, answers, and the prefix has objects."""
    bucket, _, prefix = path.partition("/")
    response = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    if prefix and not response.get("KeyCount", len(response.get("Contents") or [])):
        raise FileNotFoundError(f"no objects under {uri}")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _error_code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or "") or None
    return None


def _connection_failed(chain: list[BaseException], text: str) -> bool:
    """No connection could be made (refused, unknown host, connect timeout), as opposed to one that was
    made and then dropped (aiobotocore reports both as EndpointConnectionError; the cause tells them apart)."""
    try:
        from aiohttp import ClientConnectorError
    except ImportError:  # pragma: no cover - s3fs brings aiohttp
        ClientConnectorError = ()  # type: ignore[assignment,misc]  # noqa: N806
    if any(isinstance(e, (ConnectionRefusedError, socket.gaierror, ClientConnectorError)) for e in chain):
        return True
    names = [type(e).__name__ for e in chain]
    if {"ConnectTimeoutError", "ProxyConnectionError"} & set(names):
        return True
    if "EndpointConnectionError" in names and names.index("EndpointConnectionError") == len(names) - 1:
        return True  # no underlying error that says the connection was made
    return "connection refused" in text


def _timed_out(chain: list[BaseException]) -> bool:
    names = {type(e).__name__ for e in chain}
    return bool(names & {"ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError", "FSTimeoutError"}) or any(
        isinstance(e, (TimeoutError, socket.timeout)) for e in chain
    )


def _no_credentials(chain: list[BaseException]) -> bool:
    return any(type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError") for e in chain)


def _bucket_missing(error: BaseException) -> bool:
    return any(
        _error_code(e) == "NoSuchBucket" or "bucket does not exist" in str(e).lower() for e in exception_chain(error)
    )


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def _endpoint(uri: str, key: str, options: dict[str, Any]) -> str:
    """The endpoint in words, without any value from storage_options (those are never shown)."""
    section = key.split(".", 1)[0]
    if options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url"):
        return f"(the endpoint_url in {section}.storage_options)"
    if protocol_of(uri) not in _S3:
        return f"of {protocol_of(uri)}://"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return f"{_without_userinfo(os.environ[var])} ({var})"
    return "(AWS S3's default; AWS_ENDPOINT_URL is not set)"


def _without_userinfo(url: str) -> str:
    try:
        parts = urlsplit(url)
        if parts.username or parts.password:
            host = parts.hostname or ""
            netloc = f"{host}:{parts.port}" if parts.port else host
            return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "(AWS_ENDPOINT_URL, unparsable)"
    return url


def _redact(text: str, options: dict[str, Any]) -> str:
    """Hide every storage_options value (and the environment's secret key) that appears in a message."""
    secrets = [str(v) for v in _values(options)]
    secrets += [os.environ.get(k, "") for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    secrets = [s for s in secrets if len(s) >= 4]
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    return text[:300]


def _values(options: Any) -> Iterator[Any]:
    if isinstance(options, dict):
        for v in options.values():
            yield from _values(v)
    elif isinstance(options, (list, tuple)):
        for v in options:
            yield from _values(v)
    elif isinstance(options, (str, int, float)) and not isinstance(options, bool):
        yield options
