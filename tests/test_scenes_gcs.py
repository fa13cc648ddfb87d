"""Scenes on gs:// (a real GCS JSON-API endpoint: gcp-storage-emulator as a separate process): a window
read by ranges through gcsfs, and a whole scene job from gs:// input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray

# gcsfs asks GCS's gRPC control API whether a bucket is hierarchical; the emulator speaks JSON only.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

rasterio = pytest.importorskip("rasterio")
gcsfs = pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

from segbatch.geo.read import open_scene, read_window  # noqa: E402
from segbatch.geo.windows import Window  # noqa: E402
from segbatch.pipeline import run_job  # noqa: E402
from segbatch.spec import SceneSettings, parse_job  # noqa: E402
from segbatch.synth import write_geo_scene  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.test_scenes import SCENE, scene_job  # noqa: E402

OPTIONS = {"token": "anon", "project": "test"}


@pytest.fixture(scope="module")
def gcs() -> Iterator[gcsfs.GCSFileSystem]:
    """The emulator on 127.0.0.1, `STORAGE_EMULATOR_HOST` pointing at it (gcsfs reads it), a bucket."""
    import socket

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        fs = gcsfs.GCSFileSystem(**OPTIONS, skip_instance_cache=True)
        fs.mkdir("imagery")
        yield fs
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if before is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = before


@pytest.fixture(scope="module")
def local_ray(gcs: gcsfs.GCSFileSystem) -> Iterator[None]:
    """Started once STORAGE_EMULATOR_HOST is set, so the workers inherit it."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_window_is_read_by_ranges_from_gcs(gcs: gcsfs.GCSFileSystem, tmp_path: Path) -> None:
    scene = write_geo_scene(tmp_path / "big.tif", width=2048, height=2048, spacing=200, block=256)
    with rasterio.open(scene.path) as src:
        profile, data = src.profile, src.read()
    plain = tmp_path / "plain.tif"  # uncompressed: the file is as large as its pixels (12 MiB)
    with rasterio.open(plain, "w", **{**profile, "compress": None}) as dst:
        dst.write(data)
    gcs.put(str(plain), "imagery/scenes/plain.tif")
    fetched: list[int] = []
    original = gcsfs.core.GCSFileSystem._cat_file_sequential  # every GET of object bytes goes through it

    async def counting(self: object, path: str, start: int | None = None, end: int | None = None, **kw: object) -> bytes:
        out = await original(self, path, start, end, **kw)
        fetched.append(len(out))
        return out

    gcsfs.core.GCSFileSystem._cat_file_sequential = counting
    try:
        with open_scene("gs://imagery/scenes/plain.tif", OPTIONS) as ds:
            image, _ = read_window(ds, Window(512, 768, 256, 256), SceneSettings(storage_options=OPTIONS))
    finally:
        gcsfs.core.GCSFileSystem._cat_file_sequential = original
    assert (image == np.moveaxis(data[:, 768:1024, 512:768], 0, -1)).all()
    size = plain.stat().st_size
    assert size > 12_000_000 and 0 < sum(fetched) < size / 3, (fetched, size)  # ranges, never the whole file


def test_scene_job_from_gcs(gcs: gcsfs.GCSFileSystem, local_ray: None, tmp_path: Path) -> None:
    scene = write_geo_scene(tmp_path / "scene.tif", **SCENE)
    gcs.put(str(scene.path), "imagery/run/area/scene.tif")
    job = scene_job("gs://imagery/run/", tmp_path / "out")  # type: ignore[arg-type]
    job["input"]["storage_options"] = OPTIONS
    result = run_job(parse_job(job))
    assert (result.processed, result.ok) == (9, 9)
    with rasterio.open(tmp_path / "out" / "masks" / "area" / "scene.tif.tif") as cog, rasterio.open(scene.path) as src:
        assert (cog.crs, cog.transform) == (src.crs, src.transform)
        labels = cog.read(1)
    assert len(np.unique(scene.labels)) >= 3 and (labels == scene.labels).mean() > 0.99
