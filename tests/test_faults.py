"""Transient storage faults are retried, never recorded as errors (issue 5, requirement 4).

A fault-injecting proxy (tests/faultproxy.py) sits between every segbatch process (the driver and the
Ray workers, which inherit `AWS_ENDPOINT_URL`) and the moto S3 server; it answers 503 SlowDown, resets
connections and delays requests on a seeded share of them, and once for the first checkpoint read,
listing, image read, mask write, Parquet commit and manifest write. Setup and checks talk to moto
directly, so they neither meet faults nor use up the fault budget.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
import torch
from botocore.exceptions import ClientError

import segbatch.load as load_module
import segbatch.pipeline as pipeline_module
import segbatch.sinks as sinks_module
from segbatch.load import Loader
from segbatch.masks import decode_png_label_map
from segbatch.models.small import unet_small
from segbatch.pipeline import run_job
from segbatch.retry import Retries, RetryPolicy, call_with_retries, is_transient
from segbatch.sinks import MaskWriter
from segbatch.spec import OutputSpec, parse_job
from tests.conftest import S3_ENV, write_images
from tests.faultproxy import KINDS, FaultProxy

BUCKET = "segbatch-faults"
N_IMAGES = 12
FAST = RetryPolicy(attempts=3, base_delay=0.0)
BURST = 12

# The first request(s) matching each pattern get this fault, so every storage path meets one.
FORCED = [
    (rf"^GET /{BUCKET}/models/", "slowdown", 1),  # checkpoint read (driver)
    (r"^GET .*list-type=2", "reset", 1),  # listing (ledger or input)
    (rf"^GET /{BUCKET}/in/", "reset", 1),  # image read (Ray worker)
    (r"^PUT .*/masks/", "slowdown", 1),  # mask write (Ray worker)
    (r"^PUT .*/metadata/.*\.parquet", "reset", 1),  # Parquet commit (driver)
    (r"^PUT .*/runs/", "delay", 1),  # run manifest
    # One object's reads reset 12 times in a row: more than botocore (3 attempts) and aiohttp absorb
    # (about 8), so segbatch's own retry has to step in, and its count must reach the driver.
    (rf"^GET /{BUCKET}/in/img-005\.png", "reset-before", BURST),
]


# --------------------------------------------------------------------------- retry.py, unit


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _s3fs_style(code: str, status: int, errnum: int) -> OSError:
    """What s3fs raises for a ClientError: an OSError whose cause is the ClientError."""
    err = OSError(errnum, "Please reduce your request rate.")
    err.__cause__ = _client_error(code, status)
    return err


def test_transient_error_then_success_is_retried_and_counted() -> None:
    faults = [_s3fs_style("SlowDown", 503, errno.EBUSY), ConnectionResetError("reset by peer")]

    def flaky() -> bytes:
        if faults:
            raise faults.pop(0)
        return b"data"

    counter = Retries()
    assert call_with_retries(flaky, counter=counter, policy=FAST) == b"data"
    assert counter.count == 2


def test_missing_object_is_not_retried() -> None:
    calls = []

    def missing() -> bytes:
        calls.append(1)
        raise FileNotFoundError("s3://b/k")

    counter = Retries()
    with pytest.raises(FileNotFoundError):
        call_with_retries(missing, counter=counter, policy=FAST)
    assert (len(calls), counter.count) == (1, 0)


def test_attempts_are_bounded_and_the_last_error_is_raised() -> None:
    calls: list[int] = []

    def always() -> None:
        calls.append(1)
        raise TimeoutError(f"timeout {len(calls)}")

    counter = Retries()
    with pytest.raises(TimeoutError, match="timeout 3"):
        call_with_retries(always, counter=counter, policy=FAST)
    assert (len(calls), counter.count) == (3, 2)


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_s3fs_style("SlowDown", 503, errno.EBUSY), True),
        (_s3fs_style("ServiceUnavailable", 503, errno.EBUSY), True),
        (_s3fs_style("InternalError", 500, errno.EIO), True),
        (_client_error("502", 502), True),
        (_client_error("RequestTimeout", 400), True),
        (_client_error("Throttling", 400), True),
        (_s3fs_style("BucketAlreadyExists", 409, errno.EBUSY), False),  # EBUSY, but a 409
        (OSError(errno.EBUSY, "Please reduce your request rate."), True),  # s3fs's error, cause lost
        (ConnectionResetError(), True),
        (ConnectionAbortedError(), True),
        (TimeoutError(), True),
        (PermissionError("Access Denied"), False),
        (FileNotFoundError("s3://b/k"), False),
        (ValueError("cannot decode"), False),
        (OSError(errno.ENOSPC, "no space left"), False),
    ],
)
def test_what_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_library_connection_errors_are_transient() -> None:
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError, SSLError

    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ConnectionClosedError(endpoint_url="http://x"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert is_transient(aiohttp.ServerDisconnectedError())
    assert is_transient(aiohttp.ClientPayloadError("cut short"))
    assert not is_transient(SSLError(endpoint_url="http://x", error="certificate verify failed"))


# --------------------------------------------------------------------------- stages, without Ray


def _objects(values: list[Any]) -> np.ndarray:
    """A 1-D object array (numpy would stack equal-shaped arrays into one)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


