"""End to end on a real local Ray: equivalence with direct model calls, outputs, error rows, resume."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import torchvision
from PIL import Image

from segbatch.masks import decode_png_label_map, rle_to_mask
from segbatch.models.small import maskrcnn_small
from segbatch.pipeline import run_job
from segbatch.outputs import read_rows
from segbatch.spec import parse_job
from tests.conftest import save_checkpoint, write_images

MIXED_SIZES = [(72, 96), (96, 72), (72, 96), (64, 64), (72, 96), (80, 120), (96, 72)]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def job(tmp_path: Path, images: Path, **model: object) -> dict:
    return {
        "name": "test",
        "input": {"uri": str(images)},
        "model": {"batch_size": 4, **model},
        "output": {"uri": str(tmp_path / "out")},
        "compute": {"actors": 1, "cpus_per_actor": 1, "load_batch_size": 4},
    }


def test_semantic_pipeline_equals_direct_calls(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = torchvision.models.get_model(
        "lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=4
    ).eval()
    ckpt = save_checkpoint(model, tmp_path / "lraspp.pt")
    paths = write_images(tmp_path / "in" / "nested", MIXED_SIZES, seed=1)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "in" / "ignored.txt").write_text("not an image")
    spec = parse_job(
        job(tmp_path, tmp_path / "in", task="semantic", arch="lraspp_mobilenet_v3_large", weights=str(ckpt), num_classes=4)
    )
    result = run_job(spec)
    assert (result.listed, result.processed, result.ok, result.errors) == (8, 8, 7, {"truncated": 1})

    rows = {r["uri"]: r for r in read_rows(spec.output.uri, {}).to_pylist()}
    assert len(rows) == 8
    broken = rows[str(tmp_path / "in" / "broken.png")]
    assert broken["status"] == "error" and broken["error_class"] == "truncated"
    assert str(tmp_path / "in" / "broken.png") in broken["error"] and broken["mask_uri"] is None
    for path in paths:
        row = rows[str(path)]
        assert row["status"] == "ok" and row["weights_sha256"] == result.weights_sha256
        assert row["mask_uri"] == str(tmp_path / "out" / "masks" / "nested" / f"{path.name}.png")
        mask = decode_png_label_map(Path(row["mask_uri"]).read_bytes())
        image = np.asarray(Image.open(path).convert("RGB"))
        assert (row["height"], row["width"]) == image.shape[:2] == mask.shape
        x = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
        with torch.inference_mode():
            expected = model(x[None])["out"][0].argmax(0).numpy()
        assert (mask == expected).mean() >= 0.999, path.name
        assert row["class_pixels"] == np.bincount(mask.ravel(), minlength=4).tolist()

    manifest = json.loads(Path(result.manifest_uri).read_text())
    assert manifest["counts"] == {
        "listed": 8,
        "skipped": 0,
        "new": 8,
        "changed": 0,
        "processed": 8,
        "retried": 0,
        "ok": 7,
        "error": {"truncated": 1},
    }
    assert manifest["weights"]["sha256"] == result.weights_sha256
    assert {"segbatch", "torch", "torchvision", "ray"} <= set(manifest["versions"])
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert [e["uri"] for e in errors] == [str(tmp_path / "in" / "broken.png")]
    assert pq.read_schema(next((tmp_path / "out" / "metadata").glob("*.parquet"))).metadata[
        b"segbatch.schema_version"
    ] == b"1"

    # A rerun skips everything already committed and adds no rows.
    again = run_job(spec)
    assert (again.listed, again.skipped, again.processed) == (8, 8, 0)
    assert read_rows(spec.output.uri, {}).num_rows == 8

    # A different model on the same output is refused, not silently mixed in.
    other = parse_job(job(tmp_path, tmp_path / "in", task="semantic", arch="lraspp_mobilenet_v3_large", weights="none", num_classes=4))
    from segbatch.errors import JobError

    with pytest.raises(JobError, match="already holds results made with another model"):
        run_job(other)

    # --force redoes everything with the new model; earlier parts are kept aside, not mixed in.
    forced = run_job(other, force=True)
    assert (forced.skipped, forced.processed) == (0, 8)
    now = read_rows(spec.output.uri, {}).to_pylist()
    assert len(now) == 8 and {r["weights_sha256"] for r in now} == {"none"}
    assert len(list((tmp_path / "out" / "superseded").rglob("*.parquet"))) == 2


def _box_iou(a: list[float], b: list[float]) -> float:
    ax1, ay1, ax2, ay2 = a[0], a[1], a[0] + a[2], a[1] + a[3]
    bx1, by1, bx2, by2 = b[0], b[1], b[0] + b[2], b[1] + b[3]
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


def test_instance_pipeline_equals_direct_calls(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = maskrcnn_small(num_classes=4).eval()
    ckpt = save_checkpoint(model, tmp_path / "small.pt")
    paths = write_images(tmp_path / "in", MIXED_SIZES, seed=2, ext="jpg")
    spec = parse_job(
        {
            **job(
                tmp_path,
                tmp_path / "in",
                task="instance",
                arch="segbatch.models.small:maskrcnn_small",
                weights=str(ckpt),
                num_classes=4,
                score_threshold=0.2,
                max_detections=8,
            ),
        }
    )
    result = run_job(spec)
    assert result.ok == len(paths) and not result.errors
    model.roi_heads.score_thresh = 0.2
    model.roi_heads.detections_per_img = 8
    rows = {r["uri"]: r for r in read_rows(spec.output.uri, {}).to_pylist()}
    total = 0
    for path in paths:
        row = rows[str(path)]
        image = np.asarray(Image.open(path).convert("RGB"))
        with torch.inference_mode():
            direct = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
        got = row["instances"]
        assert row["num_instances"] == len(got) == len(direct["scores"]), path.name
        assert [g["score"] for g in got] == sorted((g["score"] for g in got), reverse=True)
        for k in range(len(direct["scores"])):
            box = direct["boxes"][k].tolist()
            want = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            match = max(got, key=lambda g: _box_iou(g["bbox"], want))
            assert match["label"] == int(direct["labels"][k])
            assert np.allclose(match["bbox"], want, rtol=1e-3, atol=1e-2)
            mask = rle_to_mask(match["rle"], row["height"], row["width"])
            expected = direct["masks"][k, 0].numpy() > 0.5
            union = (mask | expected).sum()
            assert union == 0 or (mask & expected).sum() / union >= 0.99
            assert match["area"] == int(mask.sum())
            total += 1
    assert total > 0, "random weights produced no detections: lower score_threshold"


def test_laptop_actor_runs_concurrent_streams_and_masks_stay_whole(tmp_path: Path) -> None:
    """On a one-node 2-CPU Ray the actor runs two forward passes at once from the first batch.

    The probe model paints each mask with how many passes overlapped it, so the PNGs show the layout.
    """
    write_images(tmp_path / "in", [(32, 40)] * 14, seed=5)
    spec = parse_job(
        job(tmp_path, tmp_path / "in", task="semantic", arch="tests.probe_models:concurrency_probe", weights="none",
            num_classes=4, batch_size=1)
    )
    result = run_job(spec)
    assert (result.processed, result.ok) == (14, 14)
    rows = read_rows(spec.output.uri, {}).to_pylist()
    overlaps = []
    for row in rows:
        mask = decode_png_label_map(Path(row["mask_uri"]).read_bytes())
        assert mask.shape == (32, 40) and len(np.unique(mask)) == 1  # one pass's answer, whole
        overlaps.append(int(mask[0, 0]))
    # Passes run in pairs (the layout's two streams, decided before the stream starts), never more.
    assert overlaps.count(2) >= 4 and max(overlaps) == 2, overlaps
    timing = json.loads(Path(result.manifest_uri).read_text())["timing"]
    assert 0 < timing["first_result_seconds"] <= timing["last_result_seconds"] <= timing["stream_seconds"]


def test_incremental_run_processes_only_new_and_changed(tmp_path: Path) -> None:
    write_images(tmp_path / "in", [(40, 40)] * 3, seed=8)
    data = job(tmp_path, tmp_path / "in", task="semantic", arch="segbatch.models.small:unet_small", num_classes=4)
    first = run_job(parse_job(data))
    assert (first.listed, first.new, first.changed, first.ok) == (3, 3, 0, 3)

    # The prefix grows by two images and one existing image is replaced.
    write_images(tmp_path / "new", [(40, 40)] * 2, seed=9)
    for i, path in enumerate(sorted((tmp_path / "new").iterdir())):
        path.rename(tmp_path / "in" / f"late-{i}.png")
    write_images(tmp_path / "again", [(48, 40)], seed=10)[0].replace(tmp_path / "in" / "img-001.png")

    second = run_job(parse_job(data))
    assert (second.listed, second.skipped, second.new, second.changed, second.processed) == (5, 2, 2, 1, 3)
    rows = read_rows(str(tmp_path / "out"), {}).to_pylist()
    latest = {r["uri"]: r for r in sorted(rows, key=lambda r: r["committed_at"])}
    assert len(latest) == 5
    replaced = latest[str(tmp_path / "in" / "img-001.png")]
    assert (replaced["height"], replaced["width"]) == (48, 40)
    assert decode_png_label_map(Path(replaced["mask_uri"]).read_bytes()).shape == (48, 40)


def test_device_jpeg_decode_gives_the_loader_paths_results(tmp_path: Path) -> None:
    # compute.jpeg_decode: device sends JPEG bytes through Ray (Arrow binary column) to the actor.
    from tests.test_device_decode import _files

    names = sorted(_files(tmp_path / "in"))
    outputs = {}
    for mode in ("loader", "device"):
        data = job(tmp_path / mode, tmp_path / "in", task="semantic", arch="segbatch.models.small:unet_small", num_classes=4)
        data["compute"]["jpeg_decode"] = mode
        result = run_job(parse_job(data))
        assert (result.ok, result.errors) == (6, {"truncated": 1})
        outputs[mode] = {Path(r["uri"]).name: r for r in read_rows(str(tmp_path / mode / "out"), {}).to_pylist()}
    assert sorted(outputs["device"]) == names
    for name in names:
        a, b = outputs["loader"][name], outputs["device"][name]
        assert (a["status"], a["error_class"], a["width"], a["height"]) == (b["status"], b["error_class"], b["width"], b["height"])
        if a["status"] == "ok":
            ma = decode_png_label_map(Path(a["mask_uri"]).read_bytes())
            mb = decode_png_label_map(Path(b["mask_uri"]).read_bytes())
            assert ma.shape == mb.shape and (ma == mb).mean() >= 0.999, name


def test_after_stream_steps_run_before_the_manifest(tmp_path: Path) -> None:
    write_images(tmp_path / "in", [(40, 40)] * 3, seed=9)
    data = job(tmp_path, tmp_path / "in", task="semantic", arch="segbatch.models.small:unet_small", num_classes=4)
    seen: list[tuple[int, int, bool]] = []

    def step(run: object) -> None:  # a JobRun: every planned item is committed when it runs
        from segbatch.pipeline import JobRun

        assert isinstance(run, JobRun)
        manifest = Path(run.result.manifest_uri)
        seen.append((run.plan.counts.todo, read_rows(str(tmp_path / "out"), {}).num_rows, manifest.exists()))

    first = run_job(parse_job(data), after_stream=[step])
    again = run_job(parse_job(data), after_stream=[step])  # nothing to do: no stream, the step still runs
    assert seen == [(3, 3, False), (0, 3, False)]
    assert (first.ok, again.skipped) == (3, 3) and Path(again.manifest_uri).exists()
    plan = json.loads(Path(first.manifest_uri).read_text())["plan_parts"]
    assert len(plan) == 1 and pq.read_table(plan[0]).num_rows == 3  # the run's plan, kept for inspection
