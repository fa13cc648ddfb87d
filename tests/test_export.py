"""`segbatch export`: COCO, CVAT 1.1 and Label Studio files from real job outputs, read back through the
tools' own libraries (pycocotools, datumaro, cvat-sdk, label-studio-sdk), never through our decoder.

The outputs come from the shipped `builtin:shapes` models on generated scenes (tests/prelabel.py), so
the masks are real model output; the first test checks they are not degenerate.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_util

from segbatch.cli import main
from segbatch.evaluate import evaluate_output
from segbatch.export import export_output
from segbatch.masks import decode_png_label_map
from segbatch.outputs import latest_rows, read_rows
from tests.prelabel import SCENES, ShapesOutputs


def _key(rel_key: str) -> str:
    return rel_key.rsplit(".", 1)[0]


def _fingerprint(label: int, mask: np.ndarray) -> tuple[int, str]:
    return label, hashlib.sha1(np.packbits(mask.astype(bool)).tobytes() + str(mask.shape).encode()).hexdigest()


def expected_masks(output: Path, min_score: float = 0.0) -> dict[str, Counter[tuple[int, str]]]:
    """Our masks per image (key = rel_key without extension), straight from the committed rows."""
    rows = latest_rows(read_rows(str(output), None)).to_pylist()
    out: dict[str, Counter[tuple[int, str]]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        found: Counter[tuple[int, str]] = Counter()
        if row["task"] == "instance":
            for inst in row["instances"]:
                if inst["score"] >= min_score:
                    rle = {"size": [row["height"], row["width"]], "counts": inst["rle"].encode()}
                    found[_fingerprint(inst["label"], mask_util.decode(rle))] += 1
        else:
            labels = decode_png_label_map(Path(row["mask_uri"]).read_bytes())
            for c in np.unique(labels):
                if c:
                    found[_fingerprint(int(c), labels == c)] += 1
        out[_key(row["rel_key"])] = found
    return out


def test_outputs_are_real_and_not_degenerate(shapes_outputs: ShapesOutputs) -> None:
    for task in ("semantic", "instance"):
        rows = read_rows(str(getattr(shapes_outputs, task)), None).to_pylist()
        assert len(rows) == SCENES + 1
        assert [r["error_class"] for r in rows if r["status"] != "ok"] == ["truncated"]
    inst = expected_masks(shapes_outputs.instance)
    sem = expected_masks(shapes_outputs.semantic)
    assert len(inst) == len(sem) == SCENES
    assert sum(len(c) for c in inst.values()) >= 30  # objects, each a non-empty mask of its own
    assert sum(1 for c in inst.values() if len(c) >= 3) >= 5
    assert sum(len(c) for c in sem.values()) >= 15 and {lab for c in sem.values() for lab, _ in c} == {1, 2, 3}


def test_coco_export_reads_in_pycocotools_and_scores_as_eval(shapes_outputs: ShapesOutputs, tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dest = tmp_path / "coco"
    assert main(["export", str(shapes_outputs.instance), "--format", "coco", "--dest", str(dest)]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(dest / "instances.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in cats] == [(1, "circle"), (2, "rectangle"), (3, "triangle")]
    anns = coco.dataset["annotations"]
    assert len(coco.dataset["images"]) == SCENES and len(anns) >= 30
    assert all(a["iscrowd"] == 0 and 0 < a["score"] <= 1 for a in anns)
    for a in anns:
        rle = a["segmentation"]
        assert a["bbox"] == pytest.approx(list(mask_util.toBbox(rle))) and a["area"] == mask_util.area(rle)
    # Review order: image ids follow it, priorities never rise.
    prios = [im["review_priority"] for im in sorted(coco.dataset["images"], key=lambda im: im["id"])]
    assert prios == sorted(prios, reverse=True)

    # COCOeval of the export, as results, against the generator's truth = segbatch eval's mask AP.
    truth_path = shapes_outputs.truth / "instances.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(truth_path))
        ids = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
        ours = {im["id"]: ids[im["file_name"]] for im in coco.dataset["images"]}
        results = [{**a, "image_id": ours[a["image_id"]]} for a in anns]
        for r in results:
            r.pop("id")
        ev = COCOeval(gt, gt.loadRes(results), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    report = evaluate_output(str(shapes_outputs.instance), str(shapes_outputs.truth))
    assert report["metrics"]["segm"]["AP"] > 0.3
    assert ev.stats[0] == pytest.approx(report["metrics"]["segm"]["AP"], abs=1e-9)
    assert ev.stats[1] == pytest.approx(report["metrics"]["segm"]["AP50"], abs=1e-9)


def _datumaro_masks(dataset: Any, mask_type: str) -> dict[str, Counter[tuple[int, str]]]:
    out: dict[str, Counter[tuple[int, str]]] = {}
    for item in dataset:
        found: Counter[tuple[int, str]] = Counter()
        for ann in item.annotations:
            if type(ann).__name__ in mask_type:
                found[_fingerprint(ann.label + 1, ann.image)] += 1  # datumaro labels count from 0
        out[item.id] = found
    return out


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_coco_export_imports_in_datumaro_pixel_exact(shapes_outputs: ShapesOutputs, tmp_path: Path, task: str) -> None:
    import datumaro as dm

    summary = export_output(str(getattr(shapes_outputs, task)), "coco", dest=str(tmp_path / "coco"))
    # datumaro's COCO layout: annotations/instances_<subset>.json next to images/<subset>/.
    (tmp_path / "dm" / "annotations").mkdir(parents=True)
    shutil.copy(tmp_path / "coco" / "instances.json", tmp_path / "dm" / "annotations" / "instances_default.json")
    (tmp_path / "dm" / "images").mkdir()
    (tmp_path / "dm" / "images" / "default").symlink_to(shapes_outputs.images)
    dataset = dm.Dataset.import_from(str(tmp_path / "dm"), "coco_instances")
    got = _datumaro_masks(dataset, ("RleMask", "Mask"))
    assert got == expected_masks(getattr(shapes_outputs, task))
    assert summary["images"] == SCENES and summary["errors"] == {"truncated": 1}


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_cvat_export_imports_in_datumaro_pixel_exact(shapes_outputs: ShapesOutputs, tmp_path: Path, task: str) -> None:
    import datumaro as dm
    from cvat_sdk.masks import encode_mask

    output = getattr(shapes_outputs, task)
    dest = tmp_path / "cvat"
    assert main(["export", str(output), "--format", "cvat", "--dest", str(dest), "--task-size", "4"]) == 0
    tasks = sorted(p.name for p in dest.iterdir() if p.is_dir())
    assert tasks == ["task-00001", "task-00002", "task-00003"]  # 10 images, 4 a task
    got: dict[str, Counter[tuple[int, str]]] = {}
    order: list[str] = []
    for name in tasks:
        with zipfile.ZipFile(dest / f"{name}.zip") as z:
            assert z.namelist() == ["annotations.xml"]
            assert z.read("annotations.xml") == (dest / name / "annotations.xml").read_bytes()
        uris = (dest / name / "images.txt").read_text().split()
        # datumaro's cvat layout: annotations.xml next to images/.
        work = tmp_path / "dm" / name
        work.mkdir(parents=True)
        shutil.copy(dest / name / "annotations.xml", work / "annotations.xml")
        (work / "images").symlink_to(shapes_outputs.images)
        dataset = dm.Dataset.import_from(str(work / "annotations.xml"), "cvat")
        part = _datumaro_masks(dataset, ("Mask",))
        assert len(part) == len(uris) and not set(part) & set(got)
        got.update(part)
        # Our RLE = cvat-sdk's reference encoder over the same box, for every mask.
        root = ET.parse(dest / name / "annotations.xml").getroot()
        for image in root.iter("image"):
            order.append(image.get("name") or "")
            h, w = int(image.get("height") or 0), int(image.get("width") or 0)
            for m in image.iter("mask"):
                assert m.get("source") == "auto"
                left, top, bw, bh = (int(m.get(k) or 0) for k in ("left", "top", "width", "height"))
                runs = [int(v) for v in (m.get("rle") or "").split(",")]
                assert sum(runs) == bw * bh
                full = np.zeros((h, w), bool)
                flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
                full[top : top + bh, left : left + bw] = flat.reshape(bh, bw)
                ref = encode_mask(full, [left, top, left + bw, top + bh])
                assert runs == ref[:-4]
                if task == "instance":
                    assert [a.get("name") for a in m.iter("attribute")] == ["score"]
    assert got == expected_masks(output)
    review = pq.read_table(dest / "review.parquet").to_pylist()
    assert order == [r["rel_key"] for r in review]
    assert [r["review_rank"] for r in review] == list(range(SCENES))


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_labelstudio_export_validates_and_decodes_pixel_exact(
    shapes_outputs: ShapesOutputs, tmp_path: Path, task: str
) -> None:
    from label_studio_sdk.converter.brush import decode_rle
    from label_studio_sdk.label_interface import LabelInterface

    output = getattr(shapes_outputs, task)
    dest = tmp_path / "ls"
    summary = export_output(str(output), "labelstudio", dest=str(dest), local_files_root=str(shapes_outputs.images.parent))
    config = (dest / "labeling_config.xml").read_text()
    interface = LabelInterface(config)
    tasks = json.loads((dest / "tasks.json").read_text())
    assert len(tasks) == summary["images"] == SCENES
    got: dict[str, Counter[tuple[int, str]]] = {}
    names = {"circle": 1, "rectangle": 2, "triangle": 3}
    for t in tasks:
        assert t["data"]["image"] == "/data/local-files/?d=images/" + t["data"]["rel_key"]
        (pred,) = t["predictions"]
        assert interface.validate_prediction(pred), interface.validate_prediction(pred, return_errors=True)
        assert pred["model_version"] and ("score" in pred) == (task == "instance" and bool(pred["result"]))
        found: Counter[tuple[int, str]] = Counter()
        for r in pred["result"]:
            assert r["type"] == "brushlabels" and r["value"]["format"] == "rle"
            h, w = r["original_height"], r["original_width"]
            pixels = decode_rle(r["value"]["rle"]).reshape(h, w, 4)
            assert set(np.unique(pixels)) <= {0, 255}
            found[_fingerprint(names[r["value"]["brushlabels"][0]], pixels[:, :, 3] == 255)] += 1
        got[_key(t["data"]["rel_key"])] = found
    assert got == expected_masks(output)
    prios = [t["data"]["review_priority"] for t in tasks]
    assert prios == sorted(prios, reverse=True)


def test_polygons_in_every_format(shapes_outputs: ShapesOutputs, tmp_path: Path) -> None:
    from label_studio_sdk.label_interface import LabelInterface
    from pycocotools.coco import COCO

    output = str(shapes_outputs.instance)
    export_output(output, "coco", dest=str(tmp_path / "coco"), polygons=True)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "coco" / "instances.json"))
    masks = expected_masks(shapes_outputs.instance)
    assert sum(len(c) for c in masks.values()) == len(coco.dataset["annotations"])
    ious = []
    for a in coco.dataset["annotations"]:
        assert isinstance(a["segmentation"], list) and a["segmentation"]
        poly = coco.annToMask(a).astype(bool)
        rle = mask_util.frPyObjects(a["segmentation"], *poly.shape)
        ious.append(float(poly.sum()) / max(a["area"], 1))
        assert len(rle) >= 1
    assert np.median(ious) > 0.8  # polygons through boundary pixel centres approximate the masks
    export_output(output, "cvat", dest=str(tmp_path / "cvat"), polygons=True)
    root = ET.parse(tmp_path / "cvat" / "task-00001" / "annotations.xml").getroot()
    assert len(list(root.iter("polygon"))) >= len(coco.dataset["annotations"]) and not list(root.iter("mask"))
    export_output(output, "labelstudio", dest=str(tmp_path / "ls"), polygons=True)
    interface = LabelInterface((tmp_path / "ls" / "labeling_config.xml").read_text())
    for t in json.loads((tmp_path / "ls" / "tasks.json").read_text()):
        pred = t["predictions"][0]
        assert interface.validate_prediction(pred)
        for r in pred["result"]:
            assert r["type"] == "polygonlabels"
            assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in r["value"]["points"])


def test_min_score_and_the_latest_commit_win(shapes_outputs: ShapesOutputs, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    out = tmp_path / "out"
    shutil.copytree(shapes_outputs.instance, out, ignore=shutil.ignore_patterns("exports", "report"))
    # A later run commits one image again with a single object: the export must take that row.
    table = read_rows(str(out), None)
    ok = table.filter(pc.equal(table["status"], "ok"))
    # An image with objects (which image comes first depends on the order the job committed them).
    again = [next(r for r in ok.to_pylist() if r["instances"])]
    again[0]["instances"] = again[0]["instances"][:1]
    again[0]["num_instances"] = 1
    again[0]["committed_at"] = max(r["committed_at"] for r in table.to_pylist() if r["committed_at"]) + __import__(
        "datetime"
    ).timedelta(seconds=5)
    part = pq.read_schema(next((out / "metadata").glob("*.parquet")))
    pq.write_table(pa.Table.from_pylist(again, schema=part), out / "metadata" / "part-zzzz-00000.parquet")
    summary = export_output(str(out), "coco", dest=str(tmp_path / "coco"), min_score=0.5)
    assert summary["superseded"] == 1 and summary["images"] == SCENES
    coco = json.loads((tmp_path / "coco" / "instances.json").read_text())
    (image,) = [im for im in coco["images"] if im["file_name"] == again[0]["rel_key"]]
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    assert len(anns) == (1 if again[0]["instances"][0]["score"] >= 0.5 else 0)
    assert all(a["score"] >= 0.5 for a in coco["annotations"])
    everything = export_output(str(out), "coco", dest=str(tmp_path / "all"))
    assert everything["annotations"] > summary["annotations"]


def test_export_to_and_from_s3(shapes_outputs: ShapesOutputs, s3_env: str) -> None:
    from segbatch.storage import filesystem

    fs, _ = filesystem("s3://prelabel/out")
    fs.mkdir("prelabel")
    fs.put(str(shapes_outputs.instance / "metadata"), "prelabel/out/metadata", recursive=True)
    for fmt in ("coco", "cvat", "labelstudio"):
        assert main(["export", "s3://prelabel/out", "--format", fmt]) == 0
    fs.invalidate_cache()
    coco = json.loads(fs.cat_file("prelabel/out/exports/coco/instances.json"))
    assert len(coco["images"]) == SCENES and coco["annotations"]
    assert fs.exists("prelabel/out/exports/cvat/task-00001.zip")
    tasks = json.loads(fs.cat_file("prelabel/out/exports/labelstudio/tasks.json"))
    assert len(tasks) == SCENES
    assert all(t["data"]["image"].startswith("/data/local-files/?d=") for t in tasks)  # images are local here


def test_command_line_errors_are_one_line(shapes_outputs: ShapesOutputs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nothing"), "--format", "coco"]) == 1
    err = capsys.readouterr().err
    assert "no committed metadata" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty" / "metadata").mkdir(parents=True)
    assert main(["export", str(tmp_path / "empty"), "--format", "cvat"]) == 1
    assert "no committed metadata" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", str(shapes_outputs.instance), "--format", "yolo"])
    assert e.value.code == 2
    assert "invalid choice: 'yolo'" in capsys.readouterr().err
    assert main(["export", str(shapes_outputs.instance), "--format", "coco", "--layer", "semantic"]) == 1
    assert "--layer expected one of the output's layers ['instance']" in capsys.readouterr().err
    assert main(["export", str(shapes_outputs.instance), "--format", "cvat", "--task-size", "0"]) == 2
