"""Storage problems found before any work, as one line (segbatch/preflight.py), on a real moto S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml

from segbatch import cli
from segbatch.errors import JobError
from segbatch.preflight import check_storage
from segbatch.spec import parse_job
from tests.conftest import free_port, moto_server_process, write_images

SEGBATCH = str(Path(sys.executable).with_name("segbatch"))
BUCKET = "preflight-in"
OUT_BUCKET = "preflight-out"
#: Preflight answers in about a second; the rest is the interpreter importing torch. Generous for a
#: busy 2-core machine, and far below a job's run (or 26 s of retries).
FAST = 15.0


@pytest.fixture(scope="module")
def s3(s3_env: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[boto3.client]:
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    client.create_bucket(Bucket=OUT_BUCKET)
    local = tmp_path_factory.mktemp("preflight-src")
    for path in write_images(local, [(32, 40), (40, 32)], seed=3):
        client.upload_file(str(path), BUCKET, f"photos/{path.name}")
    yield client


def _job(tmp_path: Path, input_uri: str, output_uri: str, **model: object) -> Path:
    job = {
        "name": "preflight-test",
        "input": {"uri": input_uri},
        "model": {"task": "semantic", "arch": "segbatch.models.small:unet_small", "num_classes": 4, **model},
        "output": {"uri": output_uri},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [SEGBATCH, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    return proc, time.monotonic() - started


def _one_line_failure(proc: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exit 1 and one `job failed` line, no traceback, no Ray."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Started a local Ray" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("segbatch: job failed:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == proc.stderr.strip().splitlines()[-1]
    return lines[0]


def test_missing_output_bucket_fails_before_any_work(s3: boto3.client, tmp_path: Path) -> None:
    job = _job(tmp_path, f"s3://{BUCKET}/photos/", "s3://no-such-bucket/out/")
    proc, seconds = _cli("run", str(job), cwd=tmp_path)
    line = _one_line_failure(proc)
    assert line.startswith("segbatch: job failed: output.uri 's3://no-such-bucket/out/': bucket 'no-such-bucket' does not exist")
    assert "check the bucket name" in line
    assert seconds < FAST, seconds


def test_unreachable_endpoint_fails_fast_and_names_it(s3: boto3.client, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    job = _job(tmp_path, f"s3://{BUCKET}/photos/", f"s3://{OUT_BUCKET}/out/")
    proc, seconds = _cli("run", str(job), cwd=tmp_path, env={"AWS_ENDPOINT_URL": closed})
    line = _one_line_failure(proc)
    assert f"input.uri 's3://{BUCKET}/photos/': cannot connect to the storage endpoint {closed} (AWS_ENDPOINT_URL)" in line
    assert "check AWS_ENDPOINT_URL / endpoint_url" in line
    assert seconds < FAST, seconds


def test_checks_answer_in_seconds(s3: boto3.client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks themselves, without the interpreter start: each failure in a few seconds at most."""
    base = {
        "name": "t",
        "input": {"uri": f"s3://{BUCKET}/photos/"},
        "model": {"task": "semantic", "arch": "segbatch.models.small:unet_small", "num_classes": 4},
        "output": {"uri": "s3://no-such-bucket/out/"},
    }
    started = time.monotonic()
    with pytest.raises(JobError, match="bucket 'no-such-bucket' does not exist"):
        check_storage(parse_job(base))
    assert time.monotonic() - started < 5
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(JobError, match="cannot connect to the storage endpoint"):
        check_storage(parse_job(base))
    assert time.monotonic() - started < 5


def test_endpoint_from_storage_options_is_named_but_not_shown(s3: boto3.client, tmp_path: Path) -> None:
    port = free_port()
    job = _job(tmp_path, f"s3://{BUCKET}/photos/", f"s3://{OUT_BUCKET}/out/")
    proc, _ = _cli(
        "validate", str(job), "--check-storage", "--set", f"output.storage_options={{endpoint_url: 'http://127.0.0.1:{port}'}}",
        cwd=tmp_path,
    )
    line = _one_line_failure(proc)
    assert "output.uri" in line and "the endpoint_url in output.storage_options" in line
    assert str(port) not in proc.stderr  # storage_options values never appear


