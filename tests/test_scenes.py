"""Scenes end to end on a real local Ray: seam exactness, bands/scale, the label COG, polygons across
seams, per-window resume, bad scenes as error rows (S3 range reads: tests/test_scenes_s3.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")

from segbatch.geo.polygons import polygonize  # noqa: E402
from segbatch.geo.read import open_scene, to_uint8  # noqa: E402
from segbatch.geo.scenes import read_scene_rows  # noqa: E402
from segbatch.geo.windows import Window, core_of, grid, starts  # noqa: E402
from segbatch.outputs import read_rows  # noqa: E402
from segbatch.pipeline import run_job  # noqa: E402
from segbatch.spec import ScaleSpec, parse_job  # noqa: E402
from segbatch.synth import GeoScene, write_geo_scene  # noqa: E402
from tests.probe_models import color_probe  # noqa: E402

CLASSES = ["background", "circle", "rectangle", "triangle"]
SIZE, OVERLAP = 256, 32
# 512² internal tiles: 256/32 windows cannot align to them (an aligned window would be 544 px), so these
# tests run the plain grid (9 windows, inner core edges at 240 and 464); block-aligned windows have their own test
SCENE = {"width": 600, "height": 500, "spacing": 100, "shape_size": (40.0, 56.0), "seed": 10_000_123, "block": 512}


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def scene_job(inputs: Path, out: Path, **input_keys: object) -> dict:
    return {
        "name": "scenes",
        "input": {"uri": str(inputs), **input_keys},
        "model": {
            "task": "semantic", "arch": "tests.probe_models:color_probe", "weights": "none",
            "num_classes": 4, "classes": CLASSES, "batch_size": 2,
        },
        "output": {"uri": str(out)},
        "compute": {"actors": 1, "load_batch_size": 4},
        "tiling": {"size": SIZE, "overlap": OVERLAP, "polygon_window": 200},
    }


def whole_scene_labels(image_chw: np.ndarray) -> np.ndarray:
    """The probe model on the whole scene in one call (the predictor's normalisation)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = (torch.from_numpy(image_chw).float() / 255 - mean) / std
    with torch.inference_mode():
        return color_probe(4).eval()(x[None])["out"][0].argmax(0).numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GeoScene, object]:
    root = tmp_path_factory.mktemp("rgb")
    scene = write_geo_scene(root / "in" / "area" / "scene.tif", truth=root / "truth", truth_key="area/scene.tif", **SCENE)
    spec = parse_job(scene_job(root / "in", root / "out"))
    result = run_job(spec)
    return root, scene, result


# --- tiling maths (no Ray) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,size,overlap,block",
    [(600, 256, 32, None), (500, 256, 32, None), (256, 256, 32, None), (257, 256, 32, None), (100, 256, 0, None),
     (1000, 128, 31, None), (1300, 512, 64, 512), (1100, 512, 64, 256), (1000, 256, 32, 256), (700, 300, 45, 128)],
)
def test_cores_tile_the_axis_exactly(n: int, size: int, overlap: int, block: int | None) -> None:
    wins = grid(n, n, size, overlap, (block, block) if block else None)
    if block:
        assert all(w.col_off % block == 0 and w.row_off % block == 0 for w in wins)
    owner = np.zeros((n, n), dtype=np.int32)
    for w in wins:
        c = core_of(w, n, n, overlap)
        assert w.col_off <= c.col_off and c.col_off + c.width <= w.col_off + w.width
        owner[c.row_off : c.row_off + c.height, c.col_off : c.col_off + c.width] += 1
    assert (owner == 1).all()
    firsts = starts(n, size, overlap)
    assert firsts[0] == 0 and firsts[-1] + size >= n


def test_block_alignment_widens_windows_only_a_little() -> None:
    assert [w.width for w in grid(1300, 10, 512, 64, (10, 512))] == [576, 576, 276]
    assert [w.col_off for w in grid(1300, 10, 512, 64, (10, 512))] == [0, 512, 1024]
    assert grid(600, 500, 256, 32, (512, 512)) == grid(600, 500, 256, 32)  # 544 px would be too far from 256


def test_scale_maps_uint16_back_to_uint8() -> None:
    values = np.arange(256, dtype=np.uint16)[None, None, :].repeat(3, axis=0) * 10
    out = to_uint8(values, "uint16", ScaleSpec(min=0, max=2550))
    assert (out[0, :, 0] == np.arange(256)).all() and out.shape == (1, 256, 3)


# --- end to end ----------------------------------------------------------------------------------------


