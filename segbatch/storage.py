"""Storage in one place: fsspec filesystems from URIs, listing, atomic writes, safe output keys.

Every read and write in segbatch goes through :func:`filesystem`, so `s3://` (s3fs, honouring the
standard `AWS_*` variables including `AWS_ENDPOINT_URL`), `gs://` and local paths behave alike.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import fsspec
from fsspec.core import url_to_fs

from segbatch.retry import Retries, call_with_retries

__all__ = [
    "ListedObject",
    "UnsafeKeyError",
    "filesystem",
    "is_manifest",
    "join_uri",
    "list_objects",
    "protocol_of",
    "safe_relative_key",
    "write_bytes_atomic",
    "read_bytes",
]


class UnsafeKeyError(ValueError):
    """An input key that would place an output outside the output prefix."""


@dataclass(slots=True, frozen=True)
class ListedObject:
    """One object found by listing: its full URI, size in bytes and version tag."""

    uri: str
    size: int
    version: str


def protocol_of(uri: str) -> str:
    """`s3`, `gs`, `file`, ... for a URI or plain path."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


#: File endings of an input manifest (a list of image URIs) rather than a prefix or glob.
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")


def is_manifest(uri: str) -> bool:
    """Whether `input.uri` names a manifest file (planning reads it; preflight checks it exists)."""
    return uri.lower().endswith(MANIFEST_SUFFIXES) and not any(ch in uri for ch in "*?[")


def _s3_env_options() -> dict[str, Any]:
    """s3fs options from the standard AWS variables that botocore alone does not apply everywhere."""
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a URI to an fsspec filesystem and the path inside it.

    The filesystem is what Ray and every stage use; `storage_options` win over environment defaults.
    """
    options = dict(storage_options or {})
    if protocol_of(uri) in ("s3", "s3a"):
        options = {**_s3_env_options(), **options}
        # botocore retries each request (3 attempts, jittered backoff, a retry quota); s3fs and
        # segbatch.retry add theirs around it, and the layers multiply: see segbatch/retry.py.
        options.setdefault("config_kwargs", {}).setdefault("retries", {"max_attempts": 3, "mode": "standard"})
    fs, path = url_to_fs(uri, **options)
    return fs, path


def join_uri(base: str, *parts: str) -> str:
    """Join URI components with '/' without collapsing the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URI for a filesystem path (adds the scheme back for remote filesystems)."""
    if isinstance(fs.protocol, str):
        protos = (fs.protocol,)
    else:
        protos = tuple(fs.protocol)
    if "file" in protos or "local" in protos:
        return path
    return f"{protos[0]}://{path}"


def _version(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"{info.get('size', 0)}-{mtime}"


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    _, dot, ext = posixpath.basename(path).rpartition(".")
    return bool(dot) and ext.lower() in extensions


def list_objects(
    uri: str,
    storage_options: dict[str, Any] | None,
    extensions: tuple[str, ...],
    *,
    retries: Retries | None = None,
) -> tuple[list[ListedObject], str]:
    """List image objects under a prefix or glob, in one paginated pass.

    `fs.find` on object stores is a single paginated ListObjectsV2 walk (1,000 keys a request), so
    100k keys cost about 100 requests, not 100k. Each page is retried by the storage client; a
    transient fault that still ends the walk restarts it (:func:`segbatch.retry.call_with_retries`).

    Args:
        uri: A prefix (trailing '/'), a single object or a glob.
        storage_options: fsspec options for the filesystem.
        extensions: Lower-case extensions (no dot) of the objects to keep.
        retries: Counts the retries made, when given.

    Returns:
        The objects (sorted by URI) and the base URI their relative keys are taken from.
    """
    fs, path = filesystem(uri, storage_options)

    def walk() -> tuple[dict[str, dict[str, Any]], str]:
        if any(ch in path for ch in "*?["):
            base = path.split("*")[0].split("?")[0].split("[")[0]
            base = base.rsplit("/", 1)[0] if "/" in base else ""
            return fs.glob(path, detail=True), base
        if not uri.endswith("/") and fs.isfile(path):  # a trailing '/' means a prefix: no HEAD request
            return {path: fs.info(path)}, posixpath.dirname(path)
        found = fs.find(path, detail=True, withdirs=False)
        if not found and not fs.exists(path):
            raise FileNotFoundError(f"no such folder or prefix: {uri}")
        return found, path.rstrip("/")

    found, base = call_with_retries(walk, counter=retries, what=f"listing {uri}")
    objects = [
        ListedObject(uri=unstrip(fs, p), size=int(info.get("size") or 0), version=_version(info))
        for p, info in found.items()
        if info.get("type", "file") != "directory" and _has_extension(p, extensions)
    ]
    objects.sort(key=lambda o: o.uri)
    return objects, unstrip(fs, base)


def safe_relative_key(uri: str, base: str) -> str:
    """The key of `uri` relative to `base`, safe to append to an output prefix.

    Rejects `..` components (also percent-encoded), absolute paths, backslashes and control characters,
    so no input key can place a write outside the output prefix.

    Raises:
        UnsafeKeyError: naming the key and the problem.
    """
    base = base.rstrip("/")
    rel = uri[len(base) + 1 :] if base and uri.startswith(base + "/") else uri.split("://", 1)[-1]
    decoded = unquote(unquote(rel))
    if "\\" in decoded or any(ord(c) < 32 for c in decoded):
        raise UnsafeKeyError(f"unsafe key '{rel}': contains a backslash or control character")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    decoded_parts = decoded.split("/")
    if ".." in decoded_parts or any(unquote(unquote(p)).startswith("/") for p in parts):
        raise UnsafeKeyError(f"unsafe key '{rel}': a path component climbs out of the prefix")
    if not parts:
        raise UnsafeKeyError(f"unsafe key '{rel}': empty after normalisation")
    return "/".join(parts)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole object so readers see the old or the new content, never a part.

    Object stores make a single PUT atomic; on local disks we write a temporary sibling and rename it.
    """
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        directory = posixpath.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = posixpath.join(directory, f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None, *, retries: Retries | None = None) -> bytes:
    """Read one whole object, retrying transient faults (:func:`segbatch.retry.call_with_retries`).

    Args:
        uri: The object.
        storage_options: fsspec options for the filesystem.
        retries: Counts the retries made, when given.
    """
    fs, path = filesystem(uri, storage_options)
    return bytes(call_with_retries(lambda: fs.cat_file(path), counter=retries, what=f"reading {uri}"))