def test_validate_check_storage_missing_input_is_one_line(s3: boto3.client, tmp_path: Path) -> None:
    bucket_job = _job(tmp_path, "s3://no-such-input/photos/", f"s3://{OUT_BUCKET}/out/")
    proc, _ = _cli("validate", str(bucket_job), "--check-storage", cwd=tmp_path)
    line = _one_line_failure(proc)
    assert "input.uri 's3://no-such-input/photos/': bucket 'no-such-input' does not exist" in line

    prefix_job = _job(tmp_path, f"s3://{BUCKET}/nothing-here/", f"s3://{OUT_BUCKET}/out/")
    proc, _ = _cli("validate", str(prefix_job), "--check-storage", cwd=tmp_path)
    assert f"input.uri 's3://{BUCKET}/nothing-here/': not found" in _one_line_failure(proc)

    folder_job = _job(tmp_path, str(tmp_path / "no-such-folder"), str(tmp_path / "out"))
    proc, _ = _cli("validate", str(folder_job), "--check-storage", cwd=tmp_path)
    assert f"input.uri '{tmp_path / 'no-such-folder'}': not found" in _one_line_failure(proc)


def test_validate_check_storage_ok_lists_the_input(s3: boto3.client, tmp_path: Path) -> None:
    job = _job(tmp_path, f"s3://{BUCKET}/photos/", f"s3://{OUT_BUCKET}/validated/")
    proc, _ = _cli("validate", str(job), "--check-storage", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 images listed" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_good_job_passes_and_leaves_no_probe(s3: boto3.client, tmp_path: Path) -> None:
    spec = parse_job(
        {
            "name": "ok",
            "input": {"uri": f"s3://{BUCKET}/photos/"},
            "model": {"task": "semantic", "arch": "segbatch.models.small:unet_small", "num_classes": 4},
            "output": {"uri": f"s3://{OUT_BUCKET}/good/"},
        }
    )
    check_storage(spec)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=OUT_BUCKET).get("Contents", [])]
    assert not [k for k in keys if ".segbatch-probe" in k], keys
    # A local output folder is created (as the job would) and left empty.
    local = parse_job({**spec.model_dump(mode="json"), "output": {"uri": str(tmp_path / "new" / "out")}})
    check_storage(local)
    assert list((tmp_path / "new" / "out").iterdir()) == []


def test_missing_checkpoint_on_s3(s3: boto3.client) -> None:
    base = {
        "name": "w",
        "input": {"uri": f"s3://{BUCKET}/photos/"},
        "model": {"task": "semantic", "arch": "segbatch.models.small:unet_small", "num_classes": 4},
        "output": {"uri": f"s3://{OUT_BUCKET}/w/"},
    }
    with pytest.raises(JobError, match=rf"^model.weights: checkpoint 's3://{BUCKET}/models/none.pt' not found$"):
        check_storage(parse_job({**base, "model": {**base["model"], "weights": f"s3://{BUCKET}/models/none.pt"}}))
    with pytest.raises(JobError, match=r"^model.weights 's3://nobucket/m.pt': bucket 'nobucket' does not exist"):
        check_storage(parse_job({**base, "model": {**base["model"], "weights": "s3://nobucket/m.pt"}}))


