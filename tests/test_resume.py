"""Kill -9 the job's whole process group at several moments, rerun: the clean run's rows and masks,
no duplicates, nothing lost, and committed items are not processed again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from segbatch.masks import decode_png_label_map
from segbatch.outputs import read_rows
from tests.varied import assert_varied_labels, write_rich_scenes

SEGBATCH = str(Path(sys.executable).with_name("segbatch"))
N_IMAGES = 24


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_rich_scenes(root / "in", count=N_IMAGES)
    return root


def write_job(root: Path, out: str) -> Path:
    job = {
        "name": "resume-test",
        "input": {"uri": str(root / "in")},
        "model": {"task": "semantic", "weights": "builtin:shapes", "batch_size": 2},
        "output": {"uri": str(root / out), "commit_rows": 3, "commit_seconds": 0.5},
        "compute": {"load_batch_size": 4},
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run(job: Path, *extra: str) -> dict:
    proc = subprocess.run([SEGBATCH, "run", str(job), *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifests = sorted((Path(yaml.safe_load(job.read_text())["output"]["uri"]) / "runs").glob("*.json"))
    return json.loads(manifests[-1].read_text())


def outputs(out: Path) -> dict[str, tuple[str, list[int], np.ndarray, str]]:
    rows = read_rows(str(out), {}).to_pylist()
    ids = [r["item_id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicated rows"
    return {
        r["item_id"]: (r["status"], r["class_pixels"], decode_png_label_map(Path(r["mask_uri"]).read_bytes()),
                       mask_key(out, Path(r["mask_uri"])))
        for r in rows
    }


@pytest.fixture(scope="module")
def clean(workspace: Path) -> dict:
    manifest = run(write_job(workspace, "clean"))
    assert manifest["counts"]["ok"] == N_IMAGES
    masks = outputs(workspace / "clean")
    # Scenes of many sizes and contents: a mask written for the wrong item cannot match by chance.
    assert_varied_labels([m for _, _, m, _ in masks.values()], min_fraction=0.75)
    return masks


def kill_when(job: Path, ready, extra: tuple[str, ...] = ()) -> None:
    """Start `segbatch run` in its own process group; SIGKILL the whole group once `ready()`."""
    proc = subprocess.Popen(
        [SEGBATCH, "run", str(job), *extra], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        assert proc.poll() is None, "the job finished before the kill point: make it longer"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def masks_written(out: Path) -> int:
    return len(list((out / "masks").rglob("*.png"))) if (out / "masks").exists() else 0


def mask_key(out: Path, path: Path) -> str:
    return str(path.relative_to(out / "masks"))


def committed(out: Path) -> int:
    return read_rows(str(out), {}).num_rows if (out / "metadata").exists() else 0


@pytest.mark.parametrize("moment", ["before_first_commit", "midway", "during_last_writes"])
def test_kill_then_rerun_equals_clean_run(workspace: Path, clean: dict, moment: str) -> None:
    out = workspace / moment
    job = write_job(workspace, moment)
    if moment == "before_first_commit":
        # Commits held back: masks are being written, nothing is committed yet.
        kill_when(job, lambda: masks_written(out) >= 4, ("--set", "output.commit_rows=1000", "--set", "output.commit_seconds=1000"))
        assert committed(out) == 0
    elif moment == "midway":
        kill_when(job, lambda: committed(out) >= 6)
        assert 0 < committed(out) < N_IMAGES
    else:
        kill_when(job, lambda: masks_written(out) >= N_IMAGES - 2)
    done_before = committed(out)

    manifest = run(job)
    counts = manifest["counts"]
    assert counts["listed"] == N_IMAGES
    assert counts["skipped"] == done_before, "committed work must not be redone"
    assert counts["processed"] == N_IMAGES - done_before
    assert counts["skipped"] + counts["ok"] + sum(counts["error"].values()) == counts["listed"]

    final = outputs(out)
    assert final.keys() == clean.keys()
    for item_id, (status, pixels, mask, key) in final.items():
        c_status, c_pixels, c_mask, c_key = clean[item_id]
        assert key == c_key, f"{item_id}: mask stored at {key}, the clean run's is at {c_key}"
        assert status == c_status == "ok"
        assert mask.shape == c_mask.shape and (mask == c_mask).mean() >= 0.999, item_id
        assert sum(pixels) == sum(c_pixels) == mask.size
    assert masks_written(out) == N_IMAGES
    assert {mask_key(out, m) for m in (out / "masks").rglob("*.png")} == {
        mask_key(workspace / "clean", m) for m in (workspace / "clean" / "masks").rglob("*.png")
    }
