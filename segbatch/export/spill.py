"""An external sort of fixed-size numpy records through local files: memory bounded by a constant.

Pass 1 of an export (:func:`segbatch.export.items.select`) sorts one small record per committed row
three times (by URI hash, by review order, by row number). Held in memory that is tens of bytes a row,
so an output of 100M rows would need gigabytes; :class:`ExternalSort` holds at most `max_records`
records (plus the sort's own copies) whatever the number of rows.

How: records are kept in memory until there are more than `max_records`; from then on they are
partitioned by the top bits of their key (a uint64 field) into :data:`FANOUT` bucket files, `max_records`
at a time. Buckets are read back in key order; one that is still too large is partitioned again on
the next bits of its own key range (an MSD radix sort), so skewed keys (review priorities that
crowd together) cost another pass over that bucket, not memory. Each bucket that fits is sorted in
memory by all of `order` and yielded whole, so records with the same key always come out in one array.
A single key value repeated more than `max_records` times is the one case that is loaded whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["FANOUT", "MAX_RECORDS", "ExternalSort"]

#: Records held in memory before spilling, and the most a bucket may hold to be sorted in memory.
MAX_RECORDS = 1 << 17
#: Bucket files per partition (the top 7 bits of the key range that is left).
FANOUT = 128
_BITS = FANOUT.bit_length() - 1
_U64_MAX = (1 << 64) - 1


class _Partition:
    """Records spread over FANOUT files by `(key - lo) >> shift`, with each file's count and key range."""

    def __init__(self, folder: str, dtype: np.dtype, key: str, lo: int, hi: int, max_records: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        self.dtype = dtype
        self.key = key
        self.lo = lo
        self.shift = max(0, (hi - lo).bit_length() - _BITS)
        self.max_records = max_records
        self.counts = np.zeros(FANOUT, np.int64)
        self.mins = np.full(FANOUT, _U64_MAX, np.uint64)
        self.maxs = np.zeros(FANOUT, np.uint64)
        self.pending: list[np.ndarray] = []
        self.pending_count = 0

    def path(self, bucket: int) -> str:
        return os.path.join(self.folder, f"{bucket:03d}.bin")

    def write(self, records: np.ndarray) -> None:
        self.pending.append(records)
        self.pending_count += len(records)
        if self.pending_count >= self.max_records:
            self.flush()

    def flush(self) -> None:
        """Append the pending records to their bucket files (one open per bucket touched)."""
        if not self.pending:
            return
        records = np.concatenate(self.pending)
        self.pending, self.pending_count = [], 0
        keys = records[self.key]
        bucket = ((keys - np.uint64(self.lo)) >> np.uint64(self.shift)).astype(np.intp)
        order = np.argsort(bucket, kind="stable")
        records, keys = records[order], keys[order]
        counts = np.bincount(bucket, minlength=FANOUT)
        ends = np.cumsum(counts)
        del bucket, order
        for b in np.flatnonzero(counts).tolist():
            start, end = int(ends[b] - counts[b]), int(ends[b])
            with open(self.path(b), "ab") as f:
                f.write(records[start:end].data)
            self.counts[b] += end - start
            self.mins[b] = min(self.mins[b], keys[start:end].min())
            self.maxs[b] = max(self.maxs[b], keys[start:end].max())


class ExternalSort:
    """Records of one structured dtype, added in any chunks, given back in ascending `order`.

    Args:
        dtype: the records' structured dtype.
        order: the fields to sort by, most significant first; `order[0]` is the key (uint64) that
            partitions, and records with equal keys always come back in the same array.
        workdir: a local folder for the bucket files (made, and removed again by :meth:`close`).
        max_records: records held in memory, and the largest bucket sorted in memory.
        key_range: (lowest, highest) key when known, so the first partition spends no pass finding it
            (row numbers: `(0, rows - 1)`).
    """

    def __init__(self, dtype: np.dtype, order: Sequence[str], workdir: str, *, max_records: int = MAX_RECORDS,
                 key_range: tuple[int, int] = (0, _U64_MAX)) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype.fields is None or self.dtype.fields[order[0]][0] != np.dtype(np.uint64):
            raise ValueError(f"expected a uint64 key field '{order[0]}', but the dtype is {self.dtype}")
        self.order = tuple(order)
        self.workdir = workdir
        self.max_records = max(1, max_records)
        self.key_range = key_range
        self.count = 0
        self._held: list[np.ndarray] = []
        self._held_count = 0
        self._spill: _Partition | None = None
        self._folders = 0

    def add(self, records: np.ndarray) -> None:
        """Take records (a structured array of `dtype`)."""
        if len(records) == 0:
            return
        self.count += len(records)
        if self._spill is not None:
            self._spill.write(records)
            return
        self._held.append(records)
        self._held_count += len(records)
        if self._held_count > self.max_records:
            self._spill = self._partition(*self.key_range)
            for held in self._held:
                self._spill.write(held)
            self._held, self._held_count = [], 0

    def sorted(self) -> Iterator[np.ndarray]:
        """The records in order, as arrays of at most `max_records` (a repeated key excepted); once."""
        if self._spill is None:
            if self._held:
                records = np.concatenate(self._held)
                self._held, self._held_count = [], 0
                yield self._sort(records)
            return
        spill, self._spill = self._spill, None
        yield from self._drain(spill)

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ExternalSort":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _partition(self, lo: int, hi: int) -> _Partition:
        os.makedirs(self.workdir, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="p", dir=self.workdir)
        return _Partition(folder, self.dtype, self.order[0], lo, hi, self.max_records)

    def _sort(self, records: np.ndarray) -> np.ndarray:
        return records[np.lexsort(tuple(records[f] for f in reversed(self.order)))]

    def _drain(self, part: _Partition) -> Iterator[np.ndarray]:
        part.flush()
        size = self.dtype.itemsize
        for b in np.flatnonzero(part.counts).tolist():
            path = part.path(b)
            lo, hi = int(part.mins[b]), int(part.maxs[b])
            if part.counts[b] <= self.max_records or lo == hi:
                with open(path, "rb") as f:
                    records = np.frombuffer(f.read(), self.dtype)
                os.remove(path)
                yield self._sort(records)
                continue
            sub = self._partition(lo, hi)
            with open(path, "rb") as f:
                while chunk := f.read(self.max_records * size):
                    sub.write(np.frombuffer(chunk, self.dtype))
            os.remove(path)
            yield from self._drain(sub)
        shutil.rmtree(part.folder, ignore_errors=True)
