"""Sources → work items with stable ids, minus the items already committed, in pages.

A work item is one image. Its `item_id` is derived from the source URI and the object's version
(etag, or size+mtime), so the same object always gets the same id: resume and incremental runs are
a set difference, and a changed object is new work.

Planning streams: the input is listed in pages of :data:`PAGE_ROWS` objects (a Parquet manifest by
its row batches, text and CSV manifests line by line; a prefix or glob is one fsspec listing, then
paged), each page loses the ids the ledger holds (sorted 64-bit hashes, :class:`segbatch.outputs.Ledger`)
and the ids seen on earlier pages, and what is left becomes one table in :data:`PLAN_SCHEMA`: the
rows Ray Data reads (`runs/<run_id>/plan/part-<seq>.parquet`, :func:`write_plan`). No list of every
item is ever built on the driver.

Output-key safety is checked here too: a key that would climb out of the output prefix becomes a row
with `plan_error` set (an `unsafe_key` error row later), never a write.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segbatch.errors import JobError
from segbatch.outputs import LayerLedgers, Ledger, hash64, plan_uri, read_ledger, sorted_unique
from segbatch.retry import call_with_retries
from segbatch.models.source import WeightsBytes
from segbatch.spec import InputSpec, JobSpec, TilingSpec
from segbatch.storage import (
    ListedObject,
    UnsafeKeyError,
    filesystem,
    is_manifest,
    list_objects,
    protocol_of,
    safe_relative_key,
    unstrip,
    write_bytes_atomic,
)

__all__ = [
    "PAGE_ROWS",
    "LAYERED_PLAN_SCHEMA",
    "PLAN_SCHEMA",
    "SCENE_PLAN_SCHEMA",
    "Plan",
    "PlanCounts",
    "WorkItem",
    "ModelLedger",
    "count_plan",
    "read_job_ledgers",
    "item_id_for",
    "listing_errors",
    "plan_items",
    "plan_pages",
    "read_plan_block",
    "write_plan",
]


#: Objects per planning page (and per plan file): bounds the driver's memory while planning.
PAGE_ROWS = 100_000
#: Rows per Parquet row group of a plan file: a load task's block is read as the groups it overlaps.
PLAN_GROUP_ROWS = 1024

#: The plan's rows: what Ray Data reads and the load stage receives.
PLAN_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("uri", pa.string()),
        ("version", pa.string()),
        ("size", pa.int64()),
        ("rel_key", pa.string()),
        ("plan_error", pa.string()),
    ]
)

#: A several-model job's rows (`layers:`): + `layers`, a bit mask of the layers still to run (bit k = layer k).
LAYERED_PLAN_SCHEMA = PLAN_SCHEMA.append(pa.field("layers", pa.int64()))

#: A scene job's rows (`tiling` set): one per tile window, with the window and the scene's size.
#: `plan_error_class` names the error class of a scene refused while planning (unreadable, corrupt...).
SCENE_PLAN_SCHEMA = PLAN_SCHEMA.append(pa.field("plan_error_class", pa.string()))
for _name in ("scene_width", "scene_height", "col_off", "row_off", "win_width", "win_height"):
    SCENE_PLAN_SCHEMA = SCENE_PLAN_SCHEMA.append(pa.field(_name, pa.int32()))
#: Per-scene scaling from `input.scale.percentile` (one value per band read; empty otherwise).
for _name in ("scale_min", "scale_max"):
    SCENE_PLAN_SCHEMA = SCENE_PLAN_SCHEMA.append(pa.field(_name, pa.list_(pa.float64())))


@dataclass(slots=True, frozen=True)
class WorkItem:
    """One image to segment: one row of :data:`PLAN_SCHEMA`.

    `rel_key` is its output key (relative to the input's base, checked for safety), or "" with
    `plan_error` saying why the key was refused.
    """

    item_id: str
    uri: str
    version: str
    size: int
    rel_key: str
    plan_error: str


@dataclass(slots=True)
class PlanCounts:
    """What planning found: `listed` unique objects, of which `skipped` already done, `new` never
    committed before, `changed` committed before in another version."""

    listed: int = 0
    skipped: int = 0
    new: int = 0
    changed: int = 0
    excluded: int = 0  # objects under the job's own output prefix: never inputs (see plan_pages)
    #: Several-model jobs: per layer, the items it lacks (an item is planned while any layer lacks it).
    layer_todo: list[int] = field(default_factory=list)

    #: Several-model jobs: items this version of which some layers hold and others lack (a run stopped
    #: between the layers' commits, or a layer added to the job).
    unfinished: int = 0

    @property
    def todo(self) -> int:
        return self.new + self.changed + self.unfinished


@dataclass(slots=True)
class Plan:
    """A written plan: its counts, the URIs of its pages (none when there is nothing to do) and their rows."""

    counts: PlanCounts
    uri: str
    parts: list[str] = field(default_factory=list)
    part_rows: list[int] = field(default_factory=list)
    schema: pa.Schema = PLAN_SCHEMA
    #: Scene jobs: every listed scene (`segbatch.geo.plan.PlannedScene`), done or not, for the after-stream step.
    scenes: list[Any] = field(default_factory=list)

    def blocks(self, block_rows: int) -> list[tuple[str, int, int]]:
        """(part URI, first row, end row) ranges of at most `block_rows` rows, never across parts.

        Example:
            >>> Plan(PlanCounts(), "p", ["a", "b"], [5, 2]).blocks(2)
            [('a', 0, 2), ('a', 2, 4), ('a', 4, 5), ('b', 0, 2)]
        """
        step = max(1, block_rows)
        return [(p, a, min(a + step, n)) for p, n in zip(self.parts, self.part_rows) for a in range(0, n, step)]


def item_id_for(uri: str, version: str) -> str:
    """Stable id: sha256 of the URI and its version, 20 hex digits (80 bits: no collisions in practice)."""
    return hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:20]


# --- listing, in pages --------------------------------------------------------------------------


def _manifest_records(uri: str, storage_options: dict[str, Any] | None, page_rows: int) -> Iterator[list[dict[str, Any]]]:
    """A manifest's records (dicts with `uri` and optional `size`, `version`, `etag`), a page at a time."""
    fs, path = filesystem(uri, storage_options)
    lower = uri.lower()
    with call_with_retries(lambda: fs.open(path, "rb"), what=f"opening {uri}") as f:
        if lower.endswith(".parquet"):
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "uri" not in names:
                raise ValueError(f"manifest '{uri}' expected a 'uri' column, but got columns {sorted(names)}")
            wanted = [c for c in ("uri", "size", "version", "etag") if c in names]
            for batch in pf.iter_batches(batch_size=page_rows, columns=wanted):
                yield batch.to_pylist()
            return
        text = io.TextIOWrapper(f, encoding="utf-8", newline="" if lower.endswith(".csv") else None)
        records: Iterator[dict[str, Any]]
        if lower.endswith(".csv"):
            reader = csv.DictReader(text)
            if reader.fieldnames is not None and "uri" not in reader.fieldnames:
                raise ValueError(f"manifest '{uri}' expected a 'uri' column, but got columns {sorted(reader.fieldnames)}")
            records = iter(reader)
        else:
            records = ({"uri": s} for s in (line.strip() for line in text) if s and not s.startswith("#"))
        page: list[dict[str, Any]] = []
        for r in records:
            page.append(r)
            if len(page) >= page_rows:
                yield page
                page = []
        if page:
            yield page


def _manifest_pages(spec: InputSpec, page_rows: int) -> Iterator[list[ListedObject]]:
    """A manifest's image entries as objects, relative entries resolved against its folder."""
    fs, path = filesystem(spec.uri, spec.storage_options)
    folder = unstrip(fs, posixpath.dirname(path)).rstrip("/")
    for records in _manifest_records(spec.uri, spec.storage_options, page_rows):
        page = []
        for r in records:
            entry = str(r["uri"]).strip()
            if "://" not in entry and not entry.startswith("/"):
                entry = folder + "/" + entry
            if entry.rpartition("/")[2].rpartition(".")[2].lower() not in spec.extensions:
                continue
            version = str(r.get("version") or r.get("etag") or r.get("size") or "")
            page.append(ListedObject(uri=entry, size=int(r.get("size") or 0), version=version))
        yield page


class _CommonBase:
    """The deepest folder shared by all URIs seen (same scheme), so manifest outputs mirror their layout."""

    def __init__(self) -> None:
        self.schemes: set[str] = set()
        self.common: str | None = None
        self.mixed = False  # absolute and relative paths: no common folder

    def add(self, uris: list[str]) -> None:
        if not uris:
            return
        folders = {u[: u.rfind("/") + 1] for u in uris}  # a URI's dirname depends only on this part
        self.schemes.update(protocol_of(f) for f in folders)
        dirs = [posixpath.dirname(f.split("://", 1)[-1]) for f in folders]
        if self.common is not None:
            dirs.append(self.common)
        absolute = {d.startswith("/") for d in dirs}
        if len(absolute) > 1:
            self.mixed = True
        if not self.mixed:
            self.common = posixpath.commonpath(dirs)

    @property
    def base(self) -> str:
        if not self.schemes or len(self.schemes) > 1:
            return ""
        common = "" if self.mixed else self.common or ""
        scheme = next(iter(self.schemes))
        return common if scheme == "file" else f"{scheme}://{common}"


def listed_pages(
    spec: InputSpec, page_rows: int, exclude_prefix: str | None = None, counts: PlanCounts | None = None
) -> tuple[str, Iterator[list[ListedObject]]]:
    """(the base URI output keys are relative to, the listed objects a page at a time).

    A manifest is read twice: once for the base (keys need the base of all entries), once for the pages.
    Objects under `exclude_prefix` (the job's own output, :func:`output_prefix`) are left out and
    counted in `counts.excluded`: with `output.uri` inside `input.uri`, every rerun would otherwise list
    the previous outputs as new inputs, and a nightly job would feed on itself.
    """
    if is_manifest(spec.uri):
        tracker = _CommonBase()
        for page in _manifest_pages(spec, page_rows):
            tracker.add([o.uri for o in page])
        base, pages = tracker.base, _manifest_pages(spec, page_rows)
    else:
        objects, base = list_objects(spec.uri, spec.storage_options, spec.extensions)
        pages = (objects[i : i + page_rows] for i in range(0, len(objects), page_rows))
    if not exclude_prefix:
        return base, pages

    def without_outputs() -> Iterator[list[ListedObject]]:
        for page in pages:
            kept = [o for o in page if not o.uri.startswith(exclude_prefix)]
            if counts is not None:
                counts.excluded += len(page) - len(kept)
            yield kept

    return base, without_outputs()


# --- planning ----------------------------------------------------------------------------------


class _Seen:
    """Hashes of the item ids planned so far (duplicates in a manifest are planned once).

    Sorted runs of falling sizes, the newest merged into the one before while at least half its size
    (so about log2(n / page) runs): lookups stay O(log n) per id, memory 8 bytes an id.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def mask(self, hashes: np.ndarray) -> np.ndarray:
        found = np.zeros(hashes.size, dtype=bool)
        for run in self._runs:
            idx = np.minimum(np.searchsorted(run, hashes), run.size - 1)
            found |= run[idx] == hashes
        return found

    def add(self, hashes: np.ndarray) -> None:
        if hashes.size:
            self._runs.append(np.sort(hashes))
        while len(self._runs) > 1 and 2 * self._runs[-1].size >= self._runs[-2].size:
            newest, before = self._runs.pop(), self._runs.pop()
            self._runs.append(sorted_unique([before, newest]))


def output_prefix(output_uri: str, output_options: dict[str, Any] | None) -> str:
    """The output folder as listed URIs spell it, with a trailing '/': what planning leaves out."""
    fs, root = filesystem(output_uri, output_options)
    return unstrip(fs, root.rstrip("/")) + "/"


def plan_pages(
    spec: InputSpec,
    ledger: Ledger | LayerLedgers | None = None,
    counts: PlanCounts | None = None,
    page_rows: int = PAGE_ROWS,
    exclude_prefix: str | None = None,
) -> Iterator[pa.Table]:
    """List the input and yield the work still to do, a page at a time, as tables in :data:`PLAN_SCHEMA`.

    Args:
        spec: The job's `input` section.
        ledger: What the output already holds (:func:`segbatch.outputs.read_ledger`); empty if None. With
            :class:`segbatch.outputs.LayerLedgers` (a several-model job) an item is planned while any
            layer lacks it, and pages carry the `layers` column (:data:`LAYERED_PLAN_SCHEMA`).
        counts: Updated as pages are planned (listed, skipped, new, changed, excluded).
        page_rows: Objects listed per page.
        exclude_prefix: The job's output folder (:func:`output_prefix`): never an input (see
            :func:`listed_pages`); objects under it are counted as `excluded`.

    Raises:
        FileNotFoundError, ValueError, OSError: listing problems (see :func:`listing_errors`).
    """
    ledger = ledger if ledger is not None else Ledger.empty()
    counts = counts if counts is not None else PlanCounts()
    seen = _Seen()
    base, pages = listed_pages(spec, page_rows, exclude_prefix, counts)
    for page in pages:
        if not page:
            continue
        ids = [item_id_for(o.uri, o.version) for o in page]
        hashes = hash64(ids)
        _, first = np.unique(hashes, return_index=True)  # the first of duplicates within the page
        keep = np.zeros(len(page), dtype=bool)
        keep[first] = True
        keep &= ~seen.mask(hashes)
        seen.add(hashes[keep])
        counts.listed += int(keep.sum())
        done = ledger.has_items(hashes)
        counts.skipped += int((keep & done).sum())
        todo = np.flatnonzero(keep & ~done)
        if not todo.size:
            continue
        changed = ledger.had_uris(hash64([page[i].uri for i in todo]))
        unfinished = np.zeros(todo.size, dtype=bool)
        if isinstance(ledger, LayerLedgers):  # this version is in some layers already: neither new nor changed
            unfinished = ledger.has_any(hashes[todo])
            changed &= ~unfinished
            counts.unfinished += int(unfinished.sum())
        counts.changed += int(changed.sum())
        counts.new += int(todo.size - changed.sum() - unfinished.sum())
        rel_keys, errors = [], []
        for i in todo:
            try:
                rel_keys.append(safe_relative_key(page[i].uri, base))
                errors.append("")
            except UnsafeKeyError as e:
                rel_keys.append("")
                errors.append(f"{page[i].uri}: {e}")
        columns: dict[str, Any] = {
            "item_id": [ids[i] for i in todo],
            "uri": [page[i].uri for i in todo],
            "version": [page[i].version for i in todo],
            "size": [page[i].size for i in todo],
            "rel_key": rel_keys,
            "plan_error": errors,
        }
        if isinstance(ledger, LayerLedgers):
            missing = ledger.missing(hashes[todo])
            if not counts.layer_todo:
                counts.layer_todo = [0] * len(ledger.ledgers)
            for k in range(len(ledger.ledgers)):
                counts.layer_todo[k] += int(np.count_nonzero(missing & (1 << k)))
            columns["layers"] = missing
            yield pa.table(columns, schema=LAYERED_PLAN_SCHEMA)
        else:
            yield pa.table(columns, schema=PLAN_SCHEMA)


@dataclass(frozen=True, slots=True)
class ModelLedger:
    """One model of a job (a layer, or the job's one model): the single-model job it equals, its weights'
    digest, its fingerprint and what its output already holds."""

    name: str
    job: JobSpec
    read: WeightsBytes
    fingerprint: str
    ledger: Ledger


def read_job_ledgers(
    spec: JobSpec, *, force: bool = False, run_id: str = ""
) -> tuple[Ledger | LayerLedgers, list[ModelLedger]]:
    """Each model's ledger (weights digested, never built: no torch), and the one planning reads: the
    model's, or for a several-model job the layers' together (:class:`LayerLedgers`).

    Raises:
        JobError: an output holds results of another fingerprint (see :func:`segbatch.outputs.read_ledger`).
    """
    from segbatch.models.source import read_weights

    models: list[ModelLedger] = []
    for name, job in spec.layer_jobs():
        assert job.model is not None
        read = read_weights(job.model)
        fingerprint = job.result_fingerprint(read.sha256)
        o = job.output
        ledger = read_ledger(o.uri, o.storage_options, fingerprint, force=force, run_id=run_id)
        models.append(ModelLedger(name, job, read, fingerprint, ledger))
    if spec.layered:
        return LayerLedgers(tuple(m.ledger for m in models)), models
    return models[0].ledger, models


def write_plan(
    spec: InputSpec,
    ledger: Ledger | LayerLedgers,
    output_uri: str,
    output_options: dict[str, Any] | None,
    run_id: str,
    page_rows: int = PAGE_ROWS,
    tiling: TilingSpec | None = None,
) -> Plan:
    """Plan the input and write its pages to `<output>/runs/<run_id>/plan/part-<seq>.parquet` (whole files).

    The pages are what Ray Data reads (`ray.data.read_parquet`), and they leave the run's plan open
    to inspection afterwards. With `tiling`, every input is a scene and its rows are tile windows
    (:data:`SCENE_PLAN_SCHEMA`, :func:`segbatch.geo.plan.scene_plan_pages`).
    """
    fs, _ = filesystem(output_uri, output_options)
    folder = plan_uri(output_uri, run_id)
    _, folder_path = filesystem(folder, output_options)
    plan = Plan(PlanCounts(), folder)
    exclude = output_prefix(output_uri, output_options)
    pages: Iterator[pa.Table]
    if tiling is not None:
        from segbatch.geo.plan import scene_plan_pages

        plan.schema = SCENE_PLAN_SCHEMA
        pages = scene_plan_pages(spec, tiling, ledger, plan.counts, plan.scenes, page_rows, exclude_prefix=exclude)
    else:
        if isinstance(ledger, LayerLedgers):
            plan.schema = LAYERED_PLAN_SCHEMA
        pages = plan_pages(spec, ledger, plan.counts, page_rows, exclude_prefix=exclude)
    for seq, table in enumerate(pages):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=PLAN_GROUP_ROWS)
        data = sink.getvalue().to_pybytes()
        path = f"{folder_path.rstrip('/')}/part-{seq:05d}.parquet"
        call_with_retries(lambda: write_bytes_atomic(fs, path, data), what=f"writing {unstrip(fs, path)}")  # noqa: B023
        plan.parts.append(unstrip(fs, path))
        plan.part_rows.append(table.num_rows)
    return plan


def read_plan_block(part_uri: str, storage_options: dict[str, Any] | None, start: int, stop: int) -> list[pa.Table]:
    """Rows `[start, stop)` of one plan page: a block for Ray Data (reads only the row groups it overlaps).

    Lives here, not in the pipeline module, so the read tasks never import torch.
    """
    fs, path = filesystem(part_uri, storage_options)

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            groups, first, offset = [], 0, 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset + n > start and offset < stop:
                    first = offset if not groups else first
                    groups.append(g)
                offset += n
            return pf.read_row_groups(groups).slice(start - first, stop - start)

    return [call_with_retries(read, what=f"reading {part_uri}")]


def count_plan(
    spec: InputSpec,
    ledger: Ledger | LayerLedgers | None = None,
    page_rows: int = PAGE_ROWS,
    tiling: TilingSpec | None = None,
    exclude_prefix: str | None = None,
) -> PlanCounts:
    """Plan the input without writing anything: only the counts (`segbatch plan`, `validate --check-storage`).

    With `tiling` the counts are windows (each scene's header is read).
    """
    counts = PlanCounts()
    if tiling is not None:
        from segbatch.geo.plan import scene_plan_pages

        pages: Iterator[pa.Table] = scene_plan_pages(spec, tiling, ledger, counts, None, page_rows, exclude_prefix=exclude_prefix)
    else:
        pages = plan_pages(spec, ledger, counts, page_rows, exclude_prefix=exclude_prefix)
    for _ in pages:
        pass
    return counts


def plan_items(spec: InputSpec, done: set[str] | frozenset[str] = frozenset()) -> tuple[list[WorkItem], int, int]:
    """The plan of a small input as a list of work items, leaving out the ids in `done`.

    Returns:
        (items to process, number listed, number skipped as already done).
    """
    counts = PlanCounts()
    items = [WorkItem(**row) for table in plan_pages(spec, Ledger.of(done), counts) for row in table.to_pylist()]
    return items, counts.listed, counts.skipped


@contextmanager
def listing_errors(uri: str) -> Iterator[None]:
    """Turn a failure to list `uri` into a one-line :class:`JobError`."""
    try:
        yield
    except JobError:
        raise
    except FileNotFoundError as e:
        raise JobError(f"input.uri '{uri}': not found ({e})") from None
    except Exception as e:  # noqa: BLE001 - any failure to list is a job-level problem, reported in one line
        raise JobError(f"cannot list input.uri '{uri}': {type(e).__name__}: {e}") from None
