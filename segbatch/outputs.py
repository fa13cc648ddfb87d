"""What an output folder holds, and the one reader of it.

Layout under a job's `output.uri` (folder names are the constants below; nothing else spells them):

    masks/<rel_key>.png                     label maps (semantic) or instance-id maps (`instance_png`)
    metadata/part-<run_id>-<seq>.parquet    every finished row, in :data:`METADATA_SCHEMA` (the ledger)
    errors/part-<run_id>-<seq>.parquet      the error rows again
    runs/<run_id>.json                      the run manifest
    runs/<run_id>/plan/part-<seq>.parquet   the run's plan: the work items it fed to Ray
    scenes/part-<run_id>.parquet            scene jobs: one row per scene (segbatch.geo.scenes)
    superseded/<run_id>/{metadata,errors,scenes}/  parts moved aside by `--force`

Resume, `--force`, `segbatch eval` and exports read committed outputs only through this module:
:func:`read_rows` (a table), :func:`iter_parts` (part by part, for scale), :func:`latest_rows` (one row
per item key, the latest commit), :func:`file_metadata` / :func:`output_classes` / :func:`output_task`,
and :func:`read_ledger` (what a new run may skip, held as 64-bit hashes, not strings).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segbatch.errors import JobError
from segbatch.retry import call_with_retries
from segbatch.storage import filesystem, join_uri, unstrip

__all__ = [
    "ERRORS",
    "MASKS",
    "METADATA",
    "METADATA_SCHEMA",
    "PLAN",
    "RUNS",
    "SCHEMA_VERSION",
    "SUPERSEDED",
    "LayerLedgers",
    "Ledger",
    "file_metadata",
    "hash64",
    "layer_names",
    "layer_output",
    "iter_parts",
    "latest_rows",
    "manifest_uri",
    "metadata_parts",
    "output_classes",
    "output_task",
    "plan_uri",
    "read_ledger",
    "read_rows",
    "sorted_unique",
    "supersede",
]

logger = logging.getLogger(__name__)

MASKS = "masks"
METADATA = "metadata"
ERRORS = "errors"
RUNS = "runs"
PLAN = "plan"
SUPERSEDED = "superseded"
#: Scene jobs' per-scene rows (:mod:`segbatch.geo.scenes`): moved aside by `--force` too, so every scene is finished again.
SCENES = "scenes"

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
        # A plain list, not list<4> like `bbox`: it is null in version-1 rows until upgraded, and
        # pyarrow 25 writes a null fixed-size list it then refuses to read back.
        ("detector_bbox", pa.list_(pa.float32())),
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
        # Several-model jobs: 1 - IoU of this image's semantic and instance foregrounds (both layers' rows
        # carry it); null for one-model jobs, and in parts written before it existed (read as null).
        ("layer_disagreement", pa.float32()),
    ]
)


def layer_names(output_uri: str, storage_options: dict[str, Any] | None) -> list[str]:
    """The layers of a several-model job's output (folders holding a `metadata/` folder), sorted; [] for a
    one-model output (which has its own `metadata/`) or a folder that does not exist.

    A listing first (not a HEAD request): a storage problem then reads as every other reader words it.
    """
    fs, root = filesystem(output_uri, storage_options)
    root = root.rstrip("/")
    try:
        entries = call_with_retries(lambda: fs.ls(root, detail=True), what=f"listing {output_uri}")
    except FileNotFoundError:
        return []
    folders = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["name"].rstrip("/") for e in entries if e.get("type") == "directory"}
    if METADATA in folders:
        return []
    return sorted(name for name, path in folders.items() if name != RUNS and fs.exists(f"{path}/{METADATA}"))


def layer_output(output_uri: str, storage_options: dict[str, Any] | None, layer: str | None) -> str:
    """Where a command reads a layer: `OUTPUT/<layer>` of a several-model output (the only layer when it has
    one), or `OUTPUT` itself for a one-model output (whose single layer `--layer` may name by its task).

    Raises:
        JobError: `layer` is not one of the output's layers, or the output has several and none was named.
    """
    names = layer_names(output_uri, storage_options)
    if not names:
        if layer is not None:
            task = output_task(file_metadata(output_uri, storage_options))
            if layer != task:
                raise JobError(
                    f"--layer expected one of the output's layers ['{task}'], but got '{layer}' "
                    f"('{output_uri}' holds one model's results, named by their task)"
                )
        return output_uri
    if layer is None:
        if len(names) == 1:
            return join_uri(output_uri, names[0])
        raise JobError(f"'{output_uri}' holds the layers {names} of a several-model job: pass --layer NAME")
    if layer not in names:
        raise JobError(f"--layer expected one of the output's layers {names}, but got '{layer}'")
    return join_uri(output_uri, layer)


def manifest_uri(output_uri: str, run_id: str) -> str:
    """`<output>/runs/<run_id>.json`."""
    return join_uri(output_uri, RUNS, f"{run_id}.json")


def plan_uri(output_uri: str, run_id: str) -> str:
    """`<output>/runs/<run_id>/plan`: the folder of a run's plan pages."""
    return join_uri(output_uri, RUNS, run_id, PLAN)