@pytest.fixture()
def strict_moto() -> Iterator[str]:
    """A second moto server that checks credentials (moto accepts any keys unless told otherwise)."""
    with moto_server_process({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as url:
        yield url


def test_wrong_credentials_say_check_credentials(strict_moto: str, tmp_path: Path) -> None:
    secret = "not-the-right-secret-0123456789"
    env = {"AWS_ENDPOINT_URL": strict_moto, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY000000", "AWS_SECRET_ACCESS_KEY": secret}
    job = _job(tmp_path, "s3://any-bucket/photos/", "s3://any-bucket/out/")
    proc, seconds = _cli("run", str(job), cwd=tmp_path, env={**env, "AWS_DEFAULT_REGION": "us-east-1"})
    line = _one_line_failure(proc)
    assert "input.uri 's3://any-bucket/photos/': InvalidAccessKeyId while reading" in line
    assert "check credentials (AWS_ACCESS_KEY_ID" in line
    assert secret not in proc.stderr and secret not in proc.stdout
    assert seconds < FAST, seconds


def test_storage_failure_after_work_started_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A commit or manifest write that fails mid-run (bucket deleted, endpoint gone) ends in one line, exit 1."""
    job = _job(tmp_path, "s3://in-bucket/photos/", "s3://gone-bucket/out/")

    def failing_run_job(spec: object, force: bool = False, preflight: bool = True, **_: object) -> None:
        try:
            raise RuntimeError("NoSuchBucket")  # stands in for botocore's ClientError (s3fs keeps it as the cause)
        except RuntimeError as cause:
            raise FileNotFoundError(2, "The specified bucket does not exist") from cause

    import segbatch.pipeline

    monkeypatch.setattr(cli, "check_storage", lambda spec: None)  # the bucket was there when the run started
    monkeypatch.setattr(segbatch.pipeline, "run_job", failing_run_job)
    assert cli.main(["run", str(job)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "segbatch: job failed: output.uri 's3://gone-bucket/out/': bucket 'gone-bucket' does not exist"
    )
    assert err[0].endswith("(parts committed before this stay; rerun the job to resume)")


def test_unknown_errors_keep_their_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only storage failures are turned into a line: a bug elsewhere still shows where it is."""
    job = _job(tmp_path, "s3://in-bucket/photos/", "s3://out-bucket/out/")

    def buggy_run_job(spec: object, force: bool = False, preflight: bool = True, **_: object) -> None:
        raise KeyError("bug")

    import segbatch.pipeline

    monkeypatch.setattr(cli, "check_storage", lambda spec: None)
    monkeypatch.setattr(segbatch.pipeline, "run_job", buggy_run_job)
    with pytest.raises(KeyError):
        cli.main(["run", str(job)])


def test_output_bucket_gone_before_the_manifest_is_one_line(
    s3: boto3.client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """For real, through s3fs and moto: the output bucket passes the check, then disappears before the
    run manifest is written (a job whose one image is already done, so no Ray)."""
    import segbatch.pipeline
    from segbatch.plan import Plan, PlanCounts

    s3.create_bucket(Bucket="nothing-to-do")
    s3.put_object(Bucket="nothing-to-do", Key="done.png", Body=b"an image committed before")
    s3.create_bucket(Bucket="short-lived")

    def plan_then_drop_the_bucket(*args: object, **kwargs: object) -> Plan:
        s3.delete_bucket(Bucket="short-lived")
        return Plan(PlanCounts(listed=1, skipped=1), "s3://short-lived/out/runs/x/plan")

    monkeypatch.setattr(segbatch.pipeline, "write_plan", plan_then_drop_the_bucket)
    job = _job(tmp_path, "s3://nothing-to-do/", "s3://short-lived/out/")
    assert cli.main(["run", str(job)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "segbatch: job failed: output.uri 's3://short-lived/out/': bucket 'short-lived' does not exist at "
    )
    assert err[0].endswith("(parts committed before this stay; rerun the job to resume)")


def test_transient_faults_are_retried_not_reported(s3: boto3.client, moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 503 SlowDown on the listing and a reset on the probe write are retried: the checks pass."""
    from tests.faultproxy import FaultProxy

    force = [(r"^GET .*list-type=2", "slowdown", 1), (r"^PUT .*\.segbatch-probe-", "reset", 1), (r"^HEAD ", "slowdown", 1)]
    proxy = FaultProxy(moto_server, rate=0.0, max_faults=3, force=force)
    proxy.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3.put_object(Bucket=BUCKET, Key="models/m.pt", Body=b"not really a checkpoint")
        spec = parse_job(
            {
                "name": "faulty",
                "input": {"uri": f"s3://{BUCKET}/photos/"},
                "model": {"task": "semantic", "arch": "segbatch.models.small:unet_small", "weights": f"s3://{BUCKET}/models/m.pt"},
                "output": {"uri": f"s3://{OUT_BUCKET}/faulty/"},
            }
        )
        check_storage(spec)
        assert proxy.injected["slowdown"] == 2 and proxy.injected["reset"] == 1, proxy.faults
    finally:
        proxy.stop()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=OUT_BUCKET).get("Contents", [])]
    assert not [k for k in keys if ".segbatch-probe" in k], keys
