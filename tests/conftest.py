"""Shared test helpers: small real images, checkpoints the tests write, a moto S3 server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Every Ray node the tests start binds to 127.0.0.1, so test traffic stays on loopback (Ray otherwise
# advertises the machine's external interface for multi-node clusters). Read by Ray at import time.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pytest
import torch
from PIL import Image

# Keep torch single-threaded in the test process: Ray workers need the other core.
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, ext: str = "png") -> list[Path]:
    """Write random-but-structured RGB images (height, width) as files; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=-1)
        noise = rng.integers(0, 60, size=(h, w, 3))
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        r = min(h, w) // 4
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, size=3)
        path = folder / f"img-{i:03d}.{ext}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def save_checkpoint(model: torch.nn.Module, path: Path, **meta: object) -> Path:
    """Save a plain state_dict checkpoint (optionally wrapped with metadata such as `classes`)."""
    state = model.state_dict()
    torch.save({"state_dict": state, **meta} if meta else state, path)
    return path


@contextmanager
def moto_server_process(env: dict[str, str] | None = None) -> Iterator[str]:
    """moto's S3 server as a separate process on 127.0.0.1 (a free port), with extra environment `env`."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:  # pragma: no cover - environment problem
        proc.kill()
        raise RuntimeError("moto server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real S3 HTTP endpoint: moto's server as a separate process on 127.0.0.1 (free port)."""
    with moto_server_process() as url:
        yield url


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_env(moto_server: str) -> Iterator[str]:
    """Point the standard AWS_* variables at the moto server for this module (restored afterwards)."""
    values = {**S3_ENV, "AWS_ENDPOINT_URL": moto_server}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield moto_server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def shapes_outputs(tmp_path_factory: pytest.TempPathFactory) -> object:
    """A semantic and an instance output of the shipped models on generated scenes (tests/prelabel.py),
    made once for the export and report tests (a local Ray, started and stopped here)."""
    from tests.prelabel import make_outputs

    return make_outputs(tmp_path_factory.mktemp("prelabel"))
