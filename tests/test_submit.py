"""`segbatch submit`: local validation, staging, auth, and real multi-node runs through Ray's Jobs API.

The multi-node tests start their own two-node Ray cluster (`ray.cluster_utils.Cluster`): a head
without GPUs and a worker with one logical GPU, dashboard on 127.0.0.1 at a free port, token
authentication on, and a private RAY_TMPDIR so no other Ray user on this machine can find it (and
`ray.init()` elsewhere never connects to it). Only the processes it started are stopped.

Every node gets its own temp dir, as every machine of a real cluster has its own disk. Sharing one
would share the runtime_env folder: a node added mid-job re-extracts the job's working_dir there
(Ray's agent deletes and unpacks it again), pulling the current directory out from under the
running actors of the other node (seen in CI: an actor importing torch died with "oneMKL FATAL
ERROR: Cannot load libtorch_cpu.so").
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from segbatch import cli, submit
from segbatch.spec import SpecError, load_job
from segbatch.synth import write_scene_folder
from tests.varied import assert_varied_labels, write_rich_scenes

BIN = Path(sys.executable).parent
SEGBATCH = str(BIN / "segbatch")
SECRET = "s3cr3t-value-never-printed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_job(path: Path, images: Path, output: Path, batch_size: int = 2, **compute: Any) -> Path:
    job = {
        "name": path.stem,
        "input": {"uri": str(images)},
        "model": {
            "task": "semantic",
            "weights": "builtin:shapes",
            "batch_size": batch_size,
        },
        "output": {"uri": str(output), "commit_rows": 1000},
        "compute": {"actors": 1, "gpus_per_actor": 1, "cpus_per_actor": 1, "load_batch_size": 2, **compute},
        "run": {"max_error_fraction": 0.0},
    }
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


# ---------------------------------------------------------------- local behaviour (no cluster)


def test_default_submission_id_is_job_name_and_utc_date(tmp_path: Path) -> None:
    spec = load_job(_write_job(tmp_path / "nightly.yaml", tmp_path, tmp_path / "out"))
    late = datetime(2026, 3, 4, 23, 30, tzinfo=timezone.utc)
    assert submit.default_submission_id(spec, late) == "nightly-20260304"
    assert submit.default_submission_id(spec).endswith(datetime.now(timezone.utc).strftime("-%Y%m%d"))


def test_staged_copy_holds_only_the_job_with_overrides_applied(tmp_path: Path) -> None:
    job = _write_job(tmp_path / "j.yaml", tmp_path / "in", tmp_path / "out")
    with submit.staged_job(job, ["model.batch_size=8", "compute.actors=[1, 3]"]) as (spec, staged):
        assert [p.name for p in staged.parent.iterdir()] == ["j.yaml"]
        copy = load_job(staged)
        assert copy == spec
        assert copy.model.batch_size == 8 and copy.compute.actors == (1, 3)
        folder = staged.parent
    assert not folder.exists()
    assert load_job(job).model.batch_size == 2  # the user's file is untouched


def test_bad_job_exits_2_before_contacting_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    job = _write_job(tmp_path / "j.yaml", tmp_path / "in", tmp_path / "out")

    def no_contact(address: str) -> None:
        raise AssertionError("Ray was contacted for an invalid job")

    monkeypatch.setattr(submit, "connect", no_contact)
    rc = cli.main(["submit", str(job), "--address", "http://127.0.0.1:1", "--set", "model.batch_sise=3"])
    assert rc == 2
    assert "unknown key 'model.batch_sise'" in capsys.readouterr().err
    with pytest.raises(SpecError):
        with submit.staged_job(tmp_path / "missing.yaml"):
            pass


def test_unreachable_cluster_exits_1_without_printing_storage_options(
    tmp_path: Path, capsys: Any, caplog: Any
) -> None:
    job = _write_job(tmp_path / "j.yaml", tmp_path / "in", tmp_path / "out")
    data = yaml.safe_load(job.read_text())
    data["input"]["storage_options"] = {"secret": SECRET}
    data["output"]["storage_options"] = {"key": SECRET}
    job.write_text(yaml.safe_dump(data))
    rc = cli.main(["submit", str(job), "--address", f"http://127.0.0.1:{_free_port()}"])
    out = capsys.readouterr()
    assert rc == 1
    assert "cannot reach the Ray Jobs API" in out.err
    assert SECRET not in out.out + out.err + caplog.text


def test_auth_headers_follow_rays_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert submit.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.auth_headers() == {"Authorization": "Bearer from-home"}
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert submit.auth_headers() == {"Authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit.auth_headers() == {}
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "nope"))
    with pytest.raises(submit.SubmitError, match="RAY_AUTH_TOKEN_PATH"):
        submit.auth_headers()


# ---------------------------------------------------------------- a real two-node cluster


class _TestCluster:
    def __init__(self, cluster: Any, worker: Any, url: str, tmp: str) -> None:
        self.cluster, self.worker, self.url, self.tmp = cluster, worker, url, tmp


def _node_temp_dir(cluster_tmp: str) -> str:
    """A node's own temp dir, inside the cluster's (short: Ray puts unix sockets under it)."""
    return tempfile.mkdtemp(prefix="n", dir=cluster_tmp)


def _ensure_default_token() -> None:
    """Token auth needs a token; use (or create, as `ray.init()` would) ~/.ray/auth_token."""
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists():
        from ray._private.authentication.authentication_token_setup import generate_and_save_token

        generate_and_save_token()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[_TestCluster]:
    from ray._raylet import Config  # type: ignore[attr-defined]
    from ray.cluster_utils import Cluster

    _ensure_default_token()
    tmp = tempfile.mkdtemp(prefix="sbt", dir="/tmp")  # short: Ray puts unix sockets under it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # `segbatch` for entrypoints
        Config.initialize("")  # this process now speaks token auth to the cluster, as ray.init() does
        port = _free_port()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "num_gpus": 0,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": port,
                # Ray's default agent port (52365) may belong to another Ray on this machine.
                "dashboard_agent_listen_port": _free_port(),
            },
        )
        try:
            worker = cluster.add_node(num_cpus=2, num_gpus=1, temp_dir=_node_temp_dir(tmp))
            url = f"http://127.0.0.1:{port}"
            _wait_for_jobs_api(url)
            yield _TestCluster(cluster, worker, url, tmp)
        finally:
            cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
    Config.initialize("")


def _wait_for_jobs_api(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            submit.connect(url).list_jobs()
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _cli_env() -> dict[str, str]:
    """The environment of a user's shell: no RAY_AUTH_MODE, so segbatch must find the token itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _actors(url: str, submission_id: str) -> list[Any]:
    from ray.util.state import list_actors

    job_id = submit.connect(url).get_job_info(submission_id).job_id
    if job_id is None:  # the driver has not started yet
        return []
    actors = list_actors(address=url, filters=[("job_id", "=", job_id)], detail=True, limit=10_000)
    # The predict stage's Ray Data worker: MapWorker(MapBatches(PredictStage)) (models/remote.PredictStage)
    return [a for a in actors if "MapWorker" in a.class_name and "PredictStage" in a.class_name]