def test_stitched_labels_equal_the_whole_scene(rgb_run: tuple) -> None:
    root, scene, result = rgb_run
    assert (result.processed, result.ok, result.errors) == (9, 9, {})
    with rasterio.open(scene.path) as src:
        image = src.read()
    whole = whole_scene_labels(image)
    counts = np.bincount(whole.ravel(), minlength=4) / whole.size
    assert (counts >= 0.05).sum() >= 2, counts  # the model's output varies: the check means something
    with rasterio.open(root / "out" / "masks" / "area" / "scene.tif.tif") as cog:
        labels = cog.read(1)
    valid = labels != 255
    assert (labels[valid] == whole[valid]).mean() >= 0.9999
    # and the model reproduces the generator's truth closely (edges of shapes aside)
    assert (labels == scene.labels).mean() > 0.99


def test_windows_of_a_blocked_file_start_on_its_blocks(tmp_path: Path) -> None:
    """512² internal tiles, tiling 512/64: 576-px windows every 512 px, each read from 2x2 blocks; the
    labels equal those of a striped copy (the plain 512/64 grid) and of the whole scene in one call."""
    keys = {**SCENE, "width": 1300, "height": 1100}
    keys.pop("block")
    tiled = write_geo_scene(tmp_path / "tiled" / "s.tif", block=512, **keys)
    write_geo_scene(tmp_path / "striped" / "s.tif", block=None, **keys)
    labels, plans = {}, {}
    for name in ("tiled", "striped"):
        job = scene_job(tmp_path / name, tmp_path / f"out-{name}")
        job["tiling"] = {"size": 512, "overlap": 64, "polygon_window": 512}
        assert run_job(parse_job(job)).ok == 9
        plans[name] = pq.read_table(next((tmp_path / f"out-{name}" / "runs").glob("*/plan/*.parquet"))).to_pylist()
        with rasterio.open(tmp_path / f"out-{name}" / "masks" / "s.tif.tif") as cog:
            labels[name] = cog.read(1)
    with rasterio.open(tiled.path) as src:
        assert src.block_shapes[0] == (512, 512)
        whole = whole_scene_labels(src.read())
    tiled_plan = plans["tiled"]
    assert sorted({(r["col_off"], r["row_off"]) for r in tiled_plan}) == [(c, r) for c in (0, 512, 1024) for r in (0, 512, 1024)]
    assert {r["win_width"] for r in tiled_plan} == {576, 1300 - 1024}
    assert sorted({r["col_off"] for r in plans["striped"]}) == [0, 448, 896]  # strips: the plain grid
    owner = np.zeros((1100, 1300), dtype=np.int32)
    for r in tiled_plan:
        c = core_of(Window(r["col_off"], r["row_off"], r["win_width"], r["win_height"]), 1300, 1100, 64)
        owner[c.row_off : c.row_off + c.height, c.col_off : c.col_off + c.width] += 1
    assert (owner == 1).all()
    counts = np.bincount(whole.ravel(), minlength=4) / whole.size
    assert (counts >= 0.03).sum() >= 2, counts
    valid = labels["tiled"] != 255
    assert valid.mean() > 0.99 and (labels["tiled"][valid] == whole[valid]).mean() >= 0.9999
    assert (labels["tiled"] == labels["striped"]).all()


def test_label_cog_is_valid_and_georeferenced_like_the_input(rgb_run: tuple) -> None:
    from rio_cogeo.cogeo import cog_validate

    root, scene, _ = rgb_run
    cog_path = root / "out" / "masks" / "area" / "scene.tif.tif"
    valid, errors, warnings = cog_validate(str(cog_path))
    assert valid and not errors and not warnings, (errors, warnings)
    with rasterio.open(cog_path) as cog, rasterio.open(scene.path) as src:
        assert (cog.crs, cog.transform, cog.width, cog.height) == (src.crs, src.transform, src.width, src.height)
        assert cog.dtypes[0] == "uint8" and cog.nodata == 255 and cog.profile["tiled"]
        assert cog.overviews(1) and json.loads(cog.tags()["segbatch_classes"]) == CLASSES
        labels = cog.read(1)
        nodata_in = (src.read() == src.nodata).all(axis=0)
    assert ((labels == 255) == nodata_in).all() and nodata_in.sum() == 64 * 64
    rows = read_scene_rows(str(root / "out"), {}).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["windows"] == 9
    assert rows[0]["mask_uri"] == str(cog_path) and rows[0]["width"] == 600 and "32633" in rows[0]["crs"]


