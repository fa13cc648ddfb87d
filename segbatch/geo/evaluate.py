"""`segbatch eval` for scene outputs: label COGs against truth rasters, polygons against truth polygons.

The truth mirrors a scene job's outputs: `TRUTH/labels/<rel_key>.tif` (a label raster of the scene's
size; 255 = nodata, left out of the scores) and `TRUTH/polygons/<rel_key>.geojson` (or `.parquet`),
features with a `label`. `segbatch.synth.write_geo_scene(..., truth=TRUTH)` writes both.

- **pixels**: a confusion matrix over every scene, read by windows of :data:`EVAL_WINDOW` pixels (never
  a whole raster), then per-class IoU, mIoU, mIoU_fg and pixel accuracy
  (:func:`segbatch.evaluate.iou_metrics`);
- **objects**: truth polygons against predicted ones of the same class, matched one-to-one, greedily
  by IoU >= :data:`MATCH_IOU` (candidates from a shapely STRtree): counts, matches, precision, recall.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from segbatch.errors import JobError
from segbatch.evaluate import confusion_matrix, iou_metrics
from segbatch.geo.scenes import read_scene_rows
from segbatch.outputs import latest_rows
from segbatch.storage import filesystem

__all__ = ["EVAL_WINDOW", "MATCH_IOU", "evaluate_scenes", "format_scene_report", "match_polygons"]

EVAL_WINDOW = 2048
MATCH_IOU = 0.5


def match_polygons(truth: Any, pred: Any, threshold: float = MATCH_IOU) -> int:
    """One-to-one matches between two GeoDataFrames (`label`, `geometry`) of the same class, IoU >= threshold."""
    import shapely

    if len(truth) == 0 or len(pred) == 0:
        return 0
    tree = shapely.STRtree(list(pred.geometry))
    pairs: list[tuple[float, int, int]] = []
    for i, (geom, label) in enumerate(zip(truth.geometry, truth["label"])):
        for j in tree.query(geom):
            if int(pred["label"].iloc[j]) != int(label):
                continue
            other = pred.geometry.iloc[j]
            inter = geom.intersection(other).area
            union = geom.union(other).area
            if union > 0 and inter / union >= threshold:
                pairs.append((inter / union, i, int(j)))
    used_t: set[int] = set()
    used_p: set[int] = set()
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
    return len(used_t)


def _local(uri: str, options: dict[str, Any] | None) -> tuple[Any, str]:
    fs, path = filesystem(uri, options)
    return fs, path


def evaluate_scenes(output_uri: str, truth_uri: str, classes: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every finished scene under `output_uri` against `truth_uri` (see the module docstring)."""
    import geopandas as gpd
    import rasterio
    from rasterio.windows import Window

    rows = read_scene_rows(output_uri, storage_options)
    if rows.num_rows == 0:
        raise JobError(f"segbatch eval: no scene rows under '{output_uri}/scenes/'")
    rows = latest_rows(rows.filter(pc.equal(rows["status"], "ok")), by="uri").to_pylist()
    tfs, troot = filesystem(truth_uri, None)
    troot = troot.rstrip("/")
    n = max(len(classes), 1)
    cm = np.zeros((256, 257), np.int64)
    per_scene: list[dict[str, Any]] = []
    objects = {"truth": 0, "predicted": 0, "matched": 0}
    missing: list[str] = []
    for row in rows:
        key = row["rel_key"]
        truth_raster = f"{troot}/labels/{key}.tif"
        if not tfs.exists(truth_raster):
            missing.append(key)
            continue
        with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(truth_raster) as t, rasterio.open(row["mask_uri"]) as p:
            if (t.width, t.height) != (p.width, p.height):
                raise JobError(f"segbatch eval: truth {truth_raster} is {t.width}x{t.height}, the scene {p.width}x{p.height}")
            for y in range(0, t.height, EVAL_WINDOW):
                for x in range(0, t.width, EVAL_WINDOW):
                    w = Window(x, y, min(EVAL_WINDOW, t.width - x), min(EVAL_WINDOW, t.height - y))
                    truth, pred = t.read(1, window=w), p.read(1, window=w)
                    keep = truth != 255  # truth nodata: not scored
                    scored, nopred = keep & (pred != 255), keep & (pred == 255)  # predicted nodata: no prediction
                    cm += confusion_matrix(truth[scored].astype(np.int64), pred[scored].astype(np.int64), 256)
                    cm[:, 256] += np.bincount(truth[nopred].astype(np.int64), minlength=256)[:256]
        scene_objects: dict[str, Any] = {}
        for ext in ("geojson", "parquet"):
            tpoly = f"{troot}/polygons/{key}.{ext}"
            if tfs.exists(tpoly) and row["polygons_uri"]:
                truth_frame = gpd.read_parquet(tpoly) if ext == "parquet" else gpd.read_file(tpoly)
                pred_frame = gpd.read_parquet(row["polygons_uri"])
                matched = match_polygons(truth_frame, pred_frame)
                scene_objects = {"truth": len(truth_frame), "predicted": len(pred_frame), "matched": matched}
                for k in objects:
                    objects[k] += scene_objects[k]
                break
        per_scene.append({"rel_key": key, "objects": scene_objects})
    used = max(n, int(np.flatnonzero(cm[:, :256].sum(0) + cm[:, :256].sum(1)).max(initial=0)) + 1)
    names = list(classes) + [f"class {c}" for c in range(len(classes), used)]
    small = cm[:used, :used]
    small = np.concatenate([small, cm[:used, 256:257]], axis=1)
    metrics = iou_metrics(small, names)
    precision = objects["matched"] / objects["predicted"] if objects["predicted"] else None
    recall = objects["matched"] / objects["truth"] if objects["truth"] else None
    return {
        "kind": "scenes",
        "metrics": {k: v for k, v in metrics.items() if k != "per_class"},
        "per_class": metrics["per_class"],
        "objects": {**objects, "precision": precision, "recall": recall, "match_iou": MATCH_IOU},
        "images": {"truth": len(rows) - len(missing), "evaluated": len(rows) - len(missing), "missing": 0,
                   "size_mismatch": 0, "without_truth": len(missing)},
        "scenes": per_scene,
        "examples": {"without_truth": missing[:5]},
    }


def format_scene_report(report: dict[str, Any]) -> str:
    """The lines a person reads for a scene report."""
    m, o = report["metrics"], report["objects"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        f"segbatch eval: scene outputs {report['output']} vs truth {report['truth']}",
        f"  scenes     evaluated {report['images']['evaluated']} · without truth {report['images']['without_truth']}",
        f"  mIoU {fmt(m['mIoU'])} · mIoU (foreground) {fmt(m['mIoU_fg'])} · pixel accuracy {fmt(m['pixel_accuracy'])}",
        f"  objects    truth {o['truth']} · predicted {o['predicted']} · matched {o['matched']} (IoU >= {o['match_iou']}) · "
        f"precision {fmt(o['precision'])} · recall {fmt(o['recall'])}",
        f"  {'class':<14} {'IoU':>6} {'truth px':>10} {'pred px':>10}",
    ]
    for name, c in report["per_class"].items():
        if c["truth_pixels"] or c["pred_pixels"]:
            lines.append(f"  {name:<14} {fmt(c['iou']):>6} {c['truth_pixels']:>10} {c['pred_pixels']:>10}")
    return "\n".join(lines)
