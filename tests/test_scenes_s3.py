"""Scenes read from S3 (the moto server): windows by range requests, and a whole job from s3:// input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray

rasterio = pytest.importorskip("rasterio")

from segbatch.geo.read import S3_BLOCK, open_scene, read_window  # noqa: E402
from segbatch.geo.windows import Window  # noqa: E402
from segbatch.pipeline import run_job  # noqa: E402
from segbatch.spec import SceneSettings, parse_job  # noqa: E402
from segbatch.synth import write_geo_scene  # noqa: E402
from tests.s3bytes import counting_s3_fetches  # noqa: E402
from tests.test_scenes import SCENE, scene_job  # noqa: E402


@pytest.fixture(scope="module")
def bucket(s3_env: str) -> str:
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="imagery")
    return "imagery"


@pytest.fixture(scope="module")
def local_ray(s3_env: str) -> Iterator[None]:
    """Started after the AWS_* variables point at moto, so the workers inherit them."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_window_is_read_by_ranges(bucket: str, s3_env: str, tmp_path: Path) -> None:
    scene = write_geo_scene(tmp_path / "big.tif", width=2048, height=2048, spacing=200, block=256)
    with rasterio.open(scene.path) as src:
        profile = src.profile
        data = src.read()
    plain = tmp_path / "plain.tif"  # uncompressed, so the file is as large as its pixels (12 MiB)
    with rasterio.open(plain, "w", **{**profile, "compress": None}) as dst:
        dst.write(data)
    boto3.client("s3", endpoint_url=s3_env).upload_file(str(plain), bucket, "scenes/plain.tif")
    window = Window(512, 768, 256, 256)
    with counting_s3_fetches() as fetched, open_scene(f"s3://{bucket}/scenes/plain.tif", {}) as ds:
        image, mask = read_window(ds, window, SceneSettings())
    expected = np.moveaxis(data[:, 768:1024, 512:768], 0, -1)
    assert (image == expected).all() and mask.shape == (256, 256)
    size = plain.stat().st_size
    # the header's block and the window's block, out of 12 MiB: never the whole file
    assert size > 12_000_000 and 0 < sum(fetched) <= 2 * S3_BLOCK < size / 3, (fetched, size)


def test_scene_job_from_s3(bucket: str, s3_env: str, local_ray: None, tmp_path: Path) -> None:
    scene = write_geo_scene(tmp_path / "scene.tif", **SCENE)
    boto3.client("s3", endpoint_url=s3_env).upload_file(str(scene.path), bucket, "run/area/scene.tif")
    spec = parse_job(scene_job(f"s3://{bucket}/run/", f"s3://{bucket}/out/"))  # type: ignore[arg-type]
    result = run_job(spec)
    assert (result.processed, result.ok) == (9, 9)
    local = tmp_path / "cog.tif"
    boto3.client("s3", endpoint_url=s3_env).download_file(bucket, "out/masks/area/scene.tif.tif", str(local))
    with rasterio.open(local) as cog, rasterio.open(scene.path) as src:
        assert (cog.crs, cog.transform) == (src.crs, src.transform)
        labels = cog.read(1)
    assert (labels == scene.labels).mean() > 0.99
    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_env).list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert "out/polygons/area/scene.tif.parquet" in keys and any(k.startswith("out/scenes/part-") for k in keys)
