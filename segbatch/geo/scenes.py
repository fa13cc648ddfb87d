"""The after-stream step of a scene job: finish every scene whose windows are all committed (driver).

For each listed scene (`Plan.scenes`) without a finished row for its version in `scenes/`:

* every window committed `ok` → assemble the label COG (:mod:`segbatch.geo.cog`) to `masks/<rel_key>.tif`,
  polygonize it (:mod:`segbatch.geo.polygons`) to `polygons/<rel_key>.parquet`, and commit a scene row
  with status `ok`;
* a window failed (or the scene was refused while planning) → a scene row with status `error`;
* windows missing (a run stopped early) → nothing yet: the next run plans them and finishes the scene.

Scene rows (:data:`SCENE_SCHEMA`) go to `scenes/part-<run_id>-<seq>.parquet`, one table per run, not
to `metadata/`: `metadata/` is the per-window ledger, one schema for every job; a scene row has other
columns (CRS, windows, polygons). `read_scene_rows` reads them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segbatch.geo.blend import assemble_blended
from segbatch.geo.cog import assemble_labels, label_dtype, put_file, to_cog
from segbatch.geo.plan import PlannedScene, window_item_id
from segbatch.geo.windows import grid, window_key
from segbatch.outputs import MASKS, SCENES, file_metadata, hash64, iter_parts, output_classes, sorted_unique
from segbatch.retry import call_with_retries
from segbatch.storage import filesystem, join_uri, unstrip, write_bytes_atomic

__all__ = ["INSTANCES", "POLYGONS", "SCENE_ROWS", "SCENE_SCHEMA", "finish_scenes", "read_scene_rows"]

logger = logging.getLogger(__name__)

POLYGONS = "polygons"
SCENE_ROWS = SCENES
#: Instance scenes with `output.instance_png`: `instances/<rel_key>.tif`, the instance-id COG.
INSTANCES = "instances"

SCENE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("version", pa.string()),
        ("rel_key", pa.string()),
        ("status", pa.string()),
        ("error_class", pa.string()),
        ("error", pa.string()),
        ("warning", pa.string()),
        ("mask_uri", pa.string()),
        ("polygons_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("crs", pa.string()),
        ("transform", pa.list_(pa.float64())),  # 6 numbers (GDAL order); a plain list: null on error rows, which pyarrow 25 cannot read back as list<6>
        ("windows", pa.int32()),
        ("polygons", pa.int64()),
        ("class_pixels", pa.list_(pa.int64())),
        ("run_id", pa.string()),
        ("assemble_seconds", pa.float64()),
        ("committed_at", pa.timestamp("ms", tz="UTC")),
    ]
)


def read_scene_rows(output_uri: str, storage_options: dict[str, Any] | None) -> pa.Table:
    """Every committed scene row (an empty table when there are none)."""
    fs, root = filesystem(output_uri, storage_options)
    where = f"{root.rstrip('/')}/{SCENE_ROWS}"
    try:
        paths = sorted(p for p in fs.find(where) if p.endswith(".parquet"))
    except FileNotFoundError:
        paths = []
    tables = []
    for p in paths:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f).cast(SCENE_SCHEMA))
    return pa.concat_tables(tables, promote_options="default") if tables else SCENE_SCHEMA.empty_table()


def _window_status(output_uri: str, storage_options: dict[str, Any] | None) -> tuple[np.ndarray, dict[int, str], dict[int, str]]:
    """Sorted hashes of committed ok window ids; failed ids' (hash → error class, message), latest wins."""
    ok: list[np.ndarray] = []
    failed_class: dict[int, str] = {}
    failed_msg: dict[int, str] = {}
    for part in iter_parts(output_uri, storage_options, ["item_id", "status", "error_class", "error"]):
        good = pc.equal(part["status"], "ok")
        ok.append(hash64(part.filter(good)["item_id"]))
        bad = part.filter(pc.invert(good))
        for h, cls, msg in zip(hash64(bad["item_id"]).tolist(), bad["error_class"].to_pylist(), bad["error"].to_pylist()):
            failed_class[h], failed_msg[h] = cls or "", msg or ""
    done = sorted_unique(ok)
    for h in list(failed_class):  # committed ok later (a retry succeeded): not failed
        idx = min(int(np.searchsorted(done, np.uint64(h))), max(done.size - 1, 0))
        if done.size and done[idx] == h:
            failed_class.pop(h), failed_msg.pop(h)
    return done, failed_class, failed_msg


