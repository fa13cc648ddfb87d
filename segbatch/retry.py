"""Retries for storage calls: bounded attempts, exponential backoff with full jitter, transient faults only.

This is the outermost of three layers, and the only one segbatch counts:

1. **botocore** (inside s3fs) retries each HTTP request: `mode="standard"`, `max_attempts=3` (set in
   :func:`segbatch.storage.filesystem`). It knows status codes and throttling codes, backs off with
   jitter and has a retry quota that stops retry storms when a whole endpoint is down. (Under it,
   aiohttp/aiobotocore also re-send a request whose connection was reset, a few times.)
2. **s3fs** (2026.9) retries each call 5 times (a class attribute, not an option) on botocore's
   `HTTPClientError` (connection closed mid-answer, read timeouts), truncated bodies and `SlowDown`,
   but not on `EndpointConnectionError` (what a reset before the answer becomes), nor on a 503
   whose message does not say "SlowDown"/"reduce your request rate", nor on 500/502/504.
3. **this module**, around each whole storage operation (one object read, one mask write, one
   listing, one Parquet part): :data:`DEFAULT_POLICY` makes 4 attempts, waiting
   `uniform(0, min(max_delay, base_delay * 2**n))` seconds before retry `n` (0-based), so about
   0.1 / 0.2 / 0.4 s on average. It covers what the lower layers leave (the cases above), and other
   filesystems (gcsfs, local NFS) the same way.

The layers multiply, so each is kept short. Measured against a proxy failing every request: a
persistent reset costs 8 requests per attempt of this layer (32 in all, a few seconds); a persistent `SlowDown`
on a PUT or a listing 3 x 5 = 15 requests and about 20 s per attempt (60 requests, about 80 s before
the item becomes an error row, fewer requests once botocore's retry quota is spent). The previous
setting (botocore adaptive mode, 8 attempts) with 6 attempts here would have been up to
8 x 5 x 6 = 240 requests per operation.

What is transient (:func:`is_transient`): HTTP 500/502/503/504 and the S3 codes `SlowDown`,
`Throttling`, `RequestTimeout`, `InternalError`, `ServiceUnavailable` (a botocore `ClientError`, or the
`OSError` s3fs translates it to, whose `__cause__` is that `ClientError`); connection resets, aborts and
refusals; timeouts; aiohttp and botocore connection errors. Never: a missing object, a real 403
(`PermissionError`), TLS certificate errors, or anything else (decode errors are data, not faults).

Example:
    >>> calls = []
    >>> def flaky() -> str:
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise ConnectionResetError("reset by peer")
    ...     return "ok"
    >>> counter = Retries()
    >>> call_with_retries(flaky, counter=counter, policy=RetryPolicy(base_delay=0.0))
    'ok'
    >>> counter.count
    2
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["DEFAULT_POLICY", "Retries", "RetryPolicy", "call_with_retries", "exception_chain", "is_transient"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses worth another try (server error, bad gateway, unavailable / SlowDown, gateway timeout).
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})

#: S3 error codes worth another try.
TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
)

#: The errnos s3fs gives the OSError it makes from a 5xx / SlowDown / InternalError `ClientError`; used
#: only when the `ClientError` itself is no longer in the chain (409 also maps to EBUSY, hence the order).
_S3FS_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)})

#: Never retried, whatever their cause: the answer will not change.
_PERMANENT: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


@dataclass(slots=True, frozen=True)
class RetryPolicy:
    """How often and how long to retry.

    Attributes:
        attempts: Tries in all, the first included (so `attempts - 1` retries at most).
        base_delay: Seconds; the backoff before retry `n` (0-based) is drawn from
            `uniform(0, min(max_delay, base_delay * 2**n))` ("full jitter").
        max_delay: Seconds; the cap on any one backoff.
    """

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"The parameter 'attempts' expected a value >= 1, but got {self.attempts} instead.")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(
                f"The parameters 'base_delay' and 'max_delay' expected values >= 0, "
                f"but got {self.base_delay} and {self.max_delay} instead."
            )

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based): full jitter, capped."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2.0**retry))


DEFAULT_POLICY = RetryPolicy()


@dataclass(slots=True)
class Retries:
    """A counter of retries made through :func:`call_with_retries` (e.g. one per work item)."""

    count: int = 0


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its causes and contexts (each once)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _client_error_transient(exc: BaseException) -> bool | None:
    """For a botocore `ClientError`: is its code or HTTP status transient? None for other exceptions."""
    response = getattr(exc, "response", None)
    if type(exc).__name__ != "ClientError" or not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in TRANSIENT_CODES or status in TRANSIENT_STATUSES or code in {str(s) for s in TRANSIENT_STATUSES}


def _library_transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    try:
        from botocore import exceptions as be

        types += [be.ConnectionError, be.HTTPClientError, be.IncompleteReadError]
    except ImportError:  # pragma: no cover - s3fs (a dependency) brings botocore
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,  # resets, aborts, refusals, broken pipes
    TimeoutError,  # also asyncio.TimeoutError, socket.timeout and fsspec's FSTimeoutError
    *_library_transient_types(),
)


def _not_retryable_type(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in (
        "SSLError",  # botocore's is a ConnectionError: a bad certificate does not heal
        "ClientSSLError",
        "ClientConnectorCertificateError",
        "NoCredentialsError",
        "PartialCredentialsError",
    )


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is a fault that another try may not meet (see the module docstring).

    Example:
        >>> is_transient(ConnectionResetError()), is_transient(FileNotFoundError("s3://b/k"))
        (True, False)
    """
    if isinstance(exc, _PERMANENT):
        return False
    errnos = []
    for e in exception_chain(exc):
        verdict = _client_error_transient(e)
        if verdict is not None:
            return verdict
        if _not_retryable_type(e):
            return False
        if isinstance(e, _TRANSIENT_TYPES):
            return True
        status = getattr(e, "status", None)  # aiohttp.ClientResponseError (http(s) filesystems)
        if type(e).__name__ == "ClientResponseError" and status in TRANSIENT_STATUSES | {429}:
            return True
        if type(e) is OSError:
            errnos.append(e.errno)
    return bool(errnos) and errnos[0] in _S3FS_TRANSIENT_ERRNOS


def call_with_retries(
    fn: Callable[[], T],
    *,
    counter: Retries | None = None,
    policy: RetryPolicy = DEFAULT_POLICY,
    what: str = "storage call",
) -> T:
    """Call `fn()`; on a transient fault wait (backoff) and call again, at most `policy.attempts` times.

    Args:
        fn: The storage operation, taking no arguments (use a lambda or `functools.partial`).
        counter: Incremented once per retry, also when the call finally fails.
        policy: Attempts and backoff.
        what: Names the operation (a URI, say) in the log line each retry writes.

    Returns:
        What `fn` returned.

    Raises:
        BaseException: the first permanent error at once, or the last transient one once the attempts
            are spent; unchanged, so callers classify it as before.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as e:
            if attempt + 1 >= policy.attempts or not is_transient(e):
                raise
            wait = policy.backoff(attempt)
            logger.info(
                "retrying %s after %s (attempt %d of %d failed; waiting %.2f s)",
                what,
                type(e).__name__,
                attempt + 1,
                policy.attempts,
                wait,
            )
            if counter is not None:
                counter.count += 1
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
