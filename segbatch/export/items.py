"""Committed rows → export items: the latest ok row per image, its masks, in review order. Streamed.

Exports never re-run a model and never hold an output in memory. They read the committed metadata
(:mod:`segbatch.outputs`) in two passes over the same parts (listed once, so parts a running job
commits meanwhile are left for the next export):

1. :func:`select` reads `uri`, `status`, `committed_at`, `class_pixels` and `instances`, part by part,
   and makes one 29-byte record a row: a 64-bit hash of the URI, the commit time, the row number and
   the row's `review_priority` (:mod:`segbatch.export.priority`), no strings. Three external sorts
   (:mod:`segbatch.export.spill`, bucket files in a local `workdir`, at most :data:`SPILL_RECORDS`
   records in memory each) then (a) group the records by URI hash in commit order, so the latest row
   of each URI wins (the rule of :func:`segbatch.outputs.latest_rows`: a rerun or `--force` commits
   an item again; the newest wins, ties to the row read later); (b) put the ok winners in review order
   (priority descending, then commit order), which numbers their ranks; (c) put those ranks, and the
   error winners, back in row order, written as one 12-byte record a row (`decisions.bin`). Memory is
   a part and the sorts' buffers, whatever the number of rows.
2. :func:`iter_items` reads whole parts again, with the decisions file alongside, and yields the kept
   ok rows as :class:`Item`, with their masks when asked: instance rows carry COCO RLE; semantic rows'
   label-map PNGs (`mask_uri`) are read and split into one mask per class present. Error rows that
   won are counted (:class:`ErrorTally`), never yielded.

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
from segbatch.export.spill import MAX_RECORDS, ExternalSort
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
#: Pass 1's records held in memory per sort before it spills to bucket files (:mod:`segbatch.export.spill`).
SPILL_RECORDS = MAX_RECORDS
#: Row numbers share a 64-bit sort key with the priority's 32 bits (:func:`_review_keys`).
_MAX_ROWS = 2**32 - 1
#: Pass 1's record of a row: URI hash, commit time (ms), row number, ok, review priority (29 bytes).
_ROW = np.dtype([("h", "<u8"), ("t", "<i8"), ("row", "<u8"), ("ok", "?"), ("prio", "<f4")])
#: A review-order key (:func:`_review_keys`).
_KEY = np.dtype([("k", "<u8")])
#: A decision about one row that an export takes or counts: its review rank (or ERROR_RANK) and priority.
_DECISION = np.dtype([("row", "<u8"), ("rank", "<i8"), ("prio", "<f4")])
#: The decisions file pass 2 reads: one record per row, in row order.
_DENSE = np.dtype([("rank", "<i8"), ("prio", "<f4")])


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

    `decisions` is a local file of one :data:`_DENSE` record per global row (parts in order, rows in
    order): the row's review rank and priority; rank -1 for an older commit of the same URI,
    :data:`ERROR_RANK` for the latest row of a URI when it is an error. It lives in :func:`select`'s
    `workdir`.
    """

    output_uri: str
    storage_options: dict[str, Any] | None
    parts: list[str]
    task: str
    classes: list[str]
    min_score: float
    decisions: str
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


def _row_records(part: pa.Table, offset: int, task: str, min_score: float) -> tuple[np.ndarray, int]:
    """Pass 1's record of each row of a part (:data:`_ROW`), and the largest label seen."""
    n = part.num_rows
    rec = np.empty(n, _ROW)
    rec["h"] = hash64(part["uri"])
    rec["t"] = pc.fill_null(part["committed_at"].cast(pa.int64()), 0).to_numpy()
    rec["row"] = np.arange(offset, offset + n, dtype=np.uint64)
    rec["ok"] = pc.fill_null(pc.equal(part["status"], "ok"), False).to_numpy(zero_copy_only=False)
    top, objects, tiny, seen = _row_stats(part, task, min_score)
    gap = pc.fill_null(part["layer_disagreement"], 0.0).to_numpy(zero_copy_only=False)
    rec["prio"] = review_priority(top, objects, tiny, gap)
    return rec, seen


def _review_keys(rows: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """uint64 keys that sort as review order: priority descending (its float32 bits, which order as the
    values do for numbers >= 0), then row number ascending (the low 32 bits)."""
    bits = np.abs(priority.astype(np.float32)).view(np.uint32).astype(np.uint64)
    return ((np.uint64(0xFFFFFFFF) - bits) << np.uint64(32)) | rows


def _decisions(rows: np.ndarray, rank: np.ndarray, priority: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows), _DECISION)
    out["row"], out["rank"], out["prio"] = rows, rank, priority
    return out


def _unranked(count: int) -> np.ndarray:
    out = np.zeros(count, _DENSE)
    out["rank"] = -1
    return out