def finish_scenes(run: Any) -> None:
    """The after-stream step (`run_job(after_stream=...)`) of a job with `tiling`; see the module docstring."""
    spec, plan = run.spec, run.plan
    scenes: list[PlannedScene] = plan.scenes
    if not scenes:
        return
    o = spec.output
    finished = read_scene_rows(o.uri, o.storage_options)
    finished_keys = {
        (u, v) for u, v, s in zip(finished["uri"].to_pylist(), finished["version"].to_pylist(), finished["status"].to_pylist())
    }
    todo = [s for s in scenes if (s.uri, s.version) not in finished_keys]
    if not todo:
        return
    done, failed_class, failed_msg = _window_status(o.uri, o.storage_options)
    classes, num_classes = _classes(run)
    dtype = label_dtype(num_classes)
    rows: list[dict[str, Any]] = []
    for scene in todo:
        row = _finish_one(scene, spec, done, failed_class, failed_msg, classes, dtype, run.run_id)
        if row is not None:
            rows.append(row)
    if rows:
        now = datetime.now(timezone.utc)
        for r in rows:
            r["committed_at"] = now
        table = pa.Table.from_pylist(rows, schema=SCENE_SCHEMA)
        fs, root = filesystem(o.uri, o.storage_options)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        path = f"{root.rstrip('/')}/{SCENE_ROWS}/part-{run.run_id}.parquet"
        call_with_retries(lambda: write_bytes_atomic(fs, path, data), what=f"writing {unstrip(fs, path)}")
        logger.info("finished %d scene(s): %d ok", len(rows), sum(r["status"] == "ok" for r in rows))


def _classes(run: Any) -> tuple[list[str], int]:
    """Class names and count: from the model proved this run; when nothing was streamed (a rerun that only
    finishes scenes whose windows an earlier, killed run committed), from the committed parts' metadata,
    which every run writes (then the job's `model.num_classes` when the weights name no classes)."""
    if run.weights is not None:
        return list(run.weights.classes or []), run.weights.num_classes
    o = run.spec.output
    classes = output_classes(file_metadata(o.uri, o.storage_options))
    return classes, len(classes) or run.spec.model.num_classes or 255


def _finish_one(
    scene: PlannedScene,
    spec: Any,
    done: np.ndarray,
    failed_class: dict[int, str],
    failed_msg: dict[int, str],
    classes: list[str],
    dtype: str,
    run_id: str,
) -> dict[str, Any] | None:
    t = spec.tiling
    base: dict[str, Any] = {
        "uri": scene.uri, "version": scene.version, "rel_key": scene.rel_key, "run_id": run_id,
        "windows": scene.windows, "status": "error", "error_class": None, "error": None, "warning": None, "mask_uri": None,
        "polygons_uri": None, "width": 0, "height": 0, "crs": None, "transform": None, "polygons": None,
        "class_pixels": None, "assemble_seconds": None,
    }
    h = scene.header
    if h is None:  # refused while planning: its one error row says why
        from segbatch.geo.plan import scene_item_id

        key = int(hash64([scene_item_id(scene.uri, scene.version)])[0])
        base["error_class"] = failed_class.get(key, "unreadable")
        base["error"] = failed_msg.get(key, f"{scene.uri}: scene could not be planned")
        return base
    base.update(width=h.width, height=h.height, crs=h.crs_wkt, transform=list(h.transform))
    if not h.georeferenced:
        base["warning"] = f"{scene.uri}: not georeferenced (no CRS): the COG and the polygons are in pixel coordinates"
    wins = grid(h.width, h.height, t.size, t.overlap, h.block)
    hashes = hash64([window_item_id(scene.uri, scene.version, window_key(w)) for w in wins])
    idx = np.minimum(np.searchsorted(done, hashes), max(done.size - 1, 0))
    ok = (done[idx] == hashes) if done.size else np.zeros(len(wins), bool)
    if ok.all():
        return _assemble(scene, spec, classes, dtype, base)
    bad = [int(x) for x in hashes[~ok] if int(x) in failed_class]
    if bad:
        base["error_class"] = failed_class[bad[0]]
        base["error"] = f"{len(bad)} of {len(wins)} windows failed; first: {failed_msg[bad[0]]}"
        return base
    logger.warning("%s: %d of %d windows not committed yet; the next run finishes the scene", scene.uri, int((~ok).sum()), len(wins))
    return None