def _part_paths(fs: Any, root: str, folder: str) -> list[str]:
    """Sorted paths of the Parquet parts in `<root>/<folder>` (empty when the folder does not exist)."""
    where = f"{root.rstrip('/')}/{folder}"
    try:
        found = call_with_retries(lambda: fs.find(where), what=f"listing {unstrip(fs, where)}")
    except FileNotFoundError:
        return []
    return sorted(p for p in found if p.endswith(".parquet"))


def metadata_parts(output_uri: str, storage_options: dict[str, Any] | None) -> list[str]:
    """URIs of the committed metadata parts, in name order (run id, then sequence)."""
    fs, root = filesystem(output_uri, storage_options)
    return [unstrip(fs, p) for p in _part_paths(fs, root, METADATA)]


def _schema(columns: list[str] | None) -> pa.Schema:
    return pa.schema([METADATA_SCHEMA.field(c) for c in columns]) if columns else METADATA_SCHEMA


def iter_parts(
    output_uri: str,
    storage_options: dict[str, Any] | None,
    columns: list[str] | None = None,
    *,
    parts: list[str] | None = None,
) -> Iterator[pa.Table]:
    """Each committed metadata part as a table of `columns` (all when None), cast to :data:`METADATA_SCHEMA`.

    One part is in memory at a time: the way to read an output of any size. `parts` (URIs from
    :func:`metadata_parts`) reads exactly those, in that order: readers that pass over an output twice
    (exports) see the same rows both times while a run keeps committing new parts.
    """
    fs, root = filesystem(output_uri, storage_options)
    schema = _schema(columns)
    # Version 1 instances are upgraded from their RLE, which needs the image size.
    wanted = columns if columns is None or "instances" not in columns else sorted({*columns, "height", "width"})

    def read_part(path: str) -> pa.Table:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            present = set(pf.schema_arrow.names)
            table = pf.read(columns=None if wanted is None else [c for c in wanted if c in present])
        for name in schema.names:  # a column added since the part was written reads as nulls
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
        return table

    paths = _part_paths(fs, root, METADATA) if parts is None else [filesystem(u, storage_options)[1] for u in parts]
    for p in paths:
        t = call_with_retries(lambda: read_part(p), what=f"reading {unstrip(fs, p)}")  # noqa: B023 - called at once
        if "instances" in schema.names and (t.schema.metadata or {}).get(b"segbatch.schema_version", b"1") == b"1":
            t = _instances_from_v1(t)
        yield t.select(schema.names).cast(schema)


def _instances_from_v1(table: pa.Table) -> pa.Table:
    """Version 1 parts stored the detector's box as `bbox`: it becomes `detector_bbox`, and `bbox` the
    mask's own box (from its RLE), so old outputs read as new ones (resume, eval, exports)."""
    from pycocotools import mask as mask_util

    upgraded = []
    for row in table.select(["height", "width", "instances"]).to_pylist():
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


def read_rows(output_uri: str, storage_options: dict[str, Any] | None, columns: list[str] | None = None) -> pa.Table:
    """All committed metadata rows under an output prefix (an empty table when there are none)."""
    tables = list(iter_parts(output_uri, storage_options, columns))
    return pa.concat_tables(tables) if tables else _schema(columns).empty_table()


