"""Write stage and commit sink: mask artifacts to storage, metadata rows to Parquet.

The write stage (CPU tasks) stores each mask under `masks/<input key>.png` and replaces pixels with
the mask's URI. The driver-side :class:`Committer` appends finished rows to Parquet parts that are
written whole (atomic PUT / rename) every `commit_rows` rows or `commit_seconds` seconds: those parts
are the ledger a rerun reads to skip finished items. A row is committed only after its mask exists.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pycocotools import mask as mask_util

from segbatch.masks import encode_png_label_map
from segbatch.retry import Retries, call_with_retries
from segbatch.storage import filesystem, join_uri, unstrip, write_bytes_atomic

__all__ = [
    "SCHEMA_VERSION",
    "METADATA_SCHEMA",
    "Committer",
    "MaskWriter",
    "read_committed",
    "rows_to_table",
    "write_batch",
]

logger = logging.getLogger(__name__)

#: Bumped whenever a column is added, removed or changes meaning (stored in each file's metadata).
#: 2: an instance's `bbox` is its mask's tight box (it was the detector's, now `detector_bbox`).
SCHEMA_VERSION = "2"

INSTANCE_TYPE = pa.struct(
    [
        ("label", pa.int32()),
        ("score", pa.float32()),
        ("bbox", pa.list_(pa.float32(), 4)),
        ("area", pa.int64()),
        ("rle", pa.string()),
        ("detector_bbox", pa.list_(pa.float32(), 4)),
    ]
)

METADATA_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("uri", pa.string()),
        ("version", pa.string()),
        ("rel_key", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("error", pa.string()),
        ("mask_uri", pa.string()),
        ("task", pa.string()),
        ("model", pa.string()),
        ("weights_sha256", pa.string()),
        ("fingerprint", pa.string()),
        ("run_id", pa.string()),
        ("class_pixels", pa.list_(pa.int64())),
        ("num_instances", pa.int32()),
        ("instances", pa.list_(INSTANCE_TYPE)),
        ("committed_at", pa.timestamp("ms", tz="UTC")),
    ]
)


class MaskWriter:
    """Ray Data stage: store each row's mask, replace the pixels with `mask_uri`.

    Semantic jobs always write a label-map PNG; instance jobs write an instance-id PNG only when
    `output.instance_png` is set (their masks travel as RLE in the metadata). Transient storage
    faults are retried (:func:`segbatch.retry.call_with_retries`); the retries spent on a row's mask
    are added to its `retries` column (created, as zeros, when the batch has none).
    """

    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None, write_png: bool, threads: int = 8) -> None:
        self.output_uri = output_uri
        self.storage_options = storage_options or {}
        self.write_png = write_png
        self.threads = threads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        fs, root = filesystem(self.output_uri, self.storage_options)
        root = root.rstrip("/")
        n = len(batch["item_id"])
        status = [str(s) for s in batch["status"]]
        error_class = [str(s) for s in batch["error_class"]]
        error = [str(s) for s in batch["error"]]
        mask_uri = [""] * n
        jobs: list[tuple[int, str, np.ndarray]] = []
        if self.write_png:
            for i in range(n):
                if status[i] == "ok" and batch["label_map"][i].size:
                    path = f"{root}/masks/{batch['rel_key'][i]}.png"
                    jobs.append((i, path, batch["label_map"][i]))

        retries = [int(r) for r in batch["retries"]] if "retries" in batch else [0] * n

        def write(job: tuple[int, str, np.ndarray]) -> tuple[int, str, Exception | None, int]:
            i, path, labels = job
            counter = Retries()
            try:
                data = encode_png_label_map(labels)
                call_with_retries(lambda: write_bytes_atomic(fs, path, data), counter=counter, what=f"writing {path}")
                return i, path, None, counter.count
            except Exception as e:  # noqa: BLE001 - a failed write is that item's error, after the retries
                return i, path, e, counter.count

        if jobs:
            with ThreadPoolExecutor(max_workers=min(self.threads, len(jobs))) as pool:
                for i, path, exc, spent in pool.map(write, jobs):
                    retries[i] += spent
                    if exc is None:
                        mask_uri[i] = unstrip(fs, path)
                    else:
                        status[i], error_class[i] = "error", "write_failed"
                        after = f" after {spent} retries" if spent else ""
                        error[i] = (
                            f"{batch['uri'][i]}: cannot write mask {unstrip(fs, path)}{after}: {type(exc).__name__}: {exc}"
                        )
        out = {k: v for k, v in batch.items() if k not in ("label_map", "image")}
        out["retries"] = np.asarray(retries, dtype=np.int32)
        out["status"] = np.asarray(status, dtype=object)
        out["error_class"] = np.asarray(error_class, dtype=object)
        out["error"] = np.asarray(error, dtype=object)
        out["mask_uri"] = np.asarray(mask_uri, dtype=object)
        return out


def write_batch(batch: dict[str, np.ndarray], **options: Any) -> dict[str, Any]:
    """The write stage as a plain function for Ray Data tasks (options are :class:`MaskWriter`'s).

    Defined here rather than in the pipeline module so write workers never import torch.
    """
    return MaskWriter(**options)(batch)


def rows_to_table(batch: dict[str, Any], constants: dict[str, str]) -> pa.Table:
    """Finished rows (a numpy batch from the write stage) → a table in :data:`METADATA_SCHEMA`."""
    n = len(batch["item_id"])
    task = constants["task"]
    status = [str(s) for s in batch["status"]]

    def text(col: str) -> list[str | None]:
        return [str(v) if str(v) else None for v in batch[col]]

    class_pixels: list[list[int] | None] = [None] * n
    instances: list[list[dict[str, Any]] | None] = [None] * n
    num_instances: list[int | None] = [None] * n
    for i in range(n):
        if status[i] != "ok":
            continue
        if task == "semantic":
            class_pixels[i] = [int(c) for c in batch["class_pixels"][i]]
        else:
            inst = json.loads(batch["instances"][i]) if str(batch["instances"][i]) else []
            instances[i] = inst
            num_instances[i] = len(inst)
    now = datetime.now(timezone.utc)
    columns = {
        "item_id": [str(v) for v in batch["item_id"]],
        "uri": [str(v) for v in batch["uri"]],
        "version": [str(v) for v in batch["version"]],
        "rel_key": [str(v) for v in batch["rel_key"]],
        "width": [int(v) for v in batch["width"]],
        "height": [int(v) for v in batch["height"]],
        "status": status,
        "error_class": text("error_class"),
        "error": text("error"),
        "mask_uri": text("mask_uri"),
        "task": [task] * n,
        "model": [constants["model"]] * n,
        "weights_sha256": [constants["weights_sha256"]] * n,
        "fingerprint": [constants["fingerprint"]] * n,
        "run_id": [constants["run_id"]] * n,
        "class_pixels": class_pixels,
        "num_instances": num_instances,
        "instances": instances,
        "committed_at": [now] * n,
    }
    return pa.table(columns, schema=METADATA_SCHEMA)


class Committer:
    """Driver-side sink: buffers finished rows and commits them as whole Parquet parts.

    Parts are named `part-<run_id>-<seq>.parquet`, so runs never overwrite each other's ledger and a
    killed run leaves only whole parts behind. Error rows are also written to `errors/` (the same
    rows, for people who only want the failures).
    """

    def __init__(
        self,
        output_uri: str,
        storage_options: dict[str, Any] | None,
        run_id: str,
        file_metadata: dict[str, str],
        commit_rows: int = 1000,
        commit_seconds: float = 30.0,
    ) -> None:
        self.fs, root = filesystem(output_uri, storage_options)
        self.root = root.rstrip("/")
        self.run_id = run_id
        self.file_metadata = {"segbatch.schema_version": SCHEMA_VERSION, **file_metadata}
        self.commit_rows = commit_rows
        self.commit_seconds = commit_seconds
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._last_commit = time.monotonic()
        self._seq = 0
        self.committed_rows = 0
        #: Committed rows by outcome: `ok`, or the error class. The run's counts come from here, so
        #: a row counts only once it is in the ledger.
        self.committed_counts: Counter[str] = Counter()
        self.parts: list[str] = []
        #: Retries spent writing parts (transient storage faults), for the run manifest.
        self.retries = Retries()

    def add(self, table: pa.Table) -> None:
        """Queue rows; commits when enough rows or time have accumulated."""
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
        if self._pending_rows >= self.commit_rows or (
            self._pending_rows and time.monotonic() - self._last_commit >= self.commit_seconds
        ):
            self.flush()

    def _write(self, folder: str, table: pa.Table) -> str:
        schema = table.schema.with_metadata({k.encode(): v.encode() for k, v in self.file_metadata.items()})
        sink = pa.BufferOutputStream()
        pq.write_table(table.cast(schema), sink, compression="zstd")
        path = f"{self.root}/{folder}/part-{self.run_id}-{self._seq:05d}.parquet"
        data = sink.getvalue().to_pybytes()
        # A retried PUT of the same bytes to the same key is idempotent: a part is whole or absent.
        call_with_retries(
            lambda: write_bytes_atomic(self.fs, path, data), counter=self.retries, what=f"writing {unstrip(self.fs, path)}"
        )
        return path

    def flush(self) -> None:
        """Commit every queued row now (errors part first: the metadata part is the ledger entry)."""
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        errors = table.filter(pc.equal(table["status"], "error"))
        if errors.num_rows:
            self._write("errors", errors)
        self.parts.append(unstrip(self.fs, self._write("metadata", table)))
        self.committed_rows += table.num_rows
        outcomes = pc.if_else(pc.equal(table["status"], "ok"), "ok", pc.fill_null(table["error_class"], "error"))
        self.committed_counts.update(outcomes.to_pylist())
        self._seq += 1
        self._pending, self._pending_rows = [], 0
        self._last_commit = time.monotonic()


def read_committed(output_uri: str, storage_options: dict[str, Any] | None, columns: list[str] | None = None) -> pa.Table:
    """All committed metadata rows under an output prefix (empty table when there are none)."""
    fs, root = filesystem(output_uri, storage_options)
    folder = f"{root.rstrip('/')}/metadata"
    try:
        found = call_with_retries(lambda: fs.find(folder), what=f"listing {unstrip(fs, folder)}")
        paths = sorted(p for p in found if p.endswith(".parquet"))
    except FileNotFoundError:
        paths = []
    fields = [METADATA_SCHEMA.field(c) for c in columns] if columns else list(METADATA_SCHEMA)
    schema = pa.schema(fields)
    tables = []

    wanted = columns if columns is None or "instances" not in columns else sorted({*columns, "height", "width"})

    def read_part(path: str) -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=wanted)

    for p in paths:
        t = call_with_retries(lambda: read_part(p), what=f"reading {unstrip(fs, p)}")  # noqa: B023 - called at once
        if (t.schema.metadata or {}).get(b"segbatch.schema_version", b"1") == b"1" and "instances" in schema.names:
            t = _instances_from_v1(t)
        tables.append(t.select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _instances_from_v1(table: pa.Table) -> pa.Table:
    """Version 1 parts stored the detector's box as `bbox`: it becomes `detector_bbox`, and `bbox` the
    mask's own box (from its RLE), so old outputs read as new ones (resume, eval, exports)."""
    rows = table.select(["height", "width", "instances"]).to_pylist()
    upgraded = []
    for row in rows:
        instances = row["instances"]
        if instances is not None:
            size = [int(row["height"]), int(row["width"])]
            instances = [
                {
                    **inst,
                    "detector_bbox": inst["bbox"],
                    "bbox": [float(v) for v in mask_util.toBbox({"size": size, "counts": inst["rle"].encode()})],
                }
                for inst in instances
            ]
        upgraded.append(instances)
    index = table.schema.get_field_index("instances")
    return table.set_column(index, "instances", pa.array(upgraded, type=pa.list_(INSTANCE_TYPE)))


def new_run_id() -> str:
    """Sortable, unique run id: UTC time plus a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def manifest_uri(output_uri: str, run_id: str) -> str:
    return join_uri(output_uri, "runs", f"{run_id}.json")