def _assemble(scene: PlannedScene, spec: Any, classes: list[str], dtype: str, base: dict[str, Any]) -> dict[str, Any]:
    from segbatch.geo.polygons import polygonize, write_geoparquet

    o, t = spec.output, spec.tiling
    started = time.time()
    if spec.model.task == "instance":
        return _assemble_instances(scene, spec, classes, base, started)
    mask_uri = join_uri(o.uri, MASKS, f"{scene.rel_key}.tif")
    try:
        with tempfile.TemporaryDirectory(prefix="segbatch-scene-") as tmp:
            raw, cog = Path(tmp) / "labels.tif", Path(tmp) / "cog.tif"
            assemble = assemble_blended if t.blend == "weighted" else assemble_labels
            assemble(scene.header, o.uri, o.storage_options, scene.rel_key, t.size, t.overlap, dtype, raw)  # type: ignore[arg-type]
            to_cog(raw, cog, classes)
            raw.unlink()
            put_file(cog, mask_uri, o.storage_options)
            base["mask_uri"] = mask_uri
            if t.polygons:
                labels, polys, crs, _ = polygonize(cog, t.polygon_window)
                gpq = Path(tmp) / "polygons.parquet"
                base["polygons"] = write_geoparquet(gpq, labels, polys, crs, classes, scene.rel_key, scene.uri)
                poly_uri = join_uri(o.uri, POLYGONS, f"{scene.rel_key}.parquet")
                put_file(gpq, poly_uri, o.storage_options)
                base["polygons_uri"] = poly_uri
        base["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one scene's failure is its row, the others go on
        logger.exception("%s: cannot assemble the scene", scene.uri)
        base.update(status="error", error_class="write_failed", error=f"{scene.uri}: cannot assemble: {type(e).__name__}: {e}")
    base["assemble_seconds"] = round(time.time() - started, 3)
    return base


def _assemble_instances(scene: PlannedScene, spec: Any, classes: list[str], base: dict[str, Any], started: float) -> dict[str, Any]:
    """Instance scenes: the owned objects of every window, seam pieces merged, as GeoParquet polygons."""
    import shapely.affinity

    from segbatch.geo.instances import scene_objects
    from segbatch.geo.polygons import write_geoparquet
    from segbatch.geo.stitch import part_uri

    o, t, h = spec.output, spec.tiling, scene.header
    try:
        fs, _ = filesystem(o.uri, o.storage_options)
        parts = []
        for w in grid(h.width, h.height, t.size, t.overlap, h.block):
            _, p = filesystem(part_uri(o.uri, scene.rel_key, w, "json"), o.storage_options)
            parts.append(bytes(call_with_retries(lambda: fs.cat_file(p), what=f"reading {p}")))  # noqa: B023
        labels, scores, polys = scene_objects(parts)
        a = h.transform
        world = [shapely.affinity.affine_transform(p, [a[0], a[1], a[3], a[4], a[2], a[5]]) for p in polys]
        from rasterio.crs import CRS

        crs = CRS.from_wkt(h.crs_wkt) if h.crs_wkt else None
        with tempfile.TemporaryDirectory(prefix="segbatch-scene-") as tmp:
            gpq = Path(tmp) / "polygons.parquet"
            base["polygons"] = write_geoparquet(gpq, labels, world, crs, classes, scene.rel_key, scene.uri, scores, instance_ids=True)
            poly_uri = join_uri(o.uri, POLYGONS, f"{scene.rel_key}.parquet")
            put_file(gpq, poly_uri, o.storage_options)
            if o.instance_png:  # the objects as an instance-id COG: pixel value = the row's instance_id
                from segbatch.geo.instances import write_instance_raster

                raw, cog = Path(tmp) / "instances.tif", Path(tmp) / "instances-cog.tif"
                write_instance_raster(h, polys, scores, raw, t.polygon_window)
                to_cog(raw, cog, classes)
                put_file(cog, join_uri(o.uri, INSTANCES, f"{scene.rel_key}.tif"), o.storage_options)
        base.update(status="ok", polygons_uri=poly_uri)
    except Exception as e:  # noqa: BLE001 - one scene's failure is its row
        logger.exception("%s: cannot assemble the scene", scene.uri)
        base.update(status="error", error_class="write_failed", error=f"{scene.uri}: cannot assemble: {type(e).__name__}: {e}")
    base["assemble_seconds"] = round(time.time() - started, 3)
    return base