def test_polygons_merge_across_seams(rgb_run: tuple) -> None:
    import duckdb

    root, scene, _ = rgb_run
    path = root / "out" / "polygons" / "area" / "scene.tif.parquet"
    frame = gpd.read_parquet(path)
    truth = gpd.read_file(scene.truth_polygons)
    assert len(truth) == scene.objects
    # one polygon per shape, shapes across seams included (4 tile seams cut through this scene)
    assert len(frame) == scene.objects
    assert sorted(frame["label"]) == sorted(truth["label"])
    assert frame.crs.to_epsg() == 32633 and set(frame.columns) >= {"label", "class_name", "geometry", "rel_key", "uri"}
    assert "bbox" in pq.read_schema(path).names
    # the same polygons as one whole-raster polygonize call
    labels, polys, _, _ = polygonize(root / "out" / "masks" / "area" / "scene.tif.tif", window=10_000)
    assert len(polys) == len(frame)
    assert sorted(round(p.area) for p in polys) == sorted(round(a) for a in frame.geometry.area)
    crossing = 0
    for seam in (240, 464):  # inner core edges (pixels) along x
        x = 500_000 + seam * 10
        crossing += int(((frame.geometry.bounds.minx < x) & (frame.geometry.bounds.maxx > x)).sum())
    assert crossing >= 2
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    assert geo["version"].startswith("1.1") and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["covering"]["bbox"]
    count = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()[0][0]
    assert count == len(frame)


def test_bands_and_scale_give_the_rgb_labels(rgb_run: tuple, tmp_path: Path) -> None:
    root, _, _ = rgb_run
    scene = write_geo_scene(tmp_path / "in" / "area" / "scene.tif", kind="uint16x4", **SCENE)
    with open_scene(str(scene.path), {}) as ds:
        assert ds.count == 4 and ds.dtypes[0] == "uint16"
    spec = parse_job(scene_job(tmp_path / "in", tmp_path / "out", bands=[3, 2, 1], scale={"min": 0, "max": 2550}))
    result = run_job(spec)
    assert result.ok == 9
    with rasterio.open(tmp_path / "out" / "masks" / "area" / "scene.tif.tif") as a, rasterio.open(
        root / "out" / "masks" / "area" / "scene.tif.tif"
    ) as b:
        assert (a.read(1) == b.read(1)).all()


@pytest.fixture(scope="module")
def rgb_percentile_labels(rgb_run: tuple, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The 8-bit RGB scene's labels scaled by its own 2nd-98th percentiles."""
    root, scene, _ = rgb_run
    out = tmp_path_factory.mktemp("rgb-percentile")
    assert run_job(parse_job(scene_job(scene.path.parent.parent, out, scale={"percentile": [2, 98]}))).ok == 9
    with rasterio.open(out / "masks" / "area" / "scene.tif.tif") as cog:
        return cog.read(1)


@pytest.mark.parametrize(
    "kind,nodata_in_file,scale",
    [
        ("uint16x4", True, {"percentile": [2, 98]}),
        ("int16x4", True, {"min": -1000, "max": 1550}),
        ("int16x4", False, {"percentile": [2, 98]}),
        ("float32x4", True, {"min": 0, "max": 1}),
        ("float32x4", False, {"percentile": [2, 98]}),
    ],
)
def test_int16_and_float32_scenes_give_the_rgb_labels(
    rgb_run: tuple, rgb_percentile_labels: np.ndarray, tmp_path: Path, kind: str, nodata_in_file: bool, scale: dict
) -> None:
    """uint16 / int16 (negative values) / float32 scenes, nodata from the file (NaN for float32) or from
    `input.nodata`, scaled back to the 8-bit values: the RGB scene's labels, the same nodata corner."""
    from segbatch.synth import GEO_NODATA_INT16

    root, _, _ = rgb_run
    scene = write_geo_scene(tmp_path / "in" / "area" / "scene.tif", kind=kind, nodata_in_file=nodata_in_file, **SCENE)  # type: ignore[arg-type]
    with rasterio.open(scene.path) as src:
        assert src.dtypes[0] == kind[:-2] and (src.nodata is not None) == nodata_in_file
        if kind == "int16x4":
            assert src.read(1).min() < 0 and (src.read(1) > 0).any()
    keys: dict[str, object] = {"bands": [3, 2, 1], "scale": scale}
    if not nodata_in_file:
        keys["nodata"] = GEO_NODATA_INT16 if kind == "int16x4" else -1.0
    result = run_job(parse_job(scene_job(tmp_path / "in", tmp_path / "out", **keys)))
    assert (result.ok, result.errors) == (9, {})
    with rasterio.open(tmp_path / "out" / "masks" / "area" / "scene.tif.tif") as cog:
        labels = cog.read(1)
    if "percentile" in scale:
        expected = rgb_percentile_labels
    else:
        with rasterio.open(root / "out" / "masks" / "area" / "scene.tif.tif") as cog:
            expected = cog.read(1)
    assert len(set(np.unique(expected).tolist()) - {255}) >= 3 and (expected == 255).sum() == 64 * 64
    if kind == "float32x4" and "percentile" in scale:
        # v/255 in float32 and its percentiles scale to k + 0.5 +- 1e-7 where the 8-bit values give exactly
        # k + 0.5 (the synthetic values tie): ~5% of pixels land one level apart, 2 of 300,000 labels differ
        assert ((labels == 255) == (expected == 255)).all() and (labels == expected).mean() >= 0.9999
    else:
        assert (labels == expected).all()


def test_resume_redoes_only_uncommitted_windows(rgb_run: tuple, tmp_path: Path) -> None:
    root, scene, _ = rgb_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    # a run killed mid-scene: 4 of 9 windows committed, no COG, polygons or scene row yet
    (part,) = (out / "metadata").glob("*.parquet")
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 4), part)
    for folder in ("masks", "polygons", "scenes"):
        shutil.rmtree(out / folder)
    kept = set(table.slice(0, 4)["item_id"].to_pylist())
    spec = parse_job(scene_job(scene.path.parent.parent, out))
    result = run_job(spec)
    assert (result.skipped, result.new + result.changed, result.processed) == (4, 5, 5)
    rows = read_rows(str(out), {})
    assert len(rows) == 9 and not kept & set(rows.filter(pa.compute.equal(rows["run_id"], result.run_id))["item_id"].to_pylist())
    with rasterio.open(out / "masks" / "area" / "scene.tif.tif") as a, rasterio.open(root / "out" / "masks" / "area" / "scene.tif.tif") as b:
        assert (a.read(1) == b.read(1)).all()
    assert [r["status"] for r in read_scene_rows(str(out), {}).to_pylist()] == ["ok"]
    # and a third run has nothing left to do
    again = run_job(spec)
    assert (again.processed, again.skipped) == (0, 9)


