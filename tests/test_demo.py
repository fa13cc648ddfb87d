"""End to end with the shipped `builtin:shapes` models: `segbatch demo` on fresh scenes, real local Ray.

This is the quality check a user sees: both demo jobs run, `segbatch eval` scores them against the
generator's truth, and the scores clear a floor. The floor sits well below what the shipped models
score on 200 scenes (segbatch/models/builtin/RECIPE.md) because ten scenes are a noisy sample; it
still fails for any model that has not learnt the shapes (a random or untrained model scores near 0,
and one that only separates objects from background gets class IoUs near 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segbatch.cli import main
from segbatch.outputs import read_rows

SCENES = 10
SEED = 10_500_000  # fresh: outside segbatch.synth.TRAIN_SEEDS and away from the demo's default seeds


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    import io
    from contextlib import redirect_stdout

    work = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with redirect_stdout(buf):  # run_demo starts its own local Ray and shuts it down
        code = main(["demo", "--workdir", str(work), "--images", str(SCENES), "--seed", str(SEED)])
    return work, code, buf.getvalue()


def test_demo_runs_both_layers_in_one_pass_and_reports(demo: tuple[Path, int, str]) -> None:
    work, code, printed = demo
    assert code == 0
    out = work / "demo-output"
    for task in ("semantic", "instance"):
        rows = read_rows(str(out / task), None).to_pylist()
        assert len(rows) == SCENES + 1  # every scene, plus the corrupt file as an error row
        bad = [r for r in rows if r["status"] != "ok"]
        assert [(Path(r["uri"]).name, r["error_class"]) for r in bad] == [("broken.jpg", "truncated")]
        assert json.loads((out / task / "eval.json").read_text())["images"]["evaluated"] == SCENES
    masks = sorted((out / "semantic" / "masks").rglob("*.png"))
    assert len(masks) == SCENES
    label_map = np.asarray(Image.open(masks[0]))
    assert label_map.ndim == 2 and set(np.unique(label_map)) <= {0, 1, 2, 3}
    assert len(sorted((out / "instance" / "masks").rglob("*.png"))) == SCENES  # instance-id PNGs
    # One pass: one job manifest over both layers, each layer's own manifest beside its results.
    (top,) = (out / "runs").glob("*.json")
    assert set(json.loads(top.read_text())["layers"]) == {"semantic", "instance"}
    # The closing screen: both layers, their scores, speed and where masks, exports and previews are.
    summary = printed[printed.rindex("segbatch demo:"):]
    assert f"{SCENES} fresh scenes (seeds {SEED}..{SEED + SCENES - 1}, none used in training)" in summary
    assert "mIoU" in summary and "mask AP" in summary and "images/s" in summary
    assert f"{out / 'semantic'}/masks/" in summary and f"{out / 'instance'}/masks/" in summary
    for task in ("semantic", "instance"):
        layer = out / task
        coco = json.loads((layer / "exports" / "coco" / "instances.json").read_text())
        assert len(coco["images"]) == SCENES and coco["annotations"]
        assert list((layer / "exports" / "cvat").glob("task-*.zip"))
        assert (layer / "exports" / "labelstudio" / "labeling_config.xml").exists()
        assert (layer / "report" / "index.html").exists()
        for fmt in ("coco", "cvat", "labelstudio"):
            assert f"{layer}/exports/{fmt}" in summary
        assert f"{layer}/report/index.html" in summary
    assert "Upload annotations" in summary and "labeling_config.xml" in summary


def test_shipped_models_segment_fresh_scenes(demo: tuple[Path, int, str]) -> None:
    work, _, _ = demo
    semantic = json.loads((work / "demo-output" / "semantic" / "eval.json").read_text())
    instance = json.loads((work / "demo-output" / "instance" / "eval.json").read_text())
    assert semantic["metrics"]["mIoU"] >= 0.65, semantic["per_class"]
    for name in ("circle", "rectangle", "triangle"):
        assert semantic["per_class"][name]["iou"] >= 0.5, (name, semantic["per_class"])
    segm = instance["metrics"]["segm"]
    assert segm["AP50"] >= 0.65 and segm["AP"] >= 0.45, segm
    assert instance["metrics"]["bbox"]["AP50"] >= 0.65, instance["metrics"]["bbox"]
