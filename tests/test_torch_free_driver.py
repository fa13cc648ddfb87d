"""The driver of a job never imports torch: the weights are proved in a one-shot Ray worker
(`segbatch.models.remote`), and a checkpoint that does not fit still stops the job with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("rasterio")

from segbatch.synth import write_geo_scene  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

DRIVER = """
import json, sys
from segbatch.errors import JobError
from segbatch.pipeline import run_job
from segbatch.spec import parse_job
jobs = json.loads(sys.argv[1])
try:
    run_job(parse_job(jobs["bad"]))
    error = None
except JobError as e:
    error = str(e)
result = run_job(parse_job(jobs["good"]))
print(json.dumps({"error": error, "ok": result.ok, "torch": "torch" in sys.modules}))
"""


def job(inputs: Path, out: Path, weights: str) -> dict:
    return {
        "name": "torch-free",
        "input": {"uri": str(inputs)},
        "model": {"task": "semantic", "arch": "tests.probe_models:color_probe", "weights": weights, "num_classes": 4},
        "output": {"uri": str(out)},
        "compute": {"actors": 1},
        "tiling": {"size": 256, "overlap": 32},
    }


def test_scene_job_driver_never_imports_torch(tmp_path: Path) -> None:
    write_geo_scene(tmp_path / "in" / "scene.tif", width=300, height=300, spacing=100)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(3, 3, 3, 3)}}, bad)  # not color_probe's keys
    jobs = {"bad": job(tmp_path / "in", tmp_path / "bad-out", str(bad)), "good": job(tmp_path / "in", tmp_path / "out", "none")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["error"] == f"checkpoint '{bad}' does not fit the model: missing keys ['smooth1.weight', 'smooth2.weight'] (check model.arch)"
    assert report["ok"] == 4  # 2 x 2 windows
    assert report["torch"] is False, "the driver imported torch"
