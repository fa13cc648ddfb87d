"""Exports of committed outputs for labelling tools: COCO, CVAT for images 1.1, Label Studio.

`segbatch export OUTPUT --format coco|cvat|labelstudio` reads only what a job committed (metadata
parts and masks, through :mod:`segbatch.outputs`), never re-runs a model, and streams: two passes
over the parts and an external sort into review order (:mod:`segbatch.export.items`), so memory
does not grow with the number of images. Every export also writes `review.parquet`, the review
order with its `review_priority` column (:mod:`segbatch.export.priority`).

Example:
    >>> from segbatch.export import export_output  # doctest: +SKIP
    >>> summary = export_output("out/instance", "coco", min_score=0.3)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from segbatch.errors import JobError
from segbatch.export.dest import Staging
from segbatch.export.items import ErrorTally, Item, in_review_order, iter_items, select
from segbatch.outputs import layer_output
from segbatch.storage import join_uri

__all__ = ["EXPORTS", "FORMATS", "REVIEW_NAME", "export_output"]

FORMATS = ("coco", "cvat", "labelstudio")
#: The folder under an output that holds `<format>/` exports by default.
EXPORTS = "exports"
REVIEW_NAME = "review.parquet"
_REVIEW_SCHEMA = pa.schema(
    [
        ("review_rank", pa.int64()),
        ("review_priority", pa.float32()),
        ("rel_key", pa.string()),
        ("uri", pa.string()),
        ("objects", pa.int32()),
        ("top_score", pa.float32()),
    ]
)


class _ReviewLog:
    """Writes `review.parquet` from the items passing through, in batches."""

    def __init__(self, path: str, batch: int = 10_000) -> None:
        self.writer = pq.ParquetWriter(path, _REVIEW_SCHEMA, compression="zstd")
        self.batch = batch
        self.rows: dict[str, list[Any]] = {n: [] for n in _REVIEW_SCHEMA.names}

    def tee(self, items: Iterator[Item]) -> Iterator[Item]:
        for item in items:
            r = self.rows
            r["review_rank"].append(item.rank)
            r["review_priority"].append(item.review_priority)
            r["rel_key"].append(item.rel_key)
            r["uri"].append(item.uri)
            r["objects"].append(len(item.objects))
            r["top_score"].append(item.top_score)
            if len(r["uri"]) >= self.batch:
                self._flush()
            yield item

    def _flush(self) -> None:
        if self.rows["uri"]:
            self.writer.write_table(pa.table(self.rows, schema=_REVIEW_SCHEMA))
            self.rows = {n: [] for n in _REVIEW_SCHEMA.names}

    def close(self) -> None:
        self._flush()
        self.writer.close()


def export_output(
    output_uri: str,
    fmt: str,
    *,
    dest: str | None = None,
    min_score: float = 0.0,
    polygons: bool = False,
    layer: str | None = None,
    task_size: int = 1000,
    local_files_root: str = "/",
    storage_options: dict[str, Any] | None = None,
    dest_storage_options: dict[str, Any] | None = None,
    tmp: str | None = None,
) -> dict[str, Any]:
    """Export a job's committed outputs for a labelling tool.

    Args:
        output_uri: the job's `output.uri`.
        fmt: `coco`, `cvat` or `labelstudio`.
        dest: destination folder (default `OUTPUT/exports/<fmt>/`; of a layer, `OUTPUT/<layer>/exports/<fmt>/`).
        min_score: leave out instances scoring below this (semantic masks have no score).
        polygons: polygons (outer contours, an approximation) instead of masks.
        layer: the layer to export of a several-model job's output (`OUTPUT/<layer>/`; needed when it holds
            more than one); a one-model output's single layer may be named by its task.
        task_size: CVAT: images per task file.
        local_files_root: Label Studio: the local-files document root local images are relative to.
        storage_options / dest_storage_options: fsspec options for the output and the destination.
        tmp: where to stage files (default: the system's temporary folder).

    Returns:
        A summary: `format`, `dest`, `images`, `annotations`, `errors` (count by error class),
        `superseded` (older commits of the same image, left out), `files`, `seconds`.

    Raises:
        JobError: no committed outputs, an unknown format or layer.
    """
    if fmt not in FORMATS:
        raise JobError(f"--format expected one of {list(FORMATS)}, but got '{fmt}'")
    started = time.perf_counter()
    output_uri = layer_output(output_uri, storage_options, layer)
    dest = dest or join_uri(output_uri, EXPORTS, fmt)
    errors = ErrorTally()
    with Staging(dest, dest_storage_options, tmp) as staging:
        if fmt == "labelstudio" and not polygons:
            from segbatch.export.labelstudio import _brush_encoder

            _brush_encoder()  # a missing extra fails before the passes
        selection = select(output_uri, storage_options, min_score=min_score, workdir=staging.scratch("select"))
        review = _ReviewLog(staging.path(REVIEW_NAME))
        items = review.tee(
            in_review_order(iter_items(selection, errors=errors), selection.images, staging.scratch("sort"))
        )
        if fmt == "coco":
            from segbatch.export.coco import write_coco

            written = write_coco(items, selection, staging, polygons=polygons)
        elif fmt == "cvat":
            from segbatch.export.cvat import write_cvat

            written = write_cvat(items, selection, staging, polygons=polygons, task_size=task_size)
        else:
            from segbatch.export.labelstudio import write_labelstudio

            written = write_labelstudio(items, selection, staging, polygons=polygons, local_files_root=local_files_root)
        review.close()
        files = [*written.pop("files"), staging.publish(REVIEW_NAME)]
    return {
        "format": fmt,
        "output": output_uri,
        "dest": dest,
        "task": selection.task,
        "rows": selection.rows,
        **written,
        "errors": dict(errors.counts),
        "error_rows": selection.errors,
        "superseded": selection.superseded,
        "min_score": min_score,
        "files": files,
        "seconds": round(time.perf_counter() - started, 3),
    }