def _rows(output: Path) -> list[dict[str, Any]]:
    table = pq.ParquetDataset(str(output / "metadata")).read()
    table = table.drop(["run_id", "committed_at", "mask_uri"]).sort_by("item_id")
    return table.to_pylist()


def _masks(output: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(output)): np.asarray(Image.open(p)) for p in sorted((output / "masks").rglob("*.png"))}


def test_unauthenticated_requests_are_refused(ray_cluster: _TestCluster) -> None:
    import requests

    assert requests.get(f"{ray_cluster.url}/api/jobs/", timeout=10).status_code == 401


def test_submit_runs_predict_on_the_gpu_worker_and_matches_a_local_run(
    ray_cluster: _TestCluster, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    write_rich_scenes(images, count=4)
    job = _write_job(tmp_path / "mn.yaml", images, tmp_path / "out-cluster")
    sid = f"mn-{tmp_path.name}"

    proc = subprocess.run(
        [SEGBATCH, "submit", str(job), "--address", ray_cluster.url, "--id", sid, "--wait"],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"submitted {sid}" in proc.stdout and f"{sid} SUCCEEDED" in proc.stdout
    assert "ok 4" in proc.stdout  # the job's own summary, streamed from the cluster

    actors = _actors(ray_cluster.url, sid)
    assert actors, "no predict actors were recorded for the job"
    assert {a.node_id for a in actors} == {ray_cluster.worker.node_id}

    # The same job, run locally on CPU (its own Ray, its own temp dir): the same rows and pixels.
    local_tmp, local_out = tempfile.mkdtemp(prefix="sbl", dir="/tmp"), tmp_path / "out-local"
    try:
        local = subprocess.run(
            [SEGBATCH, "run", str(job), "--set", "compute.gpus_per_actor=0", "--set", f"output.uri={local_out}"],
            env={**_cli_env(), "RAY_TMPDIR": local_tmp},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(local_tmp, ignore_errors=True)
    assert local.returncode == 0, local.stdout[-4000:] + local.stderr[-4000:]
    cluster_rows, local_rows = _rows(tmp_path / "out-cluster"), _rows(tmp_path / "out-local")
    assert len(cluster_rows) == 4 and all(r["status"] == "ok" for r in cluster_rows)
    assert cluster_rows == local_rows
    cluster_masks, local_masks = _masks(tmp_path / "out-cluster"), _masks(tmp_path / "out-local")
    assert len(cluster_masks) == 4 and cluster_masks.keys() == local_masks.keys()
    assert_varied_labels(list(local_masks.values()), min_fraction=0.75)
    for key, pixels in cluster_masks.items():
        np.testing.assert_array_equal(pixels, local_masks[key], err_msg=key)

    # The same id again: not started twice; with --wait it reports the first run's outcome.
    out, err = io.StringIO(), io.StringIO()
    args = cli._parser().parse_args(["submit", str(job), "--address", ray_cluster.url, "--id", sid, "--wait"])
    assert submit.cmd_submit(args, out, err) == 0
    assert f"{sid} already submitted" in out.getvalue() and f"{sid} SUCCEEDED" in out.getvalue()
    assert len(submit.connect(ray_cluster.url).list_jobs()) == len(
        {j.submission_id for j in submit.connect(ray_cluster.url).list_jobs()}
    )


def test_failed_job_exits_1_with_wait(ray_cluster: _TestCluster, tmp_path: Path) -> None:
    job = _write_job(tmp_path / "broken.yaml", tmp_path, tmp_path / "out")
    data = yaml.safe_load(job.read_text())
    data["model"] = {**data["model"], "arch": "lraspp_mobilenet_v3_large", "num_classes": 4,
                     "weights": str(tmp_path / "no-such-checkpoint.pt")}  # a valid job file that fails on the cluster
    job.write_text(yaml.safe_dump(data))
    sid = f"broken-{tmp_path.name}"
    out, err = io.StringIO(), io.StringIO()
    args = cli._parser().parse_args(["submit", str(job), "--address", ray_cluster.url, "--id", sid, "--wait"])
    assert submit.cmd_submit(args, out, err) == 1
    assert f"{sid} FAILED" in out.getvalue()
    assert "no-such-checkpoint.pt" in out.getvalue()  # the job's own error line, streamed back


def test_gpu_node_added_mid_job_gets_predict_actors(ray_cluster: _TestCluster, tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_scene_folder(images, count=64, seed=2)
    # Cheap, parallel loads and a model made slow by upsampling (resize 800): the predict stage is the
    # bottleneck, so Ray Data wants a second actor, which can only start once a second GPU exists.
    # 64 images at resize 800 keep one actor busy for ~35 s here (at 640 an idle machine finished them in
    # ~20 s, before the added node had an actor); the added node needs ~15 s to start a worker that
    # has imported torch and built the model (with 32 images the job sometimes ended first).
    job = _write_job(
        tmp_path / "grow.yaml",
        images,
        tmp_path / "out",
        batch_size=4,
        actors=[1, 2],
        load_batch_size=4,
        cpus_per_loader=0.25,
    )
    data = yaml.safe_load(job.read_text())
    data["model"] = {**data["model"], "arch": "lraspp_mobilenet_v3_large", "weights": "none", "num_classes": 4, "resize": 800}
    job.write_text(yaml.safe_dump(data))
    sid = f"grow-{tmp_path.name}"
    args = cli._parser().parse_args(["submit", str(job), "--address", ray_cluster.url, "--id", sid])
    assert submit.cmd_submit(args, io.StringIO(), io.StringIO()) == 0

    client = submit.connect(ray_cluster.url)
    deadline = time.time() + 180
    while not _actors(ray_cluster.url, sid):  # the job is running and its actor pool exists
        assert time.time() < deadline, client.get_job_logs(sid)[-4000:]
        status = str(client.get_job_status(sid).value)
        assert status in ("PENDING", "RUNNING"), client.get_job_logs(sid)[-4000:]
        time.sleep(0.5)
    new_node = ray_cluster.cluster.add_node(num_cpus=1, num_gpus=1, temp_dir=_node_temp_dir(ray_cluster.tmp))
    try:
        status = submit.follow_job(client, sid, io.StringIO())
        logs = client.get_job_logs(sid)
        assert status == "SUCCEEDED", logs[-4000:]
        nodes = {a.node_id for a in _actors(ray_cluster.url, sid)}
        assert new_node.node_id in nodes, f"no predict actor on the added GPU node (actors on {nodes})\n{logs[-4000:]}"
        assert len(_rows(tmp_path / "out")) == 64
    finally:
        ray_cluster.cluster.remove_node(new_node)
