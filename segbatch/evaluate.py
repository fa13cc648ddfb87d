"""`segbatch eval`: score a job's committed outputs against ground truth.

The task comes from the outputs' `task` column. Predictions are matched to the truth by the image's
key relative to `input.uri` (the `rel_key` column), which is how the truth names images too:

- **semantic**: per-class IoU and mIoU over all pixels of all images, from the mask PNGs
  (`mask_uri`) against ground-truth label maps at `TRUTH/labels/<rel_key>.png` (or
  `TRUTH/<rel_key>.png` when TRUTH has no `labels/` folder) — the layout of a job's `masks/`.
- **scenes** (a job with `tiling`): label COGs against `TRUTH/labels/<rel_key>.tif` and polygons
  against `TRUTH/polygons/<rel_key>.geojson` (:mod:`segbatch.geo.evaluate`).
- **instance**: COCO mask (`segm`) and box (`bbox`) AP, AP50, AP75, APs/APm/APl and AR@100 through
  pycocotools' COCOeval, against a COCO instances JSON (TRUTH is the JSON file, or a folder holding
  `instances.json`), whose images' `file_name` is the `rel_key`. Per-class AP and AP50 as well.

The truth defines the image set. An image with truth but no usable prediction (no row, an error row,
or a mask of another size) counts as predicting nothing: every truth pixel is missed (semantic), every
object is a false negative (instance). Predictions for images without truth are ignored and counted.
`segbatch.synth.write_dataset` writes a folder that serves as TRUTH for both tasks.

mIoU is the mean IoU over classes that occur in the truth or the predictions (background included);
`mIoU_fg` leaves out background (class 0).

Example:
    >>> from segbatch.evaluate import evaluate_output, format_report  # doctest: +SKIP
    >>> report = evaluate_output("out/semantic", "data/truth")  # doctest: +SKIP
    >>> print(format_report(report))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import posixpath
from datetime import datetime, timezone
from typing import Any

import numpy as np

from segbatch.errors import JobError
from segbatch.masks import decode_png_label_map
from segbatch.outputs import METADATA, file_metadata, latest_rows, output_classes, read_rows
from segbatch.storage import filesystem, unstrip, write_bytes_atomic

__all__ = [
    "REPORT_NAME",
    "coco_metrics",
    "confusion_matrix",
    "evaluate_output",
    "format_report",
    "iou_metrics",
    "write_report",
]

logger = logging.getLogger(__name__)

#: The report's file name under the output prefix.
REPORT_NAME = "eval.json"
_COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_SHOWN_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APtiny", "AR100")
#: Objects with an area of at most TINY_SIDE² pixels form the "tiny" area range (`APtiny`, `AP50tiny`).
TINY_SIDE = 24
#: Subsets reported when the truth's annotations carry these fields (segbatch.synth writes them):
#: objects with at least SUBSET_MIN of their pixels hidden by others, or of their area outside the image.
_SUBSETS = {"occluded": "occluded_fraction", "cut": "cut_fraction"}
SUBSET_MIN = 0.1
_SUBSET_WORDS = {"occluded": "hidden by other objects", "cut": "outside the image"}


# --- metric maths (pure: used by the command and by training/) -----------------------------------


def confusion_matrix(truth: np.ndarray, pred: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Pixel counts `cm[t, p]` of truth class t predicted as p, shape (num_classes, num_classes + 1).

    The last column counts pixels with no prediction (`pred` None: the whole image). Predicted labels
    at or above `num_classes` are not expected: size `num_classes` to cover both maps.
    """
    cm = np.zeros((num_classes, num_classes + 1), np.int64)
    t = truth.astype(np.int64).ravel()
    if pred is None:
        cm[:, num_classes] += np.bincount(t, minlength=num_classes)[:num_classes]
        return cm
    p = pred.astype(np.int64).ravel()
    cm[:, :num_classes] += np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )
    return cm


