"""A scene job killed with SIGKILL mid-scene, then rerun: only the windows not committed are planned,
and the COG and the polygons equal those of a run that was never interrupted.

`segbatch run` runs as a subprocess (its own local Ray) in its own process group; the whole group is
killed once some window rows are committed and others are not (polled from `metadata/`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

rasterio = pytest.importorskip("rasterio")
shapely = pytest.importorskip("shapely")

from segbatch.geo.windows import grid  # noqa: E402
from segbatch.outputs import read_rows  # noqa: E402
from segbatch.synth import write_geo_scene  # noqa: E402

SEGBATCH = str(Path(sys.executable).with_name("segbatch"))
WIDTH, HEIGHT, SIZE, OVERLAP = 800, 600, 128, 32
WINDOWS = len(grid(WIDTH, HEIGHT, SIZE, OVERLAP))  # 8 x 6 = 48
COG = Path("masks") / "area" / "scene.tif.tif"
POLYGONS = Path("polygons") / "area" / "scene.tif.parquet"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scene-kill")
    write_geo_scene(root / "in" / "area" / "scene.tif", width=WIDTH, height=HEIGHT, spacing=100, shape_size=(40.0, 56.0), seed=10_000_321)
    return root


def write_job(root: Path, out: str) -> Path:
    job = {
        "name": "scene-kill",
        "input": {"uri": str(root / "in")},
        # batch 1: every window is computed alone, so a window gives the same labels whichever run computes it
        "model": {"task": "semantic", "weights": "builtin:shapes", "batch_size": 1},
        "output": {"uri": str(root / out), "commit_rows": 4, "commit_seconds": 0.2},
        "compute": {"actors": 1, "load_batch_size": 4},
        "tiling": {"size": SIZE, "overlap": OVERLAP, "polygon_window": 256},
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run(job: Path) -> dict:
    proc = subprocess.run([SEGBATCH, "run", str(job)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(yaml.safe_load(job.read_text())["output"]["uri"])
    return json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())


def committed_ids(out: Path) -> list[str]:
    if not (out / "metadata").exists():
        return []
    return read_rows(str(out), {}, ["item_id"])["item_id"].to_pylist()


def polygons(out: Path) -> list[tuple[int, float]]:
    table = pq.read_table(out / POLYGONS, columns=["label", "geometry"])
    areas = [shapely.from_wkb(g).area for g in table["geometry"].to_pylist()]
    return sorted(zip(table["label"].to_pylist(), areas))


@pytest.fixture(scope="module")
def clean(workspace: Path) -> tuple[np.ndarray, list[tuple[int, float]]]:
    manifest = run(write_job(workspace, "clean"))
    assert (manifest["counts"]["ok"], manifest["counts"]["error"]) == (WINDOWS, {})
    with rasterio.open(workspace / "clean" / COG) as cog:
        labels = cog.read(1)
    present = [c for c in range(1, 4) if (labels == c).sum() >= 500]
    assert len(present) >= 2, np.bincount(labels.ravel())  # the model finds shapes: the comparison means something
    shapes = polygons(workspace / "clean")
    assert len(shapes) >= 10
    return labels, shapes


def test_kill_mid_scene_then_rerun_equals_clean_run(workspace: Path, clean: tuple) -> None:
    clean_labels, clean_shapes = clean
    out = workspace / "killed"
    job = write_job(workspace, "killed")
    proc = subprocess.Popen([SEGBATCH, "run", str(job)], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None and len(committed_ids(out)) < 8:
            time.sleep(0.05)
        assert proc.poll() is None, "the job finished before the kill point: make the scene larger"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = committed_ids(out)
    assert 8 <= len(before) < WINDOWS, len(before)
    assert not (out / COG).exists() and not (out / "scenes").exists()  # the scene is not finished yet

    manifest = run(job)
    counts = manifest["counts"]
    assert (counts["listed"], counts["skipped"], counts["processed"]) == (WINDOWS, len(before), WINDOWS - len(before))
    plan = pq.read_table(out / "runs" / manifest["run_id"] / "plan", columns=["item_id"])["item_id"].to_pylist()
    assert len(plan) == WINDOWS - len(before) and not set(plan) & set(before), "the rerun plans only the missing windows"

    ids = committed_ids(out)
    assert len(ids) == len(set(ids)) == WINDOWS, "every window committed exactly once"
    scene_rows = pq.read_table(out / "scenes").to_pylist()
    assert [(r["status"], r["windows"]) for r in scene_rows] == [("ok", WINDOWS)]
    with rasterio.open(out / COG) as cog:
        assert (cog.read(1) == clean_labels).all(), "the COG differs from the uninterrupted run's"
    shapes = polygons(out)
    assert len(shapes) == len(clean_shapes) == scene_rows[0]["polygons"]
    assert [s[0] for s in shapes] == [s[0] for s in clean_shapes]
    assert np.allclose([s[1] for s in shapes], [s[1] for s in clean_shapes])