def _write_dense(sorted_chunks: Iterator[np.ndarray], rows: int, path: str) -> None:
    """The decisions (sorted by row) as one :data:`_DENSE` record per row, rows without one ranked -1."""
    done = 0
    with open(path, "wb") as f:

        def fill(upto: int) -> None:
            nonlocal done
            while done < upto:
                k = min(upto - done, SPILL_RECORDS)
                f.write(_unranked(k).data)
                done += k

        for chunk in sorted_chunks:
            first = int(chunk["row"][0])
            fill(first)
            span = int(chunk["row"][-1]) + 1 - first  # the chunk's rows and the older commits among them
            for start in range(0, span, SPILL_RECORDS):
                block = _unranked(min(SPILL_RECORDS, span - start))
                inside = (chunk["row"] >= first + start) & (chunk["row"] < first + start + len(block))
                at = (chunk["row"][inside] - np.uint64(first + start)).astype(np.intp)
                block["rank"][at] = chunk["rank"][inside]
                block["prio"][at] = chunk["prio"][inside]
                f.write(block.data)
            done = first + span
        fill(rows)


def select(
    output_uri: str, storage_options: dict[str, Any] | None = None, *, min_score: float = 0.0, workdir: str
) -> Selection:
    """Pass 1: which committed rows an export takes, and in which review order (see the module docstring).

    Args:
        workdir: a local folder for the spill files and the decisions pass 2 reads (the caller removes it).

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
    os.makedirs(workdir, exist_ok=True)
    n = max_label = 0
    with ExternalSort(_ROW, ("h", "t", "row"), os.path.join(workdir, "by-uri"), max_records=SPILL_RECORDS) as by_uri:
        for part in iter_parts(output_uri, storage_options, _SELECT_COLUMNS, parts=parts):
            records, seen = _row_records(part, n, task, min_score)
            max_label = max(max_label, seen)
            by_uri.add(records)
            n += len(records)
        if n == 0:
            raise JobError(f"the output '{output_uri}' has metadata parts but no rows: nothing to export")
        if n > _MAX_ROWS:
            raise JobError(f"the output '{output_uri}' has {n} metadata rows; exports take at most {_MAX_ROWS}")
        by_review = ExternalSort(_KEY, ("k",), os.path.join(workdir, "by-review"), max_records=SPILL_RECORDS)
        by_row = ExternalSort(_DECISION, ("row",), os.path.join(workdir, "by-row"), max_records=SPILL_RECORDS,
                              key_range=(0, n - 1))
        winners = errors = 0
        # Sorted by URI hash, then commit time, then read order: the last row of each hash wins.
        for chunk in by_uri.sorted():
            last = np.ones(len(chunk), dtype=bool)
            last[:-1] = chunk["h"][:-1] != chunk["h"][1:]
            won = chunk[last]
            winners += len(won)
            bad = won[~won["ok"]]
            errors += len(bad)
            by_row.add(_decisions(bad["row"], np.full(len(bad), ERROR_RANK), bad["prio"]))
            good = won[won["ok"]]
            keys = np.empty(len(good), _KEY)
            keys["k"] = _review_keys(good["row"], good["prio"])
            by_review.add(keys)
    with by_review, by_row:
        images = 0
        for chunk in by_review.sorted():
            keys = chunk["k"]
            priority = (np.uint64(0xFFFFFFFF) - (keys >> np.uint64(32))).astype(np.uint32).view(np.float32)
            ranks = np.arange(images, images + len(keys), dtype=np.int64)
            by_row.add(_decisions(keys & np.uint64(0xFFFFFFFF), ranks, priority))
            images += len(keys)
        decisions = os.path.join(workdir, "decisions.bin")
        _write_dense(by_row.sorted(), n, decisions)
    return Selection(
        output_uri=output_uri,
        storage_options=storage_options,
        parts=parts,
        task=task,
        classes=output_classes(meta),
        min_score=min_score,
        decisions=decisions,
        rows=n,
        images=images,
        errors=errors,
        superseded=n - winners,
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
    """(ranks, priorities, rows as dicts) for ROWS_PER_BATCH rows at a time, over the selected parts.

    The decisions file holds one record per row in the same order, so it is read alongside.
    """
    with open(selection.decisions, "rb") as f:
        for part in iter_parts(selection.output_uri, selection.storage_options, parts=selection.parts):
            for batch in part.to_batches(max_chunksize=ROWS_PER_BATCH):
                n = batch.num_rows
                decided = np.frombuffer(f.read(n * _DENSE.itemsize), _DENSE)
                if len(decided) != n:
                    raise JobError(f"the parts under '{selection.output_uri}' changed between the export's two passes")
                yield decided["rank"], decided["prio"], batch.to_pylist()


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
