"""Committed rows → export items: the latest ok row per image, its masks, in review order. Streamed.

Exports never re-run a model and never hold an output in memory. They read the committed metadata
(:mod:`segbatch.outputs`) in two passes over the same parts (listed once, so parts a running job
commits meanwhile are left for the next export):

1. :func:`select` reads `uri`, `status`, `committed_at`, `class_pixels` and `instances`, part by part,
   and keeps three numbers a row: a 64-bit hash of the URI, the commit time and the row's
   `review_priority` (:mod:`segbatch.export.priority`): 20 bytes a row, no strings (1M rows: 20 MB;
   sorting them needs about as much again, and the ranks kept for pass 2 take 4 bytes a row).
   From them it picks the latest row per URI (the rule of :func:`segbatch.outputs.latest_rows`: a
   rerun or `--force` commits an item again; the newest wins, ties to the row read later) and gives
   every kept ok row its rank in review order (priority descending, then commit order).
2. :func:`iter_items` reads whole parts again and yields the kept ok rows as :class:`Item`, with their
   masks when asked: instance rows carry COCO RLE; semantic rows' label-map PNGs (`mask_uri`) are read
   and split into one mask per class present. Error rows that won are counted (:class:`ErrorTally`),
   never yielded.

:func:`in_review_order` then sorts items by rank through temporary bucket files (an external sort):
memory holds one bucket of items, whatever the size of the output.

Boxes and areas always come from the masks (pycocotools `toBbox` / `area`), never from a row's
stored `bbox`, whose meaning differs between detectors and schema versions.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_util

from segbatch.errors import JobError
from segbatch.export.priority import TINY_AREA, review_priority
from segbatch.masks import decode_png_label_map
from segbatch.outputs import METADATA, file_metadata, hash64, iter_parts, metadata_parts, output_classes, output_task
from segbatch.storage import filesystem

__all__ = [
    "ErrorTally",
    "Item",
    "Obj",
    "Selection",
    "in_review_order",
    "iter_items",
    "select",
]

logger = logging.getLogger(__name__)

_SELECT_COLUMNS = ["uri", "status", "committed_at", "class_pixels", "instances", "layer_disagreement"]
#: Items per bucket of the external sort (at least; more when the output would need > _MAX_BUCKETS files).
BUCKET = 4096
_MAX_BUCKETS = 512
#: Error examples kept for the report (the counts cover all).
MAX_ERROR_EXAMPLES = 200
#: `Selection.rank` of an error row that is the latest of its URI (counted, never exported).
ERROR_RANK = -2
#: Rows turned into Python objects at a time in pass 2 (a part may hold many more).
ROWS_PER_BATCH = 1024


@dataclass(slots=True)
class Obj:
    """One exported mask: an instance, or the pixels of one class in a semantic label map.

    `rle` is a COCO compressed RLE (`{"size": [h, w], "counts": bytes}`); None when the item was read
    without masks. `bbox` is [x, y, w, h] in pixels, from the mask; `score` None for semantic masks.
    """

    label: int
    score: float | None
    area: int
    bbox: tuple[float, float, float, float] | None
    rle: dict[str, Any] | None = None

    def mask(self) -> np.ndarray:
        """The mask as a bool HxW array."""
        if self.rle is None:
            raise ValueError("expected an object read with masks, but got one without (iter_items(masks=False))")
        return mask_util.decode(self.rle).astype(bool)


@dataclass(slots=True)
class Item:
    """One image to export: the latest ok row of its URI, its kept objects and its place in review order."""

    rank: int
    review_priority: float
    uri: str
    rel_key: str
    width: int
    height: int
    fingerprint: str
    model: str
    objects: list[Obj] = field(default_factory=list)

    @property
    def top_score(self) -> float | None:
        scores = [o.score for o in self.objects if o.score is not None]
        return max(scores) if scores else None


@dataclass(slots=True)
class Selection:
    """What :func:`select` decided: which rows an export takes, and their ranks.

    `rank[i]` is the review rank of global row i (parts in order, rows in order); -1 for an older
    commit of the same URI, :data:`ERROR_RANK` for the latest row of a URI when it is an error.
    """

    output_uri: str
    storage_options: dict[str, Any] | None
    parts: list[str]
    task: str
    classes: list[str]
    min_score: float
    rank: np.ndarray
    priority: np.ndarray
    rows: int
    images: int
    errors: int
    superseded: int
    max_label: int

    def class_name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else f"class {label}"

    def labels(self) -> list[int]:
        """The exported label ids: 1..max(named classes, largest label seen); background (0) left out."""
        return list(range(1, max(len(self.classes) - 1, self.max_label) + 1))


@dataclass(slots=True)
class ErrorTally:
    """Error rows met while iterating (the latest row of their URI is an error): counts by class, a few examples."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        error_class = row.get("error_class") or "unknown"
        self.counts[error_class] += 1
        if len(self.examples) < MAX_ERROR_EXAMPLES:
            self.examples.append(
                {"uri": row.get("uri") or "", "rel_key": row.get("rel_key") or "", "error_class": error_class,
                 "error": row.get("error") or ""}
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _parents_and_values(column: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """(row index of each list element, the flattened elements, position of each element in its list)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    position = np.arange(len(flat), dtype=np.int64) - starts[parents] if len(flat) else np.zeros(0, np.int64)
    return parents, flat, position


def _row_stats(part: pa.Table, task: str, min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per row: (top kept score or NaN, kept objects, kept tiny objects), and the largest label seen."""
    n = part.num_rows
    top = np.full(n, np.nan)
    if task == "instance":
        parents, flat, _ = _parents_and_values(part["instances"])
        if len(flat) == 0:
            return top, np.zeros(n, np.int64), np.zeros(n, np.int64), 0
        scores = pc.fill_null(flat.field("score"), 0).to_numpy(zero_copy_only=False).astype(np.float64)
        areas = pc.fill_null(flat.field("area"), 0).to_numpy(zero_copy_only=False)
        labels = pc.fill_null(flat.field("label"), 0).to_numpy(zero_copy_only=False)
        keep = (scores >= min_score) & (areas > 0)
        np.fmax.at(top, parents[keep], scores[keep])
        objects = np.bincount(parents[keep], minlength=n)
        tiny = np.bincount(parents[keep & (areas <= TINY_AREA)], minlength=n)
        return top, objects, tiny, int(labels[keep].max()) if keep.any() else 0
    parents, flat, position = _parents_and_values(part["class_pixels"])
    pixels = pc.fill_null(flat, 0).to_numpy(zero_copy_only=False)
    present = (position > 0) & (pixels > 0)
    objects = np.bincount(parents[present], minlength=n)
    tiny = np.bincount(parents[present & (pixels <= TINY_AREA)], minlength=n)
    return top, objects, tiny, int(position[present].max()) if present.any() else 0


def select(output_uri: str, storage_options: dict[str, Any] | None = None, *, min_score: float = 0.0) -> Selection:
    """Pass 1: which committed rows an export takes, and in which review order (see the module docstring).

    Raises:
        JobError: nothing committed under `output_uri`, or rows of more than one task.
    """
    try:
        parts = metadata_parts(output_uri, storage_options)
    except FileNotFoundError:
        parts = []
    if not parts:
        raise JobError(f"no committed metadata under '{output_uri.rstrip('/')}/{METADATA}/' (has a job run there?)")
    meta = file_metadata(output_uri, storage_options)
    task = output_task(meta) or ""
    if task not in ("semantic", "instance"):
        raise JobError(f"expected an output of task 'semantic' or 'instance', but '{output_uri}' says {task!r}")
    hashes: list[np.ndarray] = []
    times: list[np.ndarray] = []
    ok: list[np.ndarray] = []
    prio: list[np.ndarray] = []
    max_label = 0
    for part in iter_parts(output_uri, storage_options, _SELECT_COLUMNS, parts=parts):
        hashes.append(hash64(part["uri"]))
        stamp = pc.fill_null(part["committed_at"].cast(pa.int64()), 0)
        times.append(stamp.to_numpy().astype(np.int64))
        ok.append(pc.fill_null(pc.equal(part["status"], "ok"), False).to_numpy(zero_copy_only=False))
        top, objects, tiny, seen = _row_stats(part, task, min_score)
        max_label = max(max_label, seen)
        gap = pc.fill_null(part["layer_disagreement"], 0.0).to_numpy(zero_copy_only=False)
        prio.append(review_priority(top, objects, tiny, gap))
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    n = int(h.size)
    if n == 0:
        raise JobError(f"the output '{output_uri}' has metadata parts but no rows: nothing to export")
    t = np.concatenate(times)
    is_ok = np.concatenate(ok)
    priority = np.concatenate(prio)
    del hashes, times, ok, prio
    order = np.lexsort((t, h))  # by URI hash, then commit time; stable, so ties keep read order: the last wins
    sorted_h = h[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = sorted_h[:-1] != sorted_h[1:]
    winner = np.zeros(n, dtype=bool)
    winner[order[last]] = True
    del order, sorted_h, last, t, h
    exported = np.flatnonzero(winner & is_ok)
    by_priority = np.lexsort((exported, -priority[exported].astype(np.float64)))
    rank = np.full(n, -1, dtype=np.int32 if n < 2**31 else np.int64)
    rank[exported[by_priority]] = np.arange(exported.size, dtype=rank.dtype)
    rank[winner & ~is_ok] = ERROR_RANK
    errors = int((winner & ~is_ok).sum())
    return Selection(
        output_uri=output_uri,
        storage_options=storage_options,
        parts=parts,
        task=task,
        classes=output_classes(meta),
        min_score=min_score,
        rank=rank,
        priority=priority,
        rows=n,
        images=int(exported.size),
        errors=errors,
        superseded=int(n - winner.sum()),
        max_label=max_label,
    )


def _instance_objects(row: dict[str, Any], min_score: float, with_masks: bool) -> list[Obj]:
    h, w = int(row["height"]), int(row["width"])
    kept = [i for i in row["instances"] or [] if float(i["score"]) >= min_score and int(i["area"] or 0) > 0]
    if not kept:
        return []
    rles = [{"size": [h, w], "counts": str(i["rle"]).encode("ascii")} for i in kept]
    boxes = mask_util.toBbox(rles)
    areas = mask_util.area(rles)
    return [
        Obj(int(i["label"]), float(i["score"]), int(a), tuple(float(v) for v in b), r if with_masks else None)  # type: ignore[arg-type]
        for i, r, b, a in zip(kept, rles, boxes, areas)
        if a > 0
    ]


def _semantic_objects(row: dict[str, Any], storage_options: dict[str, Any] | None, with_masks: bool) -> list[Obj]:
    pixels = row["class_pixels"] or []
    present = [c for c, n in enumerate(pixels) if c > 0 and n > 0]
    if not present:
        return []
    if not with_masks:
        return [Obj(c, None, int(pixels[c]), None) for c in present]
    uri = row["mask_uri"]
    if not uri:
        raise JobError(f"the ok row of '{row['uri']}' has classes {present} but no mask_uri")
    fs, path = filesystem(uri, storage_options)  # fsspec caches filesystem instances
    labels = decode_png_label_map(bytes(fs.cat_file(path)))
    out = []
    for c in np.unique(labels):
        if c == 0:
            continue
        rle = mask_util.encode(np.asfortranarray((labels == c).astype(np.uint8)))
        out.append(Obj(int(c), None, int(mask_util.area(rle)), tuple(float(v) for v in mask_util.toBbox(rle)), rle))  # type: ignore[arg-type]
    return out


def _row_batches(selection: Selection) -> Iterator[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]]:
    """(ranks, priorities, rows as dicts) for ROWS_PER_BATCH rows at a time, over the selected parts."""
    offset = 0
    for part in iter_parts(selection.output_uri, selection.storage_options, parts=selection.parts):
        for batch in part.to_batches(max_chunksize=ROWS_PER_BATCH):
            n = batch.num_rows
            yield selection.rank[offset : offset + n], selection.priority[offset : offset + n], batch.to_pylist()
            offset += n


def iter_items(
    selection: Selection,
    *,
    masks: bool | Callable[[int], bool] = True,
    errors: ErrorTally | None = None,
    threads: int = 8,
) -> Iterator[Item]:
    """Pass 2: the selected rows as :class:`Item`, part by part (commit order, not review order).

    Args:
        selection: from :func:`select`.
        masks: read masks (True), none (False: objects carry label, score, area only), or a test on
            the item's rank (the report reads masks for its gallery only).
        errors: collects the error rows that won (the latest row of their URI).
        threads: concurrent label-map reads (semantic outputs).
    """
    want: Callable[[int], bool] = masks if callable(masks) else (lambda _r: bool(masks))
    so = selection.storage_options

    def build(rank: int, priority: float, row: dict[str, Any]) -> Item:
        with_masks = want(rank)
        if selection.task == "instance":
            objects = _instance_objects(row, selection.min_score, with_masks)
        else:
            objects = _semantic_objects(row, so, with_masks)
        return Item(
            rank=rank,
            review_priority=priority,
            uri=row["uri"],
            rel_key=row["rel_key"] or "",
            width=int(row["width"]),
            height=int(row["height"]),
            fingerprint=row["fingerprint"] or "",
            model=row["model"] or "",
            objects=objects,
        )

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for ranks, prios, rows in _row_batches(selection):
            picked: list[tuple[int, float, dict[str, Any]]] = []
            for rank, prio, row in zip(ranks.tolist(), prios.tolist(), rows):
                if rank >= 0:
                    picked.append((rank, prio, row))
                elif rank == ERROR_RANK and errors is not None:
                    errors.add(row)
            if selection.task == "semantic" and any(want(r) for r, _, _ in picked):  # PNG reads: in threads
                yield from pool.map(lambda e: build(*e), picked)
            else:
                yield from (build(*e) for e in picked)


def in_review_order(items: Iterable[Item], total: int, workdir: str) -> Iterator[Item]:
    """Items (any order, ranks 0..total-1) in rank order, by an external bucket sort in `workdir`.

    Items go to bucket files by `rank // size` (length-prefixed pickles); each bucket is then read,
    sorted and yielded. Memory: one bucket (`size` = max(BUCKET, total / 512) items).
    """
    if total <= 0:
        for _ in items:
            pass
        return
    size = max(BUCKET, math.ceil(total / _MAX_BUCKETS))
    count = math.ceil(total / size)
    os.makedirs(workdir, exist_ok=True)
    paths = [os.path.join(workdir, f"bucket-{b:05d}.bin") for b in range(count)]
    files: dict[int, Any] = {}
    try:
        for item in items:
            b = item.rank // size
            f = files.get(b)
            if f is None:
                f = files[b] = open(paths[b], "wb")  # noqa: SIM115 - closed below
            data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
            f.write(struct.pack("<Q", len(data)))
            f.write(data)
    finally:
        for f in files.values():
            f.close()
    for b in range(count):
        if b not in files:
            continue
        bucket: list[Item] = []
        with open(paths[b], "rb") as f:
            while head := f.read(8):
                (length,) = struct.unpack("<Q", head)
                bucket.append(pickle.loads(f.read(length)))
        os.remove(paths[b])
        bucket.sort(key=lambda it: it.rank)
        yield from bucket
        del bucket
