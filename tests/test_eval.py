"""`segbatch eval`: perfect outputs score 1, empty ones 0, hand-made partial cases their exact value.

Outputs are built directly (mask PNGs + metadata parts written by the real Committer), without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from segbatch.cli import main
from segbatch.errors import JobError
from segbatch.evaluate import coco_metrics, evaluate_output, format_report
from segbatch.masks import encode_png_label_map
from segbatch.sinks import Committer, rows_to_table
from segbatch.spec import OutputSpec
from segbatch.synth import CLASSES, write_dataset


def _obj(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def write_outputs(out: Path, task: str, items: list[dict[str, Any]]) -> None:
    """Commit rows like a job would. Items: rel_key, height, width, and `labels` (semantic label map),
    `instances` (list of instance dicts) or `error` (an error row)."""
    rows: dict[str, list[Any]] = {k: [] for k in ("item_id", "uri", "version", "rel_key", "width", "height")}
    rows.update({k: [] for k in ("status", "error_class", "error", "mask_uri", "class_pixels", "instances")})
    for i, it in enumerate(items):
        rows["item_id"].append(f"id{i}")
        rows["uri"].append(f"/in/{it['rel_key']}")
        rows["version"].append("1")
        rows["rel_key"].append(it["rel_key"])
        rows["width"].append(it["width"])
        rows["height"].append(it["height"])
        failed = "error" in it
        rows["status"].append("error" if failed else "ok")
        rows["error_class"].append("model_failed" if failed else "")
        rows["error"].append(it.get("error", ""))
        mask_uri = ""
        if task == "semantic" and not failed:
            path = out / "masks" / f"{it['rel_key']}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png_label_map(it["labels"].astype(np.uint8)))
            mask_uri = str(path)
        rows["mask_uri"].append(mask_uri)
        rows["class_pixels"].append(np.bincount(it["labels"].ravel(), minlength=4) if "labels" in it else np.zeros(0))
        rows["instances"].append(json.dumps(it.get("instances", [])) if not failed else "")
    batch = {k: _obj(v) for k, v in rows.items()}
    constants = {"task": task, "model": "test", "weights_sha256": "none", "fingerprint": "f", "run_id": "r1"}
    table = rows_to_table(batch, constants)
    committer = Committer(OutputSpec(uri=str(out)), "r1", {"segbatch.task": task, "segbatch.classes": json.dumps(CLASSES)})
    committer.add(table)
    committer.flush()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_dataset(tmp_path_factory.mktemp("ds"), count=6, seed=10_000_300)


def _truth_items(truth: Path) -> list[dict[str, Any]]:
    coco = json.loads((truth / "instances.json").read_text())
    items = []
    for img in coco["images"]:
        labels = np.asarray(Image.open(truth / "labels" / f"{img['file_name']}.png"))
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        instances = [
            {
                "label": a["category_id"],
                "score": 1.0 - 0.01 * j,
                "bbox": a["bbox"],
                "area": a["area"],
                "rle": a["segmentation"]["counts"],
            }
            for j, a in enumerate(anns)
        ]
        items.append(
            {"rel_key": img["file_name"], "height": img["height"], "width": img["width"], "labels": labels,
             "instances": instances}
        )
    return items


def test_semantic_perfect_and_empty(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    _, truth = dataset
    items = _truth_items(truth)
    write_outputs(tmp_path / "perfect", "semantic", items)
    report = evaluate_output(str(tmp_path / "perfect"), str(truth))
    assert report["task"] == "semantic" and report["images"]["evaluated"] == 6
    assert report["metrics"]["mIoU"] == 1.0 and report["metrics"]["mIoU_fg"] == 1.0
    assert all(c["iou"] == 1.0 for c in report["per_class"].values() if c["truth_pixels"])
    assert "circle" in format_report(report)

    # Every item failed: nothing predicted, every truth pixel missed.
    write_outputs(tmp_path / "failed", "semantic", [{**it, "error": "boom"} for it in items])
    report = evaluate_output(str(tmp_path / "failed"), str(truth / "labels"))  # the labels folder itself works too
    assert report["metrics"]["mIoU"] == 0.0 and report["images"]["missing"] == 6

    # All background: foreground IoU 0.
    write_outputs(tmp_path / "bg", "semantic", [{**it, "labels": np.zeros_like(it["labels"])} for it in items])
    report = evaluate_output(str(tmp_path / "bg"), str(truth))
    assert report["metrics"]["mIoU_fg"] == 0.0


def test_semantic_partial_exact(tmp_path: Path) -> None:
    truth = tmp_path / "truth"
    (truth / "labels" / "sub").mkdir(parents=True)
    t1 = np.zeros((10, 10), np.uint8)
    t1[:, :5] = 1  # 50 px circle, 50 px background
    Image.fromarray(t1).save(truth / "labels" / "sub" / "a.jpg.png")
    Image.fromarray(np.full((10, 10), 2, np.uint8)).save(truth / "labels" / "b.png.png")
    p1 = np.zeros((10, 10), np.uint8)
    p1[:, :6] = 1  # 60 px predicted circle: IoU 50/60; background 40/50
    out = tmp_path / "out"
    write_outputs(
        out,
        "semantic",
        [
            {"rel_key": "sub/a.jpg", "height": 10, "width": 10, "labels": p1},
            {"rel_key": "b.png", "height": 10, "width": 10, "error": "x"},  # missed: rectangle IoU 0
            {"rel_key": "extra.jpg", "height": 10, "width": 10, "labels": p1},  # no truth: ignored
        ],
    )
    assert main(["eval", str(out), "--truth", str(truth)]) == 0
    report = json.loads((out / "eval.json").read_text())
    per = report["per_class"]
    assert per["background"]["iou"] == pytest.approx(0.8)
    assert per["circle"]["iou"] == pytest.approx(5 / 6)
    assert per["rectangle"]["iou"] == 0.0 and per["triangle"]["iou"] is None
    assert report["metrics"]["mIoU"] == pytest.approx((0.8 + 5 / 6 + 0.0) / 3)
    assert report["metrics"]["mIoU_fg"] == pytest.approx((5 / 6 + 0.0) / 2)
    assert report["images"] == {"truth": 2, "evaluated": 1, "missing": 1, "size_mismatch": 0, "without_truth": 1}


def test_instance_perfect_and_empty(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    _, truth = dataset
    items = [{k: v for k, v in it.items() if k != "labels"} for it in _truth_items(truth)]
    write_outputs(tmp_path / "perfect", "instance", items)
    report = evaluate_output(str(tmp_path / "perfect"), str(truth / "instances.json"))
    for kind in ("segm", "bbox"):
        m = report["metrics"][kind]
        assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert all(c["segm_AP"] == pytest.approx(1.0) for c in report["per_class"].values() if c["objects"])

    write_outputs(tmp_path / "empty", "instance", [{**it, "instances": []} for it in items])
    report = evaluate_output(str(tmp_path / "empty"), str(truth))  # a folder holding instances.json works too
    assert report["metrics"]["segm"]["AP"] == 0.0 and report["metrics"]["bbox"]["AP50"] == 0.0
    assert report["images"]["detections"] == 0


def _square_rle(h: int, w: int, y0: int, x0: int, side: int) -> tuple[str, list[float], int]:
    m = np.zeros((h, w), np.uint8, order="F")
    m[y0 : y0 + side, x0 : x0 + side] = 1
    rle = mask_util.encode(m)
    return rle["counts"].decode(), [float(v) for v in mask_util.toBbox(rle)], int(mask_util.area(rle))


def test_instance_partial_exact(tmp_path: Path) -> None:
    # Two images with one circle each. Found: image 1's, scored 0.8, below a 0.9-scored false positive.
    # Precision at recall 0.5 is 1/2 and recall never passes 0.5, so AP = 0.5 * 51/101 (101 recall points).
    h = w = 64
    t1, b1, a1 = _square_rle(h, w, 10, 10, 20)
    t2, b2, a2 = _square_rle(h, w, 30, 30, 16)
    fp, bfp, afp = _square_rle(h, w, 40, 40, 12)
    truth = {
        "images": [{"id": 1, "file_name": "x/1.png", "height": h, "width": w},
                   {"id": 2, "file_name": "x/2.png", "height": h, "width": w}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": {"size": [h, w], "counts": t1},
             "area": a1, "bbox": b1, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "segmentation": {"size": [h, w], "counts": t2},
             "area": a2, "bbox": b2, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"}, {"id": 3, "name": "triangle"}],
    }
    truth_file = tmp_path / "truth.json"
    truth_file.write_text(json.dumps(truth))
    out = tmp_path / "out"
    write_outputs(
        out,
        "instance",
        [
            {"rel_key": "x/1.png", "height": h, "width": w,
             "instances": [{"label": 1, "score": 0.8, "bbox": b1, "area": a1, "rle": t1}]},
            {"rel_key": "x/2.png", "height": h, "width": w,
             "instances": [{"label": 1, "score": 0.9, "bbox": bfp, "area": afp, "rle": fp}]},
        ],
    )
    assert main(["eval", str(out), "--truth", str(truth_file)]) == 0
    report = json.loads((out / "eval.json").read_text())
    for kind in ("segm", "bbox"):
        m = report["metrics"][kind]
        assert m["AP50"] == pytest.approx(0.5 * 51 / 101) and m["AP"] == pytest.approx(0.5 * 51 / 101)
        assert m["AR100"] == pytest.approx(0.5)
    assert report["per_class"]["rectangle"]["segm_AP"] is None  # no truth of that class: left out


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="no committed metadata"):
        evaluate_output(str(tmp_path / "nothing"), str(tmp_path))
    write_outputs(tmp_path / "out", "instance", [{"rel_key": "a.png", "height": 4, "width": 4, "instances": []}])
    assert main(["eval", str(tmp_path / "out"), "--truth", str(tmp_path / "missing.json")]) == 1


def test_tiny_range_and_occluded_subset_exact() -> None:
    # One 20x20 object (tiny: area <= 24²), one 40x40 object with 30% of it hidden (occluded subset).
    h = w = 96
    tiny, btiny, atiny = _square_rle(h, w, 4, 4, 20)
    big, bbig, abig = _square_rle(h, w, 40, 40, 40)
    truth = {
        "images": [{"id": 1, "file_name": "a.png", "height": h, "width": w}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": {"size": [h, w], "counts": tiny},
             "area": atiny, "bbox": btiny, "iscrowd": 0, "occluded_fraction": 0.0, "cut_fraction": 0.0},
            {"id": 2, "image_id": 1, "category_id": 1, "segmentation": {"size": [h, w], "counts": big},
             "area": abig, "bbox": bbig, "iscrowd": 0, "occluded_fraction": 0.3, "cut_fraction": 0.0},
        ],
        "categories": [{"id": 1, "name": "circle"}],
    }

    def det(rle: str, box: list[float]) -> dict[str, Any]:
        return {"image_id": 1, "category_id": 1, "score": 0.9, "bbox": box,
                "segmentation": {"size": [h, w], "counts": rle}}

    # Only the big, occluded object found: half the objects at precision 1 (51 of 101 recall points),
    # none of the tiny ones, all of the occluded ones; no object is cut by the border.
    m = coco_metrics(truth, [det(big, bbig)], "segm")
    assert m["AP"] == pytest.approx(51 / 101)
    assert m["APtiny"] == 0.0 and m["AP50tiny"] == 0.0
    assert m["occluded"] == {"objects": 1, "AP": pytest.approx(1.0), "AP50": pytest.approx(1.0),
                             "recall50": 1.0, "recall75": 1.0}
    assert m["cut"] == {"objects": 0, "AP": None, "AP50": None, "recall50": None, "recall75": None}
    # Only the tiny one found: the reverse. Its detection is not a false positive for the occluded subset
    # (it matches an object outside the subset), so occluded AP is 0 from missing recall alone.
    m = coco_metrics(truth, [det(tiny, btiny)], "segm")
    assert m["APtiny"] == pytest.approx(1.0) and m["occluded"]["AP"] == 0.0
    # A false positive counts against the subset: precision 1/2 before the occluded object's detection.
    fp, bfp, _ = _square_rle(h, w, 60, 4, 16)
    m = coco_metrics(truth, [det(big, bbig) | {"score": 0.5}, det(fp, bfp)], "segm")
    assert m["occluded"]["AP"] == pytest.approx(0.5)
    assert m["occluded"]["recall50"] == 1.0  # recall does not see the false positive
    # A detection overlapping the occluded object by IoU 0.6 (24 of 40 columns) counts at 0.5, not 0.75.
    part, bpart, _ = _square_rle(h, w, 40, 40, 40)
    part_mask = mask_util.decode({"size": [h, w], "counts": part}).copy(order="F")
    part_mask[:, 64:] = 0
    prle = mask_util.encode(np.asfortranarray(part_mask))
    m = coco_metrics(truth, [det(prle["counts"].decode(), [float(v) for v in mask_util.toBbox(prle)])], "segm")
    assert (m["occluded"]["recall50"], m["occluded"]["recall75"]) == (1.0, 0.0)
    # Truth without the fields (any COCO file): no subsets, the rest unchanged.
    for a in truth["annotations"]:
        del a["occluded_fraction"], a["cut_fraction"]
    m = coco_metrics(truth, [det(big, bbig)], "segm")
    assert m["occluded"] is None and m["AP"] == pytest.approx(51 / 101)
