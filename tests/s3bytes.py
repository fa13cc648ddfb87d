"""Bytes s3fs fetches from S3, counted where they arrive: one helper for the tests and the benchmarks
(`benchmarks/scene_throughput.py`, run with the repository root on PYTHONPATH)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def counting_s3_fetches() -> Iterator[list[int]]:
    """While inside: the length of every ranged GET an s3fs file makes in this process, in order.

    Patches `s3fs.core.S3File._fetch_range` (every read of an open s3fs file, whatever its cache type,
    goes through it) and restores it on exit.
    """
    import s3fs

    fetched: list[int] = []
    original = s3fs.core.S3File._fetch_range

    def counting(self: object, start: int, end: int) -> bytes:
        out = original(self, start, end)
        fetched.append(len(out))
        return out

    s3fs.core.S3File._fetch_range = counting  # type: ignore[method-assign]
    try:
        yield fetched
    finally:
        s3fs.core.S3File._fetch_range = original  # type: ignore[method-assign]
