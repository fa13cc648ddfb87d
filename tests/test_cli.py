"""The `segbatch` console script as a user runs it: exit codes, one-line errors, the summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tests.conftest import write_images

SEGBATCH = str(Path(sys.executable).with_name("segbatch"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SEGBATCH, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def write_job(tmp_path: Path, **model: object) -> Path:
    job = {
        "name": "cli-test",
        "input": {"uri": str(tmp_path / "in")},
        "model": {"task": "semantic", "arch": "segbatch.models.small:unet_small", "num_classes": 4, **model},
        "output": {"uri": str(tmp_path / "out")},
        "run": {"max_error_fraction": 0.0},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_run_exit_codes_budget_and_summary(tmp_path: Path) -> None:
    write_images(tmp_path / "in", [(40, 56), (56, 40), (40, 40)])
    (tmp_path / "in" / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    job = write_job(tmp_path)

    over_budget = run_cli("run", str(job), cwd=tmp_path)
    assert over_budget.returncode == 1, over_budget.stderr[-2000:]
    assert "FAILED (error budget exceeded)" in over_budget.stdout
    # Everything was still written: 4 rows committed, 3 masks.
    rows = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok", "ok"]
    assert len(list((tmp_path / "out" / "masks").glob("*.png"))) == 3

    within = run_cli("run", str(job), "--set", "run.max_error_fraction=0.5", cwd=tmp_path)
    assert within.returncode == 0, within.stderr[-2000:]
    summary = within.stdout
    assert "listed 4 · skipped 4 (already done) · processed 0" in summary
    assert f"{tmp_path / 'out'}/masks/" in summary and "manifest" in summary


def test_job_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    write_images(tmp_path / "in", [(32, 32)])
    missing = run_cli("run", str(write_job(tmp_path, weights=str(tmp_path / "nope.pt"))), cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == f"segbatch: job failed: model.weights: checkpoint '{tmp_path / 'nope.pt'}' not found"
    assert "Started a local Ray" not in missing.stderr  # refused before Ray starts

    nowhere = run_cli("run", str(write_job(tmp_path)), "--set", f"input.uri={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert nowhere.returncode == 1
    assert f"input.uri '{tmp_path / 'nowhere'}': not found" in nowhere.stderr.strip().splitlines()[-1]

    job = write_job(tmp_path)
    gpu = run_cli("run", str(job), "--set", "compute.gpus_per_actor=1", cwd=tmp_path)
    assert gpu.returncode == 1
    assert "compute.gpus_per_actor is 1.0 but the Ray cluster has no GPUs" in gpu.stderr

    bad = run_cli("run", str(job), "--set", "model.task=panoptic", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"segbatch: error: {job}: key 'model.task' has invalid value \"panoptic\": Input should be 'semantic' or 'instance'"


def test_plan_lists_and_reads_the_ledger_without_ray(tmp_path: Path) -> None:
    from segbatch.models import resolve_weights
    from segbatch.plan import item_id_for
    from segbatch.sinks import Committer
    from segbatch.spec import load_job
    from tests.test_outputs import _rows

    paths = write_images(tmp_path / "in", [(32, 32)] * 4)
    job = write_job(tmp_path)
    spec = load_job(job)
    fresh = run_cli("plan", str(job), cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "listed 4 · new 4 · changed 0 · already done 0 · to process 4" in fresh.stdout
    assert "Started a local Ray" not in fresh.stderr

    # Commit one image as it is now and another in an earlier version, as a run of this job would have.
    fingerprint = spec.result_fingerprint(resolve_weights(spec.model).sha256)
    listed = {p: f"{p.stat().st_size}-{p.stat().st_mtime}" for p in paths}
    rows = _rows([str(paths[0]), str(paths[1])], "", fingerprint=fingerprint).to_pydict()
    rows["item_id"] = [item_id_for(str(paths[0]), listed[paths[0]]), item_id_for(str(paths[1]), "older")]
    committer = Committer(spec.output, "r1", {"segbatch.task": "semantic"})
    committer.add(pa.table(rows, schema=pa.schema(_rows([], "").schema)))
    committer.flush()
    again = run_cli("plan", str(job), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "listed 4 · new 2 · changed 1 · already done 1 · to process 3" in again.stdout
    assert not (tmp_path / "out" / "runs").exists()  # a plan alone writes nothing

    other = run_cli("plan", str(job), "--set", "model.num_classes=5", cwd=tmp_path)
    assert other.returncode == 1 and "already holds results made with another model" in other.stderr.strip().splitlines()[-1]
    nowhere = run_cli("plan", str(job), "--set", f"input.uri={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert nowhere.returncode == 1
    assert nowhere.stderr.strip().splitlines()[-1] == f"segbatch: job failed: input.uri '{tmp_path / 'nowhere'}': not found (no such folder or prefix: {tmp_path / 'nowhere'})"