def iou_metrics(cm: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Per-class IoU and mIoU from a :func:`confusion_matrix` (summed over images).

    IoU(c) = cm[c, c] / (truth pixels of c + predicted pixels of c - cm[c, c]); classes with neither
    truth nor predicted pixels get None and stay out of the means.

    Returns:
        `{"mIoU", "mIoU_fg", "pixel_accuracy", "per_class": {name: {"iou", "truth_pixels", "pred_pixels"}}}`.
    """
    k = cm.shape[0]
    inter = np.diag(cm[:, :k]).astype(np.float64)
    truth = cm.sum(axis=1).astype(np.float64)
    pred = cm[:, :k].sum(axis=0).astype(np.float64)
    union = truth + pred - inter
    per_class: dict[str, Any] = {}
    ious: list[float | None] = []
    for c in range(k):
        iou = float(inter[c] / union[c]) if union[c] > 0 else None
        ious.append(iou)
        name = classes[c] if c < len(classes) else f"class {c}"
        per_class[name] = {"id": c, "iou": iou, "truth_pixels": int(truth[c]), "pred_pixels": int(pred[c])}
    present = [v for v in ious if v is not None]
    present_fg = [v for v in ious[1:] if v is not None]
    total = float(cm.sum())
    return {
        "mIoU": float(np.mean(present)) if present else None,
        "mIoU_fg": float(np.mean(present_fg)) if present_fg else None,
        "pixel_accuracy": float(inter.sum() / total) if total else None,
        "per_class": per_class,
    }


def _quiet_coco(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_metrics(truth: dict[str, Any], detections: list[dict[str, Any]], iou_type: str) -> dict[str, Any]:
    """COCOeval of `detections` against a COCO `truth` dict, for `iou_type` `segm` or `bbox`.

    Detections are COCO results (`image_id`, `category_id`, `score`, and `segmentation` RLE
    `{size, counts}` for segm or `bbox` [x, y, w, h] for bbox). For segm the detection's area is its
    mask's (bboxes are dropped, as detectron2 does); for bbox the box's. With no detections every
    AP is 0 (and -1, reported as None, where the truth has no object in that range).

    Returns:
        `{"AP", "AP50", ..., "ARl", "per_class": {name: {"AP", "AP50"}}}`; values in [0, 1] or None.
    """
    from pycocotools.cocoeval import COCOeval

    gt = _quiet_coco(truth)
    key = "segmentation" if iou_type == "segm" else "bbox"
    dets = []
    for i, d in enumerate(detections):
        r = {k: v for k, v in d.items() if k not in ("segmentation", "bbox", "area", "id")}
        r[key] = d[key]
        r["id"] = i + 1
        r["iscrowd"] = 0
        if iou_type == "segm":
            from pycocotools import mask as mask_util

            r["area"] = float(mask_util.area(d["segmentation"]))
            r["bbox"] = [float(v) for v in mask_util.toBbox(d["segmentation"])]
        else:
            x, y, w, h = d["bbox"]
            r["area"] = float(w * h)
        dets.append(r)
    dt = _quiet_coco(
        {"images": truth.get("images", []), "categories": truth.get("categories", []), "annotations": dets}
    )
    ev = COCOeval(gt, dt, iouType=iou_type)
    # One more area range after COCO's three: "tiny" objects, at most TINY_SIDE px on a side by area.
    ev.params.areaRng = [*ev.params.areaRng, [0.0, float(TINY_SIDE**2)]]
    ev.params.areaRngLbl = [*ev.params.areaRngLbl, "tiny"]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict[str, Any] = {name: (float(v) if v >= 0 else None) for name, v in zip(_COCO_STATS, ev.stats)}
    out["APtiny"], out["AP50tiny"] = _mean_precision(ev, area=len(ev.params.areaRng) - 1)
    for subset, field in _SUBSETS.items():
        out[subset] = _subset_metrics(gt, dt, iou_type, field)
    per_class: dict[str, Any] = {}
    for ki, cat_id in enumerate(ev.params.catIds):
        ap, ap50 = _mean_precision(ev, klass=ki)
        name = gt.cats[cat_id].get("name", str(cat_id))
        per_class[name] = {
            "id": int(cat_id),
            "AP": ap,
            "AP50": ap50,
            "objects": int(len(gt.getAnnIds(catIds=[cat_id], iscrowd=False))),
        }
    out["per_class"] = per_class
    return out


def _mean_precision(ev: Any, area: int = 0, klass: int | None = None) -> tuple[float | None, float | None]:
    """(AP, AP50) from an accumulated COCOeval, for one area range index and one class (or all)."""
    precision = ev.eval["precision"]  # [T, R, K, A, M]: IoU thresholds, recall points, classes, areas, max dets
    p = precision[:, :, :, area, -1] if klass is None else precision[:, :, klass, area, -1]
    p50 = p[0]
    return (
        float(p[p > -1].mean()) if (p > -1).any() else None,
        float(p50[p50 > -1].mean()) if (p50 > -1).any() else None,
    )


def _subset_metrics(gt: Any, dt: Any, iou_type: str, field: str) -> dict[str, Any] | None:
    """AP and AP50 over the truth objects whose `field` is at least SUBSET_MIN (e.g. occluded ones).

    The other truth objects become "ignore" regions, as COCO treats crowds: a detection of one of them
    neither scores nor counts as a false positive; any other detection is a false positive. None when
    the truth does not record `field`.
    """
    from pycocotools.cocoeval import COCOeval

    anns = gt.dataset.get("annotations", [])
    if not anns or any(field not in a for a in anns):
        return None
    members = {a["id"] for a in anns if float(a[field]) >= SUBSET_MIN}

    class _Subset(COCOeval):  # type: ignore[misc]
        def _prepare(self) -> None:
            super()._prepare()
            for objects in self._gts.values():
                for g in objects:
                    if g["id"] not in members:
                        g["ignore"] = 1

    ev = _Subset(gt, dt, iouType=iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    ap, ap50 = _mean_precision(ev) if members else (None, None)
    return {"objects": len(members), "AP": ap, "AP50": ap50, **_recall(ev, members)}


def _recall(ev: Any, members: set[int]) -> dict[str, float | None]:
    """Share of the `members` objects matched by some detection at IoU 0.5 and 0.75 (COCO's greedy
    matching, all areas, up to the largest max-detections). Unlike AP it ignores false positives
    elsewhere in the images, which swamp a small subset's precision."""
    matched = np.zeros(len(ev.params.iouThrs), dtype=np.int64)
    all_area, max_det = ev.params.areaRng[0], ev.params.maxDets[-1]
    for e in ev.evalImgs:
        if e is None or e["aRng"] != all_area or e["maxDet"] != max_det:
            continue
        for g, gt_id in enumerate(e["gtIds"]):
            if gt_id in members:
                matched += (e["gtMatches"][:, g] > 0).astype(np.int64)
    if not members:
        return {"recall50": None, "recall75": None}
    return {"recall50": float(matched[0] / len(members)), "recall75": float(matched[5] / len(members))}


# --- reading outputs and truth ---------------------------------------------------------------


def _norm_key(key: str) -> str:
    key = key.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key.lstrip("/")


def _latest_rows(output_uri: str, storage_options: dict[str, Any] | None) -> tuple[str, list[dict[str, Any]], int]:
    """(task, the latest committed row per rel_key, rows read) of an output prefix."""
    table = read_rows(output_uri, storage_options)
    if table.num_rows == 0:
        raise JobError(f"segbatch eval: no committed metadata under '{output_uri}/{METADATA}/' (has a job run there?)")
    tasks = sorted({t for t in table.column("task").to_pylist() if t})
    if len(tasks) != 1:
        raise JobError(f"segbatch eval: expected one task in '{output_uri}', but the rows have {tasks}")
    latest: dict[str, dict[str, Any]] = {}
    for row in latest_rows(table, by="rel_key").to_pylist():
        latest[_norm_key(row["rel_key"] or "")] = row
    return tasks[0], list(latest.values()), table.num_rows


def _read(fs: Any, path: str) -> bytes:
    return bytes(fs.cat_file(path))


def _evaluate_semantic(
    rows: list[dict[str, Any]],
    truth_uri: str,
    truth_options: dict[str, Any] | None,
    output_options: dict[str, Any] | None,
    classes: list[str],
) -> dict[str, Any]:
    tfs, troot = filesystem(truth_uri, truth_options)
    troot = troot.rstrip("/")
    labels_root = f"{troot}/labels" if tfs.isdir(f"{troot}/labels") else troot
    try:
        found = sorted(p for p in tfs.find(labels_root) if p.endswith(".png"))
    except FileNotFoundError:
        found = []
    if not found:
        raise JobError(f"segbatch eval: no ground-truth label maps (*.png) under '{unstrip(tfs, labels_root)}'")
    truth_keys = {_norm_key(posixpath.relpath(p, labels_root))[: -len(".png")]: p for p in found}
    by_key = {_norm_key(r["rel_key"] or ""): r for r in rows}
    missing, mismatched = [], []
    num_classes = max(len(classes), 1)
    cm = np.zeros((num_classes, num_classes + 1), np.int64)
    for key, tpath in truth_keys.items():
        truth = decode_png_label_map(_read(tfs, tpath))
        row = by_key.get(key)
        pred: np.ndarray | None = None
        if row is not None and row["status"] == "ok" and row["mask_uri"]:
            ofs, mask_path = filesystem(row["mask_uri"], output_options)
            pred = decode_png_label_map(_read(ofs, mask_path))
            if pred.shape != truth.shape:
                mismatched.append(key)
                pred = None
        else:
            missing.append(key)
        needed = max(int(truth.max()) + 1, int(pred.max()) + 1 if pred is not None else 0)
        if needed > num_classes:  # grow, keeping the last column (no prediction) last
            grown = np.zeros((needed, needed + 1), np.int64)
            grown[:num_classes, :num_classes] = cm[:, :num_classes]
            grown[:num_classes, needed] = cm[:, num_classes]
            cm, num_classes = grown, needed
        cm += confusion_matrix(truth, pred, num_classes)
    names = list(classes) + [f"class {c}" for c in range(len(classes), num_classes)]
    metrics = iou_metrics(cm, names)
    extra = sorted(k for k in by_key if k not in truth_keys)
    return {
        "metrics": {k: v for k, v in metrics.items() if k != "per_class"},
        "per_class": metrics["per_class"],
        "images": {
            "truth": len(truth_keys),
            "evaluated": len(truth_keys) - len(missing) - len(mismatched),
            "missing": len(missing),
            "size_mismatch": len(mismatched),
            "without_truth": len(extra),
        },
        "examples": {"missing": missing[:5], "size_mismatch": mismatched[:5], "without_truth": extra[:5]},
    }


def _load_truth_json(truth_uri: str, truth_options: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    fs, path = filesystem(truth_uri, truth_options)
    if fs.isdir(path):
        path = f"{path.rstrip('/')}/instances.json"
    try:
        data = json.loads(_read(fs, path))
    except FileNotFoundError:
        raise JobError(f"segbatch eval: ground-truth COCO JSON '{unstrip(fs, path)}' not found") from None
    except ValueError as e:
        raise JobError(f"segbatch eval: ground-truth '{unstrip(fs, path)}' is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise JobError(f"segbatch eval: '{unstrip(fs, path)}' expected a COCO instances JSON with 'images'")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    return data, unstrip(fs, path)


def _evaluate_instance(rows: list[dict[str, Any]], truth: dict[str, Any]) -> dict[str, Any]:
    by_key = {_norm_key(r["rel_key"] or ""): r for r in rows}
    dets: list[dict[str, Any]] = []
    missing, mismatched = [], []
    truth_keys = set()
    for img in truth["images"]:
        key = _norm_key(str(img["file_name"]))
        truth_keys.add(key)
        row = by_key.get(key)
        if row is None or row["status"] != "ok":
            missing.append(key)
            continue
        h, w = int(row["height"]), int(row["width"])
        if (h, w) != (int(img["height"]), int(img["width"])):
            mismatched.append(key)
            continue
        for inst in row["instances"] or []:
            dets.append(
                {
                    "image_id": img["id"],
                    "category_id": int(inst["label"]),
                    "score": float(inst["score"]),
                    # Box AP scores the detector's own box (the mask's box is what `segm` already scores).
                    "bbox": [float(v) for v in inst.get("detector_bbox") or inst["bbox"]],
                    "segmentation": {"size": [h, w], "counts": inst["rle"]},
                }
            )
    segm = coco_metrics(truth, dets, "segm")
    bbox = coco_metrics(truth, dets, "bbox")
    extra = sorted(k for k in by_key if k not in truth_keys)
    return {
        "metrics": {
            "segm": {k: v for k, v in segm.items() if k != "per_class"},
            "bbox": {k: v for k, v in bbox.items() if k != "per_class"},
        },
        "per_class": {
            name: {"id": segm["per_class"][name]["id"], "objects": segm["per_class"][name]["objects"],
                   "segm_AP": segm["per_class"][name]["AP"], "segm_AP50": segm["per_class"][name]["AP50"],
                   "bbox_AP": bbox["per_class"][name]["AP"], "bbox_AP50": bbox["per_class"][name]["AP50"]}
            for name in segm["per_class"]
        },
        "images": {
            "truth": len(truth["images"]),
            "evaluated": len(truth["images"]) - len(missing) - len(mismatched),
            "missing": len(missing),
            "size_mismatch": len(mismatched),
            "without_truth": len(extra),
            "objects": len(truth["annotations"]),
            "detections": len(dets),
        },
        "examples": {"missing": missing[:5], "size_mismatch": mismatched[:5], "without_truth": extra[:5]},
    }


def evaluate_output(
    output_uri: str,
    truth_uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    truth_storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the committed outputs under `output_uri` against the truth at `truth_uri`.

    Args:
        output_uri: A job's `output.uri`.
        truth_uri: Semantic: a folder with `labels/<rel_key>.png` (or the labels folder itself).
            Instance: a COCO instances JSON, or a folder holding `instances.json`.
        storage_options: fsspec options for the outputs (masks and metadata).
        truth_storage_options: fsspec options for the truth.

    Returns:
        The report: `task`, `output`, `truth`, `model`, `weights_sha256`, `fingerprint`, `images`
        (counts), `metrics`, `per_class`, `examples` (a few keys per count), `evaluated_at`.

    Raises:
        JobError: no committed outputs, mixed tasks, or truth missing or unreadable.
    """
    task, rows, n_rows = _latest_rows(output_uri, storage_options)
    classes = output_classes(file_metadata(output_uri, storage_options))
    fs, root = filesystem(output_uri, storage_options)
    if fs.exists(f"{root.rstrip('/')}/scenes"):  # a scene job (`tiling`): COGs and polygons, by windows
        from segbatch.geo.evaluate import evaluate_scenes

        result = evaluate_scenes(output_uri, truth_uri, classes or ["background"], storage_options)
        truth_shown = truth_uri
    elif task == "semantic":
        if not classes:
            classes = ["background"]
        result = _evaluate_semantic(rows, truth_uri, truth_storage_options, storage_options, classes)
        truth_shown = truth_uri
    elif task == "instance":
        truth, truth_shown = _load_truth_json(truth_uri, truth_storage_options)
        result = _evaluate_instance(rows, truth)
    else:
        raise JobError(f"segbatch eval: expected task 'semantic' or 'instance', but the outputs say '{task}'")
    first = rows[-1]
    return {
        "task": task,
        "output": output_uri,
        "truth": truth_shown,
        "model": first.get("model"),
        "weights_sha256": first.get("weights_sha256"),
        "fingerprint": first.get("fingerprint"),
        "rows": n_rows,
        **result,
        "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_report(report: dict[str, Any], output_uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write the report as `<output_uri>/eval.json` (whole-file write); returns its URI."""
    fs, root = filesystem(output_uri, storage_options)
    path = f"{root.rstrip('/')}/{REPORT_NAME}"
    write_bytes_atomic(fs, path, json.dumps(report, indent=2).encode())
    return unstrip(fs, path)


def _fmt(v: Any) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def format_report(report: dict[str, Any]) -> str:
    """The table a person reads (metrics, per-class figures, image counts)."""
    if report.get("kind") == "scenes":
        from segbatch.geo.evaluate import format_scene_report

        return format_scene_report(report)
    img = report["images"]
    lines = [
        f"segbatch eval: {report['task']} outputs {report['output']} vs truth {report['truth']}",
        f"  images     truth {img['truth']} · evaluated {img['evaluated']} · missing {img['missing']} · "
        f"size mismatch {img['size_mismatch']} · without truth {img['without_truth']}",
    ]
    if report["task"] == "semantic":
        m = report["metrics"]
        lines.append(
            f"  mIoU {_fmt(m['mIoU']).strip()} · mIoU (foreground) {_fmt(m['mIoU_fg']).strip()} · "
            f"pixel accuracy {_fmt(m['pixel_accuracy']).strip()}"
        )
        lines.append(f"  {'class':<14} {'IoU':>6} {'truth px':>10} {'pred px':>10}")
        for name, c in report["per_class"].items():
            if c["truth_pixels"] or c["pred_pixels"]:
                lines.append(f"  {name:<14} {_fmt(c['iou'])} {c['truth_pixels']:>10} {c['pred_pixels']:>10}")
    else:
        lines.append(f"  objects {img['objects']} · detections {img['detections']}")
        lines.append("  " + f"{'':<6}" + "".join(f"{s:>7}" for s in _SHOWN_STATS))
        for kind in ("segm", "bbox"):
            m = report["metrics"][kind]
            lines.append("  " + f"{kind:<6}" + "".join(f" {_fmt(m[s])}" for s in _SHOWN_STATS))
        segm = report["metrics"]["segm"]
        hard = [
            f"{name} ({segm[name]['objects']} objects, >= {SUBSET_MIN:.0%} {_SUBSET_WORDS[name]}): "
            f"segm AP {_fmt(segm[name]['AP']).strip()} · AP50 {_fmt(segm[name]['AP50']).strip()} · "
            f"recall@0.5 {_fmt(segm[name]['recall50']).strip()} · @0.75 {_fmt(segm[name]['recall75']).strip()}"
            for name in _SUBSETS
            if segm.get(name)
        ]
        if hard:
            lines += [f"  subset     {h}" for h in hard]
        lines.append(f"  (APtiny: objects of at most {TINY_SIDE}x{TINY_SIDE} px by area; APs/APm/APl: COCO's ranges)")
        lines.append(f"  {'class':<14} {'objects':>7} {'segm AP':>8} {'AP50':>7} {'bbox AP':>8} {'AP50':>7}")
        for name, c in report["per_class"].items():
            lines.append(
                f"  {name:<14} {c['objects']:>7} {_fmt(c['segm_AP']):>8} {_fmt(c['segm_AP50'])} "
                f"{_fmt(c['bbox_AP']):>8} {_fmt(c['bbox_AP50'])}"
            )
    return "\n".join(lines)
