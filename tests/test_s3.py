"""Object storage for real: a moto S3 server process, configured only through AWS_* variables."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
import torch
import torchvision

from segbatch.masks import decode_png_label_map
from segbatch.pipeline import run_job
from segbatch.spec import IMAGE_EXTENSIONS, parse_job
from segbatch.storage import list_objects
from tests.conftest import write_images

BUCKET = "segbatch-test"


@pytest.fixture(scope="module")
def s3(s3_env: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[boto3.client]:
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    local = tmp_path_factory.mktemp("s3src")
    for path in write_images(local / "imgs", [(48, 64), (64, 48), (48, 64)], seed=4):
        client.upload_file(str(path), BUCKET, f"photos/2026/{path.name}")
    client.put_object(Bucket=BUCKET, Key="photos/2026/sub/corrupt.JPG", Body=b"\xff\xd8\xff garbage")
    client.put_object(Bucket=BUCKET, Key="photos/2026/readme.md", Body=b"# not an image")
    # A key that tries to climb out of the output prefix: must become an error row, never a write.
    client.upload_file(str(local / "imgs" / "img-000.png"), BUCKET, "photos/2026/../../escape.png")
    torch.manual_seed(0)
    model = torchvision.models.get_model(
        "lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3
    )
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    client.put_object(Bucket=BUCKET, Key="models/lraspp.pt", Body=buf.getvalue())
    # Workers inherit the environment when Ray starts, so start it after AWS_* are set.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield client
    ray.shutdown()


def test_listing_is_one_paginated_pass(s3: boto3.client) -> None:
    keys = [f"many/{i:05d}.jpg" for i in range(2300)]
    fs = s3fs.S3FileSystem()
    fs.pipe({f"{BUCKET}/{k}": b"x" for k in keys})
    calls: list[str] = []

    def count(event_name: str, **_: object) -> None:
        calls.append(event_name.split(".")[-1])

    # A fresh filesystem instance (no listing cache) with a hook on every S3 API call it makes.
    fresh = s3fs.S3FileSystem(skip_instance_cache=True)
    fresh.connect()
    fresh.s3.meta.events.register("before-call.s3", count)
    from fsspec.core import url_to_fs

    import segbatch.storage as storage

    original = storage.url_to_fs
    storage.url_to_fs = lambda uri, **kw: (fresh, url_to_fs(uri, **kw)[1])  # type: ignore[assignment]
    try:
        objects, _ = list_objects(f"s3://{BUCKET}/many/", {}, IMAGE_EXTENSIONS)
    finally:
        storage.url_to_fs = original  # type: ignore[assignment]
    assert len(objects) == 2300
    assert calls.count("ListObjectsV2") <= 4, calls[:10]
    assert "HeadObject" not in calls and "GetObject" not in calls
    assert all(o.version and o.size == 1 for o in objects)


def test_job_reads_and_writes_s3_end_to_end(s3: boto3.client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    spec = parse_job(
        {
            "name": "s3-job",
            "input": {"uri": f"s3://{BUCKET}/photos/2026/", "storage_options": {"key": "testing-key-id", "secret": "testing-secret-key"}},
            "model": {
                "task": "semantic",
                "arch": "lraspp_mobilenet_v3_large",
                "weights": f"s3://{BUCKET}/models/lraspp.pt",
                "num_classes": 3,
                "batch_size": 2,
            },
            "output": {"uri": f"s3://{BUCKET}/labels/run1/"},
            "compute": {"actors": 1},
            "run": {"max_error_fraction": 0.5},
        }
    )
    result = run_job(spec)
    assert (result.listed, result.ok) == (5, 3)
    assert result.errors == {"not_an_image": 1, "unsafe_key": 1} or result.errors == {"truncated": 1, "unsafe_key": 1}

    fs = s3fs.S3FileSystem()
    written = sorted(fs.find(f"{BUCKET}/labels/run1/"))
    assert all(k.startswith(f"{BUCKET}/labels/run1/") for k in written)
    assert not fs.exists(f"{BUCKET}/escape.png.png") and not fs.exists(f"{BUCKET}/labels/escape.png.png")
    masks = [k for k in written if "/masks/" in k]
    assert sorted(k.rsplit("/", 1)[1] for k in masks) == ["img-000.png.png", "img-001.png.png", "img-002.png.png"]

    rows = {}
    for key in (k for k in written if "/metadata/" in k):  # one part, or more when start-up outlasts commit_seconds
        with fs.open(key, "rb") as f:
            rows.update({r["uri"]: r for r in pq.read_table(f).to_pylist()})
    assert len(rows) == 5
    ok = rows[f"s3://{BUCKET}/photos/2026/img-001.png"]
    assert ok["mask_uri"] == f"s3://{BUCKET}/labels/run1/masks/img-001.png.png"
    mask = decode_png_label_map(fs.cat_file(ok["mask_uri"]))
    assert mask.shape == (64, 48) and mask.max() < 3
    assert ok["class_pixels"] == np.bincount(mask.ravel(), minlength=3).tolist()
    escape = rows[f"s3://{BUCKET}/photos/2026/../../escape.png"]
    assert escape["error_class"] == "unsafe_key" and "climbs out of the prefix" in escape["error"]

    manifest_text = fs.cat_file(result.manifest_uri.removeprefix("s3://")).decode()
    manifest = json.loads(manifest_text)
    assert manifest["counts"]["listed"] == 5
    assert manifest["weights"]["source"] == f"s3://{BUCKET}/models/lraspp.pt"
    everything = manifest_text + caplog.text + json.dumps([r["error"] for r in rows.values()])
    assert "testing-secret-key" not in everything
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    for log in logs_dir.rglob("*"):
        if log.is_file():
            assert b"testing-secret-key" not in log.read_bytes(), log