class _FlakyFS:
    """Delegates to the real filesystem but fails the first `n` reads / writes with a reset."""

    def __init__(self, fs: Any, n: int) -> None:
        self.fs, self.n = fs, n
        self.protocol = fs.protocol

    def cat_file(self, path: str, **kw: Any) -> bytes:
        if self.n > 0:
            self.n -= 1
            raise ConnectionResetError("reset by peer")
        return self.fs.cat_file(path, **kw)


def test_loader_retries_and_counts_per_item(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_images(tmp_path, [(8, 8), (8, 8)])
    real = load_module.filesystem
    flaky = {str(paths[0]): 2, str(paths[1]): 0}
    monkeypatch.setattr(load_module, "filesystem", lambda uri, opts: (_FlakyFS(real(uri, opts)[0], flaky[uri]), uri))
    batch = {"uri": np.asarray([str(p) for p in paths], dtype=object), "size": np.asarray([10, 10])}
    out = Loader()(batch)
    assert out["status"].tolist() == ["ok", "ok"]
    assert out["retries"].tolist() == [2, 0]


def test_mask_writer_adds_its_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = sinks_module.write_bytes_atomic
    failures = {"n": 1}

    def flaky_write(fs: Any, path: str, data: bytes) -> None:
        if "a.png" in path and failures["n"]:
            failures["n"] -= 1
            raise _s3fs_style("SlowDown", 503, errno.EBUSY)
        real(fs, path, data)

    monkeypatch.setattr(sinks_module, "write_bytes_atomic", flaky_write)
    labels = np.zeros((4, 4), dtype=np.uint8)
    batch = {
        "item_id": np.asarray(["1", "2"], dtype=object),
        "uri": np.asarray(["a.png", "b.png"], dtype=object),
        "rel_key": np.asarray(["a.png", "b.png"], dtype=object),
        "status": np.asarray(["ok", "ok"], dtype=object),
        "error_class": np.asarray(["", ""], dtype=object),
        "error": np.asarray(["", ""], dtype=object),
        "label_map": _objects([labels, labels]),
        "retries": np.asarray([3, 0], dtype=np.int32),
    }
    out = MaskWriter(OutputSpec(uri=str(tmp_path / "out")), task="semantic")(batch)
    assert out["status"].tolist() == ["ok", "ok"] and out["retries"].tolist() == [4, 0]
    del batch["retries"]  # a batch without the column (e.g. an older stage): created
    assert MaskWriter(OutputSpec(uri=str(tmp_path / "out")), task="semantic")(batch)["retries"].tolist() == [0, 0]


# --------------------------------------------------------------------------- a whole job through the proxy


@pytest.fixture(scope="module")
def faulty_s3(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FaultProxy, str]]:
    """Bucket with images + checkpoint (written to moto directly); the proxy; AWS_* → proxy; Ray."""
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    client = boto3.client("s3", endpoint_url=moto_server)
    client.create_bucket(Bucket=BUCKET)
    local = tmp_path_factory.mktemp("faults")
    sizes = [(32 + 8 * (i % 3), 40 + 8 * (i % 2)) for i in range(N_IMAGES)]
    for path in write_images(local / "imgs", sizes, seed=11):
        client.upload_file(str(path), BUCKET, f"in/{path.name}")
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(unet_small(num_classes=3).state_dict(), buf)
    client.put_object(Bucket=BUCKET, Key="models/unet.pt", Body=buf.getvalue())

    proxy = FaultProxy(moto_server, rate=0.25, max_faults=40 + BURST, seed=5, delay=(0.2, 0.8), force=FORCED)
    proxy.start()
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    # Workers inherit the environment when Ray starts, so start it after AWS_* are set.
    # address="local": a fresh Ray of our own, even if another local cluster is running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield proxy, moto_server
    finally:
        ray.shutdown()
        proxy.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_job_completes_through_storage_faults(
    faulty_s3: tuple[FaultProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy, moto_server = faulty_s3
    # Observe, in the driver, the per-row `retries` column and the committer's retries.
    seen: dict[str, int] = {"rows": 0, "row_retries": 0}
    committers: list[Any] = []
    to_table = pipeline_module.rows_to_table

    def counting_rows_to_table(batch: dict[str, Any], constants: dict[str, str]) -> Any:
        seen["rows"] += len(batch["item_id"])
        seen["row_retries"] += int(np.sum(batch["retries"])) if "retries" in batch else 0
        return to_table(batch, constants)

    class RecordingCommitter(pipeline_module.Committer):  # type: ignore[name-defined,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            committers.append(self)

    monkeypatch.setattr(pipeline_module, "rows_to_table", counting_rows_to_table)
    monkeypatch.setattr(pipeline_module, "Committer", RecordingCommitter)

    spec = parse_job(
        {
            "name": "faults",
            "input": {"uri": f"s3://{BUCKET}/in/"},
            "model": {
                "task": "semantic",
                "arch": "segbatch.models.small:unet_small",
                "weights": f"s3://{BUCKET}/models/unet.pt",
                "num_classes": 3,
                "batch_size": 4,
            },
            "output": {"uri": f"s3://{BUCKET}/out/", "commit_rows": 4},
            "compute": {"actors": 1, "load_batch_size": 4, "cpus_per_loader": 0.5},
            "run": {"max_error_fraction": 0.0},
        }
    )
    result = run_job(spec)

    # Check against moto directly: no faults, and the proxy's counts stay as the job left them.
    fs = s3fs.S3FileSystem(endpoint_url=moto_server, skip_instance_cache=True)
    rows = []
    for part in sorted(fs.find(f"{BUCKET}/out/metadata/")):
        with fs.open(part, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    listed = {f"s3://{p}" for p in fs.find(f"{BUCKET}/in/")}
    by_uri: dict[str, int] = {}
    for r in rows:
        by_uri[r["uri"]] = by_uri.get(r["uri"], 0) + 1
    lost = len(listed - by_uri.keys())
    duplicates = sum(n - 1 for n in by_uri.values())
    error_rows = [r for r in rows if r["status"] != "ok"]
    injected = proxy.injected
    retries = seen["row_retries"] + sum(c.retries.count for c in committers)
    print(  # the figures for the issue note (pytest -s)
        f"\nstorage faults: items processed {result.processed} (listed {result.listed}, ok {result.ok}); "
        f"faults injected {sum(injected.values())} ({', '.join(f'{k} {v}' for k, v in injected.items())}) "
        f"over {sum(proxy.requests.values())} requests; by path {proxy.injected_by_category()}; "
        f"segbatch-level retries {retries}; items lost {lost}; duplicates {duplicates}; "
        f"error rows {len(error_rows)}"
    )

    assert (result.listed, result.processed, result.ok, result.errors) == (N_IMAGES, N_IMAGES, N_IMAGES, {})
    assert not error_rows, [r["error"] for r in error_rows]
    assert len(listed) == N_IMAGES and lost == 0 and duplicates == 0 and len(rows) == N_IMAGES
    assert len({r["item_id"] for r in rows}) == N_IMAGES
    assert seen["rows"] == N_IMAGES
    for r in rows:
        mask = decode_png_label_map(fs.cat_file(r["mask_uri"]))
        assert mask.shape == (r["height"], r["width"]) and mask.max() < 3
    assert fs.exists(result.manifest_uri)
    assert all(injected[k] > 0 for k in KINDS), injected
    hit = proxy.injected_by_category()
    assert {"list", "read", "write", "commit"} <= hit.keys(), hit
    forced = [f for f in proxy.faults if "forced" in f.detail]
    assert len(forced) == len(FORCED) - 1 + BURST, forced
    assert retries >= 1, "the burst should have outlasted the storage client's own retries"
    # The run's count is the rows' `retries` summed, plus the committer's own.
    assert result.retried >= seen["row_retries"] >= 1, (result.retried, seen)