def test_a_scene_killed_after_its_last_commit_is_finished_by_the_rerun(rgb_run: tuple, tmp_path: Path) -> None:
    """Every window committed, the run killed before assembling: the rerun streams nothing (the model is
    never built) and still writes the COG, with the class names from the committed parts."""
    root, scene, _ = rgb_run
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    for folder in ("masks", "polygons", "scenes"):
        shutil.rmtree(out / folder)
    result = run_job(parse_job(scene_job(scene.path.parent.parent, out)))
    assert (result.processed, result.skipped) == (0, 9)
    with rasterio.open(out / "masks" / "area" / "scene.tif.tif") as a, rasterio.open(root / "out" / "masks" / "area" / "scene.tif.tif") as b:
        assert (a.read(1) == b.read(1)).all()
        assert json.loads(a.tags()["segbatch_classes"]) == CLASSES
    assert [r["status"] for r in read_scene_rows(str(out), {}).to_pylist()] == ["ok"]


def test_bad_scenes_are_error_rows(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    good = write_geo_scene(inputs / "good.tif", width=300, height=260, spacing=100, seed=5, block=512)
    (inputs / "noise.tif").write_bytes(np.random.default_rng(0).bytes(5000))
    data = good.path.read_bytes()
    (inputs / "cut.tif").write_bytes(data[: len(data) // 3])
    with rasterio.open(inputs / "int32.tif", "w", driver="GTiff", width=64, height=64, count=3, dtype="int32") as dst:
        dst.write(np.ones((3, 64, 64), dtype=np.int32))
    with rasterio.open(inputs / "complex.tif", "w", driver="GTiff", width=64, height=64, count=3, dtype="complex64") as dst:
        dst.write(np.ones((3, 64, 64), dtype=np.complex64))
    with rasterio.open(inputs / "gray.tif", "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 64, 64), dtype=np.uint8))
    spec = parse_job(scene_job(inputs, tmp_path / "out", bands=[3, 2, 1]))
    result = run_job(spec)
    rows = {Path(r["uri"]).name: r for r in read_rows(str(tmp_path / "out"), {}).to_pylist()}
    assert rows["noise.tif"]["error_class"] == "not_an_image"
    assert rows["cut.tif"]["error_class"] == "truncated"
    assert rows["int32.tif"]["error_class"] == "unsupported" and "int32" in rows["int32.tif"]["error"]
    complex_error = rows["complex.tif"]["error"]
    assert rows["complex.tif"]["error_class"] == "unsupported" and "complex64" in complex_error
    assert complex_error.startswith(str(inputs / "complex.tif")) and "\n" not in complex_error
    assert rows["gray.tif"]["error_class"] == "unsupported" and "bands" in rows["gray.tif"]["error"]
    assert rows["good.tif"]["status"] == "ok" and result.ok == 4  # 2x2 windows
    scenes = {Path(r["uri"]).name: r for r in read_scene_rows(str(tmp_path / "out"), {}).to_pylist()}
    assert scenes["good.tif"]["status"] == "ok"
    assert {scenes[n]["status"] for n in ("noise.tif", "cut.tif", "int32.tif", "complex.tif", "gray.tif")} == {"error"}
    assert scenes["cut.tif"]["error_class"] == "truncated"
    # four scenes refused while planning (one row each); the cut one's header reads, its 4 windows do not
    errors = pq.read_table(tmp_path / "out" / "errors")
    assert errors.num_rows == 4 + 4 and "good.tif" not in {Path(u).name for u in errors["uri"].to_pylist()}
    assert "4 of 4 windows failed" in scenes["cut.tif"]["error"]


def test_blend_weights_ramp_at_inner_edges_only() -> None:
    from segbatch.geo.blend import axis_weights, window_weights

    assert axis_weights(0, 256, 600, 32)[0] == 1 and axis_weights(448, 152, 600, 32)[-1] == 1  # the scene's edges
    assert axis_weights(224, 256, 600, 32)[0] < 0.05 and axis_weights(0, 256, 600, 32)[-1] < 0.05  # inner edges
    total = np.zeros((500, 600), dtype=np.float32)
    for w in grid(600, 500, SIZE, OVERLAP):
        total[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width] += window_weights(w, 600, 500, OVERLAP)
    assert np.allclose(total, 1.0, atol=1e-6)  # neighbouring ramps cross-fade: every pixel weighs 1 in all


@pytest.fixture(scope="module")
def weighted_run(rgb_run: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, scene, _ = rgb_run
    out = tmp_path_factory.mktemp("weighted") / "out"
    job = scene_job(scene.path.parent.parent, out)
    job["tiling"]["blend"] = "weighted"
    assert run_job(parse_job(job)).ok == 9
    return out


def test_weighted_blending_equals_the_whole_scene_and_labels_the_outer_frame(rgb_run: tuple, weighted_run: Path) -> None:
    from rio_cogeo.cogeo import cog_validate

    root, scene, _ = rgb_run
    parts = sorted((weighted_run / "parts" / "area" / "scene.tif").iterdir())
    assert len(parts) == 9 and {p.suffix for p in parts} == {".npz"}
    cog_path = weighted_run / "masks" / "area" / "scene.tif.tif"
    assert cog_validate(str(cog_path))[0]
    with rasterio.open(scene.path) as src:
        image = src.read()
        nodata_in = (image == src.nodata).all(axis=0)
    whole = whole_scene_labels(image)
    with rasterio.open(cog_path) as cog:
        labels = cog.read(1)
    assert len(np.unique(whole)) >= 3
    assert ((labels == 255) == nodata_in).all()
    assert (labels[~nodata_in] == whole[~nodata_in]).mean() >= 0.9999
    frame = np.zeros_like(nodata_in)
    frame[0, :] = frame[-1, :] = frame[:, 0] = frame[:, -1] = True
    frame &= ~nodata_in
    assert frame.sum() > 2000 and (labels[frame] != 255).all() and (labels[frame] == whole[frame]).all()
    frame_polys = gpd.read_parquet(weighted_run / "polygons" / "area" / "scene.tif.parquet")
    assert len(frame_polys) == scene.objects


def test_weighted_blending_differs_from_core_on_a_position_dependent_model(rgb_run: tuple, tmp_path: Path) -> None:
    """Both into one output: switching `blend` changes the fingerprint, and `--force` then finishes the
    scene again (its earlier scene row is moved aside with the window rows)."""
    from segbatch.errors import JobError

    root, scene, _ = rgb_run
    labels = {}
    for blend in ("core", "weighted"):
        job = scene_job(scene.path.parent.parent, tmp_path / "out")
        job["model"]["arch"] = "tests.probe_models:position_probe"
        job["tiling"]["blend"] = blend
        if blend == "weighted":
            with pytest.raises(JobError, match="another model, weights or preprocessing"):
                run_job(parse_job(job))
        assert run_job(parse_job(job), force=blend == "weighted").ok == 9
        with rasterio.open(tmp_path / "out" / "masks" / "area" / "scene.tif.tif") as cog:
            labels[blend] = cog.read(1)
    assert len(read_scene_rows(str(tmp_path / "out"), {})) == 1  # the core run's row is under superseded/
    for blend in labels:
        assert len(set(np.unique(labels[blend]).tolist()) - {255}) == 3
    differ = (labels["core"] != labels["weighted"]).mean()
    assert differ > 0.01, differ  # blending mixes neighbouring windows across every seam
    # away from the seams (more than half an overlap inside a core) both modes take the same window
    assert (labels["core"][:200, :200] == labels["weighted"][:200, :200]).all()


def test_weighted_blending_is_refused_for_instance_jobs(tmp_path: Path) -> None:
    from segbatch.spec import SpecError

    job = scene_job(tmp_path, tmp_path / "out")
    job["model"]["task"] = "instance"
    job["tiling"]["blend"] = "weighted"
    with pytest.raises((SpecError, ValueError), match="blend: weighted .*model.task: semantic"):
        parse_job(job)


def test_eval_scores_a_scene_against_its_truth(rgb_run: tuple) -> None:
    from segbatch.evaluate import evaluate_output, format_report

    root, scene, _ = rgb_run
    report = evaluate_output(str(root / "out"), str(root / "truth"))
    assert report["kind"] == "scenes" and report["images"]["evaluated"] == 1
    assert report["metrics"]["mIoU"] > 0.9 and report["metrics"]["pixel_accuracy"] > 0.99
    objects = report["objects"]
    assert objects["truth"] == objects["predicted"] == objects["matched"] == scene.objects
    text = format_report(report)
    assert "mIoU" in text and f"matched {scene.objects}" in text


def test_scene_demo_screen_says_where_the_outputs_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from segbatch.demo import run_scene_demo

    assert run_scene_demo(tmp_path) == 0
    screen = capsys.readouterr().out
    cog = tmp_path / "demo-output" / "scenes" / "masks" / "scene.tif.tif"
    polygons = tmp_path / "demo-output" / "scenes" / "polygons" / "scene.tif.parquet"
    assert cog.exists() and polygons.exists()
    assert f"COG      {cog}" in screen and f"polygons {polygons}" in screen and "QGIS" in screen and "duckdb" in screen


def test_instance_objects_on_seams_are_counted_once(tmp_path: Path) -> None:
    scene = write_geo_scene(tmp_path / "in" / "scene.tif", truth=tmp_path / "truth", **SCENE)
    job = scene_job(tmp_path / "in", tmp_path / "out")
    job["model"] = {"task": "instance", "arch": "tests.probe_models:shape_instance_probe", "weights": "none",
                    "num_classes": 4, "classes": CLASSES, "batch_size": 2}
    result = run_job(parse_job(job))
    assert result.ok == 9
    frame = gpd.read_parquet(tmp_path / "out" / "polygons" / "scene.tif.parquet")
    truth = gpd.read_file(scene.truth_polygons)
    # shapes (40-56 px) are larger than the overlap (32 px): the ones on seams are cut in every window
    assert len(frame) == len(truth) == scene.objects
    assert sorted(frame["label"]) == sorted(truth["label"]) and (frame["score"] > 0.8).all()
    from segbatch.geo.evaluate import match_polygons

    assert match_polygons(truth, frame, threshold=0.9) == scene.objects  # each object whole, not a piece
    rows = read_rows(str(tmp_path / "out"), {}).to_pylist()
    assert sum(r["num_instances"] for r in rows) > scene.objects  # seam objects left pieces in two windows: merged


def test_instance_scene_writes_an_instance_id_cog(tmp_path: Path) -> None:
    """builtin:shapes (Mask R-CNN) with output.instance_png: instances/<rel_key>.tif, a uint16 COG whose
    pixel values are the GeoParquet rows' instance_id, georeferenced like the input."""
    from rasterio.features import rasterize
    from rio_cogeo.cogeo import cog_validate

    scene = write_geo_scene(tmp_path / "in" / "scene.tif", truth=tmp_path / "truth", **SCENE)
    job = scene_job(tmp_path / "in", tmp_path / "out")
    job["model"] = {"task": "instance", "weights": "builtin:shapes", "batch_size": 2}
    job["output"]["instance_png"] = True
    assert run_job(parse_job(job)).ok == 9
    frame = gpd.read_parquet(tmp_path / "out" / "polygons" / "scene.tif.parquet")
    assert len(frame) >= scene.objects * 0.8, (len(frame), scene.objects)  # the model finds most shapes
    assert frame["instance_id"].tolist() == list(range(1, len(frame) + 1))
    path = tmp_path / "out" / "instances" / "scene.tif.tif"
    valid, errors, warnings = cog_validate(str(path))
    assert valid and not errors, errors
    with rasterio.open(path) as cog, rasterio.open(scene.path) as src:
        assert (cog.crs, cog.transform, cog.width, cog.height) == (src.crs, src.transform, src.width, src.height)
        assert cog.dtypes[0] == "uint16" and cog.nodata is None and cog.overviews(1)
        ids = cog.read(1)
        transform = src.transform
    present = set(np.unique(ids).tolist())
    assert 0 in present and present - {0} == set(frame["instance_id"])
    # each object's pixels lie in its polygon, and all of them where no higher-scored object overlaps it
    matched = 0
    for instance_id, geom in zip(frame["instance_id"], frame.geometry):
        own = rasterize([(geom, 1)], out_shape=ids.shape, transform=transform, dtype="uint8").astype(bool)
        mine = ids == instance_id
        assert own.sum() and (mine & ~own).sum() == 0
        matched += int((mine == own).all())
    assert matched >= len(frame) * 0.8, (matched, len(frame))
    # exactly the rows' polygons (map coordinates) painted whole-scene in one call, lowest score first
    order = sorted(range(len(frame)), key=lambda k: (float(frame["score"].iloc[k]), -k))
    shapes = [(frame.geometry.iloc[k], int(frame["instance_id"].iloc[k])) for k in order]
    assert (ids == rasterize(shapes, out_shape=ids.shape, transform=transform, dtype="uint16")).all()
    # without instance_png, no instance COG
    job["output"]["uri"] = str(tmp_path / "plain")
    job["output"]["instance_png"] = False
    assert run_job(parse_job(job)).ok == 9 and not (tmp_path / "plain" / "instances").exists()


def test_a_tiff_without_georeferencing_runs_in_pixel_coordinates(tmp_path: Path) -> None:
    scene = write_geo_scene(tmp_path / "geo.tif", width=300, height=260, spacing=100, seed=7)
    with rasterio.open(scene.path) as src:
        data = src.read()
    plain = tmp_path / "in" / "plain.tif"
    plain.parent.mkdir()
    with rasterio.open(plain, "w", driver="GTiff", width=300, height=260, count=3, dtype="uint8") as dst:
        dst.write(data)
    result = run_job(parse_job(scene_job(tmp_path / "in", tmp_path / "out")))
    assert result.ok == 4
    (row,) = read_scene_rows(str(tmp_path / "out"), {}).to_pylist()
    assert row["status"] == "ok" and row["crs"] is None and "not georeferenced" in row["warning"]
    frame = gpd.read_parquet(tmp_path / "out" / "polygons" / "plain.tif.parquet")
    assert frame.crs is None and len(frame) == scene.objects and frame.total_bounds[2] <= 300


def test_segbatch_plan_counts_windows(rgb_run: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from segbatch.cli import main

    root, scene, _ = rgb_run
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(scene_job(scene.path.parent.parent, root / "out")))
    assert main(["plan", str(job)]) == 0
    printed = capsys.readouterr().out
    assert "listed 9 · new 0 · changed 0 · already done 9 · to process 0" in printed, printed


def test_percentile_scale_comes_from_an_overview_or_sampled_windows(tmp_path: Path) -> None:
    from segbatch.geo.read import percentile_scale
    from segbatch.spec import SceneSettings

    scene = write_geo_scene(tmp_path / "in" / "s.tif", kind="uint16x4", width=700, height=600, spacing=100, seed=3)
    settings = SceneSettings(bands=(3, 2, 1), scale=ScaleSpec(percentile=(0, 100)))
    with open_scene(str(scene.path), {}) as ds:
        assert not ds.overviews(1)
        sampled = percentile_scale(ds, settings)  # 16 windows: nodata (0) left out
    assert min(sampled.min) >= 300 and max(sampled.max) <= 2550
    with rasterio.open(scene.path, "r+") as ds:
        ds.build_overviews([2], rasterio.enums.Resampling.nearest)
    with open_scene(str(scene.path), {}) as ds:
        assert ds.overviews(1) == [2]
        from_overview = percentile_scale(ds, settings)
    assert max(from_overview.max) == 2100 and min(from_overview.min) >= 300  # the shapes' 210 * 10
    with pytest.raises(ValueError, match="not both"):
        ScaleSpec(min=0, max=1, percentile=(2, 98))
    result = run_job(parse_job(scene_job(tmp_path / "in", tmp_path / "out", bands=[3, 2, 1], scale={"percentile": [2, 98]})))
    assert result.ok == 9
    plan = pq.read_table(next((tmp_path / "out" / "runs").glob("*/plan/*.parquet")))
    assert len(plan["scale_min"][0].as_py()) == 3 and plan["scale_max"][0].as_py() == plan["scale_max"][8].as_py()


def test_a_stac_item_collection_as_input(rgb_run: tuple, tmp_path: Path) -> None:
    from segbatch.geo.stac import band_names

    root, scene, _ = rgb_run
    target = tmp_path / "data" / "scene.tif"
    target.parent.mkdir()
    shutil.copy(scene.path, target)
    asset = {"href": "data/scene.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
             "roles": ["data"], "bands": [{"name": "red"}, {"name": "green"}, {"name": "blue"}]}
    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "stac_version": "1.1.0", "id": "tile-1", "geometry": None, "properties": {},
         "assets": {"thumbnail": {"href": "thumb.png", "type": "image/png"}, "visual": asset}},
    ]}
    (tmp_path / "items.json").write_text(json.dumps(collection))
    assert band_names(asset) == ["red", "green", "blue"]
    assert band_names({"eo:bands": [{"common_name": "nir"}]}) == ["nir"]
    result = run_job(parse_job(scene_job(tmp_path / "items.json", tmp_path / "out", assets=["visual"])))
    assert result.ok == 9
    with rasterio.open(tmp_path / "out" / "masks" / "tile-1" / "visual.tif") as a, rasterio.open(
        root / "out" / "masks" / "area" / "scene.tif.tif"
    ) as b:
        assert (a.read(1) == b.read(1)).all()


def _split_bands(source: Path, folder: Path, names: tuple[str, ...], decimate: str | None = None) -> dict[str, dict]:
    """Each band of `source` as its own single-band COG-like tiled GeoTIFF (`decimate`: that one at half size)."""
    folder.mkdir(parents=True, exist_ok=True)
    assets = {}
    with rasterio.open(source) as src:
        profile = {**src.profile, "count": 1}
        for index, name in enumerate(names, start=1):
            data, meta = src.read(index), dict(profile)
            if name == decimate:
                data = data[::2, ::2]
                meta.update(width=data.shape[1], height=data.shape[0], transform=src.transform * src.transform.scale(2, 2))
            with rasterio.open(folder / f"{name}.tif", "w", **meta) as dst:
                dst.write(data, 1)
            assets[name] = {"href": f"bands/{name}.tif", "type": "image/tiff; application=geotiff", "roles": ["data"],
                            "eo:bands": [{"name": name, "common_name": name}]}
    return assets


def test_a_stac_item_with_one_file_per_band_is_stacked(rgb_run: tuple, tmp_path: Path) -> None:
    """`assets: [red, green, blue]`: three single-band files read window by window give the RGB file's labels."""
    root, scene, _ = rgb_run
    assets = _split_bands(scene.path, tmp_path / "bands", ("red", "green", "blue"))
    items = [{"type": "Feature", "stac_version": "1.1.0", "id": "tile-1", "geometry": None, "properties": {}, "assets": assets}]
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    with rasterio.open(root / "out" / "masks" / "area" / "scene.tif.tif") as ds:
        expected = ds.read(1)
    assert len(set(np.unique(expected)) - {255}) >= 3  # the RGB run found every class: a fair comparison

    result = run_job(parse_job(scene_job(tmp_path / "items.json", tmp_path / "out", assets=["red", "green", "blue"])))
    assert result.ok == 9 and not result.errors
    (row,) = read_scene_rows(str(tmp_path / "out"), {}).to_pylist()
    assert row["uri"] == f"{tmp_path / 'items.json'}#tile-1" and row["status"] == "ok"
    with rasterio.open(tmp_path / "out" / "masks" / "tile-1.tif") as ds:
        assert (ds.read(1) == expected).all()
    # Assets in another order, bands picked back by index: the same scene, the same labels.
    swapped = scene_job(tmp_path / "items.json", tmp_path / "out-bgr", assets=["blue", "green", "red"], bands=[3, 2, 1])
    assert run_job(parse_job(swapped)).ok == 9
    with rasterio.open(tmp_path / "out-bgr" / "masks" / "tile-1.tif") as ds:
        assert (ds.read(1) == expected).all()


def test_stacked_assets_on_different_grids_are_an_error_row_naming_the_asset(rgb_run: tuple, tmp_path: Path) -> None:
    _, scene, _ = rgb_run
    assets = _split_bands(scene.path, tmp_path / "bands", ("red", "green", "blue"), decimate="blue")
    items = [{"type": "Feature", "stac_version": "1.1.0", "id": "tile-2", "geometry": None, "properties": {}, "assets": assets}]
    (tmp_path / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    result = run_job(parse_job(scene_job(tmp_path / "items.json", tmp_path / "out", assets=["red", "green", "blue"])))
    assert result.ok == 0
    (row,) = read_rows(str(tmp_path / "out"), {}).to_pylist()
    assert row["error_class"] == "unsupported"
    assert "asset 'blue'" in row["error"] and "resample" in row["error"] and "\n" not in row["error"]
