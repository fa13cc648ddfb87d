"""Several models in one pass (`layers:`): each layer's output is exactly a single-model job's."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from segbatch.cli import main
from segbatch.export.priority import EMPTY_UNCERTAINTY, TINY_AREA
from segbatch.masks import decode_png_label_map
from segbatch.outputs import read_rows
from segbatch.pipeline import run_job
from segbatch.result import format_summary
from segbatch.spec import parse_job
from segbatch.synth import write_scene_folder
from tests.varied import assert_varied_instances, assert_varied_labels

LAYERS = [
    {"name": "regions", "task": "semantic", "weights": "builtin:shapes", "batch_size": 4},
    {"name": "objects", "task": "instance", "weights": "builtin:shapes", "score_threshold": 0.3, "batch_size": 4},
]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _job(images: Path, out: Path, **models: object) -> dict:
    return {
        "name": "layers",
        "input": {"uri": str(images)},
        **models,
        "output": {"uri": str(out), "commit_rows": 3},
        "compute": {"actors": 1, "cpus_per_actor": 1, "load_batch_size": 4},
    }


def _rows(output: Path) -> dict[str, dict]:
    return {r["uri"]: r for r in read_rows(str(output), {}).to_pylist()}


def _single(layer: dict) -> dict:
    return {k: v for k, v in layer.items() if k != "name"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One layered run and, for comparison, each layer's model as a job of its own, on the same scenes."""
    tmp = tmp_path_factory.mktemp("layers")
    write_scene_folder(tmp / "in", count=8, seed=10_000_000)
    (tmp / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    layered = parse_job(_job(tmp / "in", tmp / "out", layers=LAYERS))
    result = run_job(layered)
    assert (result.listed, result.processed, result.ok) == (9, 18, 16), format_summary(result)
    assert set(result.layers) == {"regions", "objects"}
    for layer in LAYERS:
        single = parse_job(_job(tmp / "in", tmp / f"alone-{layer['name']}", model=_single(layer)))
        run_job(single)
    return {"root": tmp, "out": tmp / "out", "summary": Path(format_summary(result))}


def test_each_layer_equals_its_model_run_alone(runs: dict[str, Path]) -> None:
    out, root = runs["out"], runs["root"]
    semantic, alone_semantic = _rows(out / "regions"), _rows(root / "alone-regions")
    assert set(semantic) == set(alone_semantic) and len(semantic) == 9
    maps = {}
    for uri, row in alone_semantic.items():
        mine = semantic[uri]
        assert (mine["status"], mine["error_class"]) == (row["status"], row["error_class"]), uri
        if row["status"] != "ok":
            continue
        want = decode_png_label_map(Path(row["mask_uri"]).read_bytes())
        got = decode_png_label_map(Path(mine["mask_uri"]).read_bytes())
        maps[uri] = want
        assert Path(mine["mask_uri"]).is_relative_to(out / "regions" / "masks"), mine["mask_uri"]
        assert np.array_equal(got, want), uri
        assert mine["class_pixels"] == row["class_pixels"] and mine["fingerprint"] == row["fingerprint"]
    assert_varied_labels(list(maps.values()), min_share=0.02, min_fraction=0.6)

    instances, alone_instances = _rows(out / "objects"), _rows(root / "alone-objects")
    assert set(instances) == set(alone_instances)
    assert_varied_instances([r["instances"] or [] for r in alone_instances.values()], min_images=6, min_objects=20)
    for uri, row in alone_instances.items():
        mine = instances[uri]
        assert (mine["status"], mine["fingerprint"]) == (row["status"], row["fingerprint"]), uri
        if row["status"] == "ok":
            got = [(i["label"], round(i["score"], 5), i["rle"], i["bbox"]) for i in mine["instances"]]
            want = [(i["label"], round(i["score"], 5), i["rle"], i["bbox"]) for i in row["instances"]]
            assert got == want, uri


def test_layers_write_the_single_model_layout(runs: dict[str, Path]) -> None:
    out = runs["out"]
    for name, task in (("regions", "semantic"), ("objects", "instance")):
        layer = out / name
        assert list((layer / "metadata").glob("part-*.parquet")) and list((layer / "errors").glob("part-*.parquet"))
        manifests = list((layer / "runs").glob("*.json"))
        assert len(manifests) == 1
        manifest = json.loads(manifests[0].read_text())
        assert manifest["layer"] == name and manifest["counts"]["ok"] == 8
        assert manifest["counts"]["error"] == {"truncated": 1}
        rows = read_rows(str(layer), {}).to_pylist()
        assert {r["task"] for r in rows} == {task}
    assert not (out / "regions" / "masks" / "broken.png.png").exists()
    assert not (out / "objects" / "masks").exists()  # instance masks travel as RLE (instance_png unset)
    top = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert set(top["layers"]) == {"regions", "objects"} and top["counts"]["processed"] == 18
    assert not (out / "metadata").exists()  # the top folder holds layers, plan and manifests only


def test_rerun_fills_only_the_layer_that_lacks_an_item(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(runs["out"], out)
    before = _rows(out / "objects")
    regions_parts = sorted(p.name for p in (out / "regions" / "metadata").glob("*.parquet"))
    # A kill between the two layers' commits: the last objects part never made it.
    last = sorted((out / "objects" / "metadata").glob("*.parquet"))[-1]
    last.unlink()
    missing = len(before) - len(_rows(out / "objects"))
    assert 0 < missing < len(before)
    data = _job(runs["root"] / "in", out, layers=LAYERS)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(data))
    assert main(["plan", str(job_file)]) == 0
    printed = capsys.readouterr().out
    assert f"to process {missing}" in printed and f"layer      objects: to process {missing}" in printed, printed
    assert "layer      regions: to process 0 · already done 9" in printed, printed
    assert main(["validate", str(job_file)]) == 0
    assert "layers regions: semantic builtin:shapes, objects: instance builtin:shapes" in capsys.readouterr().out
    spec = parse_job(data)
    result = run_job(spec)
    assert (result.skipped, result.processed) == (9 - missing, missing)
    assert result.layers["objects"]["processed"] == missing and result.layers["regions"]["processed"] == 0
    assert sorted(p.name for p in (out / "regions" / "metadata").glob("*.parquet")) == regions_parts
    after = _rows(out / "objects")
    assert set(after) == set(before)
    for uri, row in before.items():
        assert after[uri]["instances"] == row["instances"], uri
    again = run_job(spec)
    assert (again.skipped, again.processed) == (9, 0)


def test_layer_disagreement_is_stored_on_both_layers_and_ranks_the_export(runs: dict[str, Path]) -> None:
    from pycocotools import mask as mask_util

    from segbatch.errors import JobError
    from segbatch.export import export_output

    out = runs["out"]
    semantic, instances = _rows(out / "regions"), _rows(out / "objects")
    gaps = {}
    for uri, row in semantic.items():
        if row["status"] != "ok":
            assert row["layer_disagreement"] is None and instances[uri]["layer_disagreement"] is None
            continue
        labels = decode_png_label_map(Path(row["mask_uri"]).read_bytes()) != 0
        objects = np.zeros_like(labels)
        for inst in instances[uri]["instances"]:
            objects |= mask_util.decode({"size": [row["height"], row["width"]], "counts": inst["rle"].encode()}).astype(bool)
        union = (labels | objects).sum()
        want = 1 - (labels & objects).sum() / union if union else 0.0  # nothing found by either: they agree
        assert row["layer_disagreement"] == pytest.approx(want, abs=1e-6), uri
        assert instances[uri]["layer_disagreement"] == row["layer_disagreement"]
        gaps[uri] = want
    assert len(set(round(g, 3) for g in gaps.values())) >= 4  # images differ: the term can order them

    summary = export_output(str(out), "coco", layer="regions")
    assert summary["dest"] == f"{out}/regions/exports/coco" and summary["images"] == 8
    review = {r["uri"]: r for r in pq.read_table(out / "regions" / "exports" / "coco" / "review.parquet").to_pylist()}
    assert set(review) == set(gaps)
    for uri, gap in gaps.items():  # semantic rows: 0.3 · tiny share + 0.2 · disagreement (no scores)
        pixels = semantic[uri]["class_pixels"][1:]
        present = [p for p in pixels if p > 0]
        tiny = sum(p <= TINY_AREA for p in present) / max(1, len(present))
        empty = 0.5 * EMPTY_UNCERTAINTY if not present else 0.0  # nothing found: as likely a miss as empty
        assert review[uri]["review_priority"] == pytest.approx(empty + 0.3 * tiny + 0.2 * gap, abs=1e-5), uri
    order = sorted(review.values(), key=lambda r: r["review_rank"])
    assert [r["review_priority"] for r in order] == sorted((r["review_priority"] for r in order), reverse=True)
    with pytest.raises(JobError, match=r"holds the layers \['objects', 'regions'\].*--layer NAME"):
        export_output(str(out), "coco")
    with pytest.raises(JobError, match=r"--layer expected one of the output's layers \['objects', 'regions'\], but got 'object'"):
        export_output(str(out), "coco", layer="object")
