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

from segbatch.masks import encode_png_label_map
from segbatch.outputs import ERRORS, MASKS, METADATA, METADATA_SCHEMA, SCHEMA_VERSION
from segbatch.retry import Retries, call_with_retries
from segbatch.rows import RowStatus, concat_rows, split_rows
from segbatch.spec import OutputSpec
from segbatch.storage import filesystem, unstrip, write_bytes_atomic

__all__ = [
    "Committer",
    "MaskWriter",
    "new_run_id",
    "rows_to_table",
    "write_batch",
    "write_layer_batch",
]

logger = logging.getLogger(__name__)

class MaskWriter:
    """Ray Data stage: store each row's mask, replace the pixels with `mask_uri`.

    Semantic jobs always write a label-map PNG; instance jobs write an instance-id PNG only when
    `output.instance_png` is set (their masks travel as RLE in the metadata). Transient storage
    faults are retried (:func:`segbatch.retry.call_with_retries`); the retries spent on a row's mask
    are added to its `retries` column (created, as zeros, when the batch has none).

    Args:
        output: the job's `output` section.
        task: the job's `model.task`.
        threads: concurrent mask writes within one call.
    """

    def __init__(self, output: OutputSpec, task: str, threads: int = 8) -> None:
        self.output_uri = output.uri
        self.storage_options = output.storage_options
        self.write_png = task == "semantic" or output.instance_png
        self.threads = threads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        fs, root = filesystem(self.output_uri, self.storage_options)
        root = root.rstrip("/")
        n = len(batch["item_id"])
        rows = RowStatus.of(batch)
        mask_uri = [""] * n
        jobs: list[tuple[int, str, np.ndarray]] = []
        if self.write_png:
            for i in range(n):
                if rows.ok(i) and batch["label_map"][i].size:
                    path = f"{root}/{MASKS}/{batch['rel_key'][i]}.png"
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
                        after = f" after {spent} retries" if spent else ""
                        message = f"{batch['uri'][i]}: cannot write mask {unstrip(fs, path)}{after}: {type(exc).__name__}: {exc}"
                        rows.fail(i, "write_failed", message)
        out = {k: v for k, v in batch.items() if k not in ("label_map", "image")}
        out["retries"] = np.asarray(retries, dtype=np.int32)
        rows.into(out)
        out["mask_uri"] = np.asarray(mask_uri, dtype=object)
        return out


def write_batch(batch: dict[str, np.ndarray], output: OutputSpec, task: str) -> dict[str, Any]:
    """The write stage as a plain function for Ray Data tasks (arguments as :class:`MaskWriter`'s).

    Defined here rather than in the pipeline module so write workers never import torch.
    """
    return MaskWriter(output, task)(batch)


def write_layer_batch(batch: dict[str, np.ndarray], outputs: dict[str, OutputSpec], tasks: dict[str, str]) -> dict[str, Any]:
    """The write stage of a several-model job: each row's mask under its layer's output (`layer` column),
    exactly as that layer's own job would write it.

    Args:
        outputs: per layer name, its `output` section (`output.uri/<name>/`).
        tasks: per layer name, its `model.task`.
    """
    parts = [MaskWriter(outputs[name], tasks[name])(rows) for name, rows in split_rows(batch, "layer")]
    if not parts:
        return MaskWriter(next(iter(outputs.values())), "semantic")(batch)
    return concat_rows(parts)


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
        "layer_disagreement": (
            [None if np.isnan(v) else float(v) for v in np.asarray(batch["layer_disagreement"], dtype=np.float64)]
            if "layer_disagreement" in batch
            else [None] * n
        ),
    }
    return pa.table(columns, schema=METADATA_SCHEMA)


class Committer:
    """Driver-side sink: buffers finished rows and commits them as whole Parquet parts.

    Parts are named `part-<run_id>-<seq>.parquet`, so runs never overwrite each other's ledger and a
    killed run leaves only whole parts behind. Error rows are also written to `errors/` (the same
    rows, for people who only want the failures).

    Args:
        output: the job's `output` section (where, and `commit_rows` / `commit_seconds`).
        run_id: names the parts.
        file_metadata: key-value metadata stored in every part (`segbatch.task`, `segbatch.classes`).
    """

    def __init__(self, output: OutputSpec, run_id: str, file_metadata: dict[str, str]) -> None:
        self.fs, root = filesystem(output.uri, output.storage_options)
        self.root = root.rstrip("/")
        self.run_id = run_id
        self.file_metadata = {"segbatch.schema_version": SCHEMA_VERSION, **file_metadata}
        self.commit_rows = output.commit_rows
        self.commit_seconds = output.commit_seconds
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
            self._write(ERRORS, errors)
        self.parts.append(unstrip(self.fs, self._write(METADATA, table)))
        self.committed_rows += table.num_rows
        outcomes = pc.if_else(pc.equal(table["status"], "ok"), "ok", pc.fill_null(table["error_class"], "error"))
        self.committed_counts.update(outcomes.to_pylist())
        self._seq += 1
        self._pending, self._pending_rows = [], 0
        self._last_commit = time.monotonic()


def new_run_id() -> str:
    """Sortable, unique run id: UTC time plus a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]