def latest_rows(table: pa.Table, by: str = "uri") -> pa.Table:
    """One row per value of `by` (default the item's URI): the one committed last, in commit order.

    A rerun after a change, or `--force`, commits an item again; readers want its newest result.
    Ties in `committed_at` go to the row read later.
    """
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        table.append_column("_row", pa.array(np.arange(table.num_rows))),
        sort_keys=[(by, "ascending"), ("committed_at", "ascending"), ("_row", "ascending")],
    )
    keys = pc.take(table[by], order).to_numpy(zero_copy_only=False)
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = keys[:-1] != keys[1:]
    picked = table.take(pc.take(order, pa.array(np.flatnonzero(last))))
    return picked.take(pc.sort_indices(picked, sort_keys=[("committed_at", "ascending")]))


def file_metadata(output_uri: str, storage_options: dict[str, Any] | None) -> dict[str, str]:
    """Key-value metadata of the newest committed part (`segbatch.task`, `segbatch.classes`,
    `segbatch.schema_version`); empty when nothing is committed."""
    fs, root = filesystem(output_uri, storage_options)
    parts = _part_paths(fs, root, METADATA)
    if not parts:
        return {}
    with fs.open(parts[-1], "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def output_classes(meta: dict[str, str]) -> list[str]:
    """Class names from :func:`file_metadata` (index = label); empty when the weights named none."""
    try:
        return [str(c) for c in json.loads(meta.get("segbatch.classes", "null")) or []]
    except ValueError:
        return []


def output_task(meta: dict[str, str]) -> str | None:
    """The task (`semantic` / `instance`) from :func:`file_metadata`."""
    return meta.get("segbatch.task")


def hash64(values: Iterable[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes (uint64) of strings, vectorised (pandas' SipHash with its fixed key: stable across runs).

    The ledger keeps these instead of strings: 8 bytes an item. Two different ids share a hash with
    probability ~n/2⁶⁴ per lookup (5·10⁻¹² at n = 10⁸), which would skip one item.
    """
    from pandas.util import hash_array

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        array = values.to_numpy(zero_copy_only=False).astype(object)
    else:
        array = np.asarray(list(values), dtype=object)
    if array.size == 0:
        return np.zeros(0, dtype=np.uint64)
    return hash_array(array, categorize=False)


def sorted_unique(parts: list[np.ndarray]) -> np.ndarray:
    """The sorted distinct values of several uint64 arrays; `parts` is emptied (peak: about twice the total)."""
    if not parts:
        return np.zeros(0, dtype=np.uint64)
    merged = np.concatenate(parts)
    parts.clear()
    merged.sort(kind="stable")  # timsort: concatenated sorted runs merge in about linear time
    if merged.size < 2:
        return merged
    keep = np.empty(merged.size, dtype=bool)
    keep[0] = True
    np.not_equal(merged[1:], merged[:-1], out=keep[1:])
    return merged[keep]


def _member(sorted_hashes: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    if sorted_hashes.size == 0 or hashes.size == 0:
        return np.zeros(hashes.size, dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_hashes, hashes), sorted_hashes.size - 1)
    return sorted_hashes[idx] == hashes


@dataclass(frozen=True, slots=True)
class Ledger:
    """What an output already holds, as sorted 64-bit hashes: committed item ids and their URIs.

    16 bytes per committed item, whatever the lengths of ids and URIs (a set of 50M strings would take
    several GB on the driver).
    """

    done: np.ndarray
    uris: np.ndarray

    @classmethod
    def empty(cls) -> "Ledger":
        return cls(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64))

    @classmethod
    def of(cls, item_ids: Iterable[str], uris: Iterable[str] = ()) -> "Ledger":
        """A ledger from ids (and URIs) in memory (tests, small jobs)."""
        return cls(sorted_unique([hash64(item_ids)]), sorted_unique([hash64(uris)]))

    def __len__(self) -> int:
        return int(self.done.size)

    def has_items(self, item_id_hashes: np.ndarray) -> np.ndarray:
        """Per hashed item id: committed already?"""
        return _member(self.done, item_id_hashes)

    def had_uris(self, uri_hashes: np.ndarray) -> np.ndarray:
        """Per hashed URI: was any version of it committed before? (a new version is "changed")"""
        return _member(self.uris, uri_hashes)


@dataclass(frozen=True, slots=True)
class LayerLedgers:
    """A several-model job's ledgers, one per layer (`layers:`): an item is done only once every layer
    holds it, and a rerun runs an item through the layers that lack it (:meth:`missing`), no others."""

    ledgers: tuple[Ledger, ...]

    def __len__(self) -> int:
        return sum(len(ledger) for ledger in self.ledgers)

    def has_items(self, item_id_hashes: np.ndarray) -> np.ndarray:
        """Per hashed item id: committed in every layer?"""
        done = np.ones(item_id_hashes.size, dtype=bool)
        for ledger in self.ledgers:
            done &= ledger.has_items(item_id_hashes)
        return done

    def has_any(self, item_id_hashes: np.ndarray) -> np.ndarray:
        """Per hashed item id: committed in at least one layer?"""
        found = np.zeros(item_id_hashes.size, dtype=bool)
        for ledger in self.ledgers:
            found |= ledger.has_items(item_id_hashes)
        return found

    def had_uris(self, uri_hashes: np.ndarray) -> np.ndarray:
        """Per hashed URI: was any version of it committed before, in any layer?"""
        had = np.zeros(uri_hashes.size, dtype=bool)
        for ledger in self.ledgers:
            had |= ledger.had_uris(uri_hashes)
        return had

    def missing(self, item_id_hashes: np.ndarray) -> np.ndarray:
        """Per hashed item id: a bit mask of the layers (bit k = layer k) that lack it."""
        bits = np.zeros(item_id_hashes.size, dtype=np.int64)
        for k, ledger in enumerate(self.ledgers):
            bits |= np.where(ledger.has_items(item_id_hashes), 0, 1 << k)
        return bits


def read_ledger(
    output_uri: str, storage_options: dict[str, Any] | None, fingerprint: str, *, force: bool = False, run_id: str = ""
) -> Ledger:
    """Committed items under the output, part by part, refusing results from a different model setup.

    With `force`, earlier parts are moved aside to `superseded/<run_id>/` (never deleted) and the
    ledger is empty: everything is redone.

    Raises:
        JobError: the output holds results with another fingerprint (model, weights or preprocessing).
    """
    if force:
        fs, root = filesystem(output_uri, storage_options)
        if _part_paths(fs, root, METADATA):
            supersede(output_uri, storage_options, run_id)
        return Ledger.empty()
    done: list[np.ndarray] = []
    uris: list[np.ndarray] = []
    others: set[str] = set()
    for part in iter_parts(output_uri, storage_options, ["item_id", "uri", "fingerprint"]):
        others.update(f for f in pc.unique(part["fingerprint"]).to_pylist() if f != fingerprint)
        done.append(np.unique(hash64(part["item_id"])))
        uris.append(np.unique(hash64(part["uri"])))
    if others:
        raise JobError(
            f"output.uri '{output_uri}' already holds results made with another model, weights or "
            f"preprocessing (fingerprint {sorted(others)[0]}, this job's is {fingerprint}); "
            "write to a new output.uri, or pass --force to redo everything (earlier results are kept "
            f"under {SUPERSEDED}/)"
        )
    return Ledger(sorted_unique(done), sorted_unique(uris))


def supersede(output_uri: str, storage_options: dict[str, Any] | None, run_id: str) -> None:
    """Move every metadata, errors and scene-row part to `superseded/<run_id>/` (never deleted)."""
    fs, root = filesystem(output_uri, storage_options)
    root = root.rstrip("/")
    for folder in (METADATA, ERRORS, SCENES):
        parts = _part_paths(fs, root, folder)
        if not parts:
            continue
        target = f"{root}/{SUPERSEDED}/{run_id}/{folder}"
        fs.makedirs(target, exist_ok=True)
        for part in parts:
            fs.mv(part, f"{target}/{part.rsplit('/', 1)[1]}")
    logger.warning("--force: earlier results moved to %s/%s/%s/", output_uri.rstrip("/"), SUPERSEDED, run_id)
