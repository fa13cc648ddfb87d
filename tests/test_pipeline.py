"""End to end on a real local Ray: equivalence with direct model calls, outputs, error rows, resume."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from segbatch.load import Loader
from segbatch.masks import decode_png_label_map, rle_to_mask
from segbatch.pipeline import run_job
from segbatch.result import format_summary
from segbatch.outputs import read_rows
from segbatch.spec import parse_job
from segbatch.synth import write_scene_folder
from tests.conftest import write_images
from tests.varied import (
    assert_varied_instances,
    assert_varied_labels,
    builtin_shapes_detector,
    direct_instances,
    direct_labels,
    read_rgb,
    varied_lraspp_checkpoint,
)

MIXED_SIZES = [(72, 96), (96, 72), (72, 96), (64, 64), (72, 96), (80, 120), (96, 72)]


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
    model, ckpt = varied_lraspp_checkpoint(tmp_path / "lraspp.pt")
    paths = write_images(tmp_path / "in" / "nested", MIXED_SIZES, seed=1)
    expected = {path: direct_labels(model, read_rgb(path)) for path in paths}
    assert_varied_labels(list(expected.values()))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "in" / "ignored.txt").write_text("not an image")
    spec = parse_job(
        job(tmp_path, tmp_path / "in", task="semantic", arch="lraspp_mobilenet_v3_large", weights=str(ckpt), num_classes=4)
    )
    result = run_job(spec)
    assert (result.listed, result.processed, result.ok, result.errors) == (8, 8, 7, {"truncated": 1})

    rows = {r["uri"]: r for r in read_rows(spec.output.uri, {}).to_pylist()}
    assert len(rows) == 8
    tally = Counter("ok" if r["status"] == "ok" else r["error_class"] for r in rows.values())
    assert tally == Counter({"ok": result.ok, **result.errors})  # the run counts what it committed
    broken = rows[str(tmp_path / "in" / "broken.png")]
    assert broken["status"] == "error" and broken["error_class"] == "truncated"
    assert str(tmp_path / "in" / "broken.png") in broken["error"] and broken["mask_uri"] is None
    for path in paths:
        row = rows[str(path)]
        assert row["status"] == "ok" and row["weights_sha256"] == result.weights_sha256
        assert row["mask_uri"] == str(tmp_path / "out" / "masks" / "nested" / f"{path.name}.png")
        mask = decode_png_label_map(Path(row["mask_uri"]).read_bytes())
        assert (row["height"], row["width"]) == expected[path].shape == mask.shape
        assert (mask == expected[path]).mean() >= 0.999, path.name
        assert row["class_pixels"] == np.bincount(mask.ravel(), minlength=4).tolist()

    manifest = json.loads(Path(result.manifest_uri).read_text())
    assert manifest["counts"] == {
        "listed": 8,
        "skipped": 0,
        "new": 8,
        "changed": 0,
        "excluded": 0,
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
    ] == b"2"

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


def test_instance_pipeline_equals_direct_calls(tmp_path: Path) -> None:
    """builtin:shapes on generated scenes: every committed instance is the detector's own, mask for mask."""
    paths = write_scene_folder(tmp_path / "in", count=8, seed=10_000_000)
    detector = builtin_shapes_detector(score_threshold=0.3, max_detections=8)
    expected = {path: direct_instances(detector, read_rgb(path)) for path in paths}
    assert_varied_instances(expected.values(), min_images=6, min_objects=20)
    spec = parse_job(
        job(tmp_path, tmp_path / "in", task="instance", weights="builtin:shapes", score_threshold=0.3, max_detections=8)
    )
    result = run_job(spec)
    assert result.ok == len(paths) and not result.errors
    rows = {r["uri"]: r for r in read_rows(spec.output.uri, {}).to_pylist()}
    for path, want in expected.items():
        row = rows[str(path)]
        got = row["instances"]
        assert row["num_instances"] == len(got) == len(want), path.name
        assert [g["score"] for g in got] == sorted((g["score"] for g in got), reverse=True)
        for g, e in zip(got, sorted(want, key=lambda d: -d["score"])):
            mask = rle_to_mask(g["rle"], row["height"], row["width"])
            assert mask.shape == e["mask"].shape and g["label"] == e["label"], path.name
            assert abs(g["score"] - e["score"]) < 1e-4, path.name
            assert (mask & e["mask"]).sum() / (mask | e["mask"]).sum() >= 0.99, path.name
            assert g["area"] == int(mask.sum())
            ys, xs = np.nonzero(mask)
            assert g["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert len(g["detector_bbox"]) == 4

    # An output written as schema version 1 (bbox was the detector's box) still reads and resumes.
    before = read_rows(spec.output.uri, {}).to_pylist()
    for part in (tmp_path / "out" / "metadata").glob("*.parquet"):
        _rewrite_as_v1(part)
    after = read_rows(spec.output.uri, {}).to_pylist()
    assert [r["instances"] for r in after] == [r["instances"] for r in before]
    again = run_job(spec)
    assert (again.listed, again.skipped, again.processed) == (len(paths), len(paths), 0)


def _rewrite_as_v1(part: Path) -> None:
    """Write a part as segbatch 0.1's schema version 1 wrote it: `bbox` held the detector's box."""
    import pyarrow as pa

    table = pq.read_table(part)
    v1_instance = pa.struct([("label", pa.int32()), ("score", pa.float32()), ("bbox", pa.list_(pa.float32(), 4)),
                             ("area", pa.int64()), ("rle", pa.string())])
    instances = [
        None if row is None else [{**{k: i[k] for k in ("label", "score", "area", "rle")}, "bbox": i["detector_bbox"]} for i in row]
        for row in table["instances"].to_pylist()
    ]
    table = table.set_column(table.schema.get_field_index("instances"), "instances", pa.array(instances, pa.list_(v1_instance)))
    metadata = {**table.schema.metadata, b"segbatch.schema_version": b"1"}
    pq.write_table(table.replace_schema_metadata(metadata), part)


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
    for r in latest.values():  # every mask sits at masks/<its own input key>.png
        key = str(Path(r["uri"]).relative_to(tmp_path / "in"))
        assert (r["rel_key"], r["mask_uri"]) == (key, str(tmp_path / "out" / "masks" / f"{key}.png")), r["uri"]


def test_an_output_inside_the_input_never_feeds_on_itself(tmp_path: Path) -> None:
    write_images(tmp_path / "in", [(40, 40)] * 3, seed=11)
    data = job(tmp_path, tmp_path / "in", task="semantic", arch="segbatch.models.small:unet_small", num_classes=4)
    data["output"]["uri"] = str(tmp_path / "in" / "out")
    first = run_job(parse_job(data))
    assert (first.listed, first.excluded, first.ok) == (3, 0, 3)
    assert len(list((tmp_path / "in" / "out" / "masks").glob("*.png"))) == 3

    second = run_job(parse_job(data))  # the three masks now lie under input.uri: not inputs
    assert (second.listed, second.skipped, second.processed, second.excluded) == (3, 3, 0, 3)
    assert not (tmp_path / "in" / "out" / "masks" / "out").exists()  # no masks of masks
    assert "3 objects under output.uri left out" in format_summary(second)


def test_device_jpeg_decode_gives_the_loader_paths_results(tmp_path: Path) -> None:
    # compute.jpeg_decode: device sends JPEG bytes through Ray (Arrow binary column) to the actor.
    from tests.test_device_decode import _files

    names = sorted(_files(tmp_path / "in"))
    model, ckpt = varied_lraspp_checkpoint(tmp_path / "lraspp.pt")
    decoded = [Loader()({"uri": np.asarray([str(tmp_path / "in" / n)], dtype=object), "size": np.asarray([0])}) for n in names]
    assert_varied_labels([direct_labels(model, d["image"][0]) for d in decoded if d["status"][0] == "ok"])
    outputs = {}
    for mode in ("loader", "device"):
        data = job(tmp_path / mode, tmp_path / "in", task="semantic", arch="lraspp_mobilenet_v3_large",
                   weights=str(ckpt), num_classes=4)
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
