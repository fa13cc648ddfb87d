"""A CPU predict actor moves to all cores only when its model outweighs the loaders."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from segbatch.models import Predictor, resolve_weights
from segbatch.models.threads import StreamGate, ThreadTuner, stream_threads
from segbatch.spec import ModelSpec
from tests.conftest import save_checkpoint
from tests.test_models import ARCH, _batch, lraspp


def test_heavy_model_moves_to_all_cores_after_warmup_and_measurement() -> None:
    tuner = ThreadTuner(threads=1, most=2)
    # Mask R-CNN-like: 10 s/image of model, 10 ms/image of loading.
    assert tuner.observe(4, 40.0, 0.04) is None  # warm-up, not timed
    assert tuner.observe(4, 40.0, 0.04) == 2  # 40 s of model time is evidence enough: no third batch
    assert tuner.decided and "moving to 2 torch threads (all cores)" in tuner.decision
    assert tuner.observe(4, 40.0, 0.04) is None  # decides once


def test_a_cheap_model_is_timed_over_several_batches() -> None:
    tuner = ThreadTuner(threads=1, most=2)
    assert [tuner.observe(1, 0.5, 0.0) for _ in range(3)] == [None, None, None]
    assert tuner.observe(1, 0.5, 0.0) == 2  # warm-up + 3 timed batches (1.5 s < enough_seconds)


def test_light_model_keeps_a_core_for_the_loaders() -> None:
    tuner = ThreadTuner(threads=1, most=2)
    # A small model behind a big decode: 20 ms/image of model, 10 ms/image of loading (x2 with the
    # write: as much as the model, far over the 30% share).
    results = [tuner.observe(1, 0.020, 0.010) for _ in range(6)]
    assert results == [None] * 6
    assert tuner.decided and "keeping 1 torch thread(s) (a core left for loads and writes)" in tuner.decision


def test_share_is_the_boundary() -> None:
    # 100 ms of model; 14 ms of loading counts as 28 ms with the write (under 30%), 16 ms as 32%.
    under, over = ThreadTuner(threads=1, most=2, measure=1), ThreadTuner(threads=1, most=2, measure=1)
    assert [under.observe(1, 0.1, 0.014) for _ in range(2)] == [None, 2]
    assert [over.observe(1, 0.1, 0.016) for _ in range(2)] == [None, None] and over.decided


def test_warmup_batch_and_error_only_batches_are_not_counted() -> None:
    tuner = ThreadTuner(threads=1, most=2, measure=2)
    assert tuner.observe(1, 500.0, 0.0) is None  # a slow first call (allocation) would look heavy
    assert tuner.observe(0, 0.0, 0.0) is None  # only error rows: nothing to learn
    assert tuner.observe(1, 0.05, 0.01) is None
    assert tuner.observe(1, 0.05, 0.01) is None
    assert tuner.decided and "model 0.050 s/image" in tuner.decision


def test_nothing_to_gain_decides_at_once() -> None:
    tuner = ThreadTuner(threads=2, most=2)
    assert tuner.decided
    assert [tuner.observe(1, 100.0, 0.0) for _ in range(5)] == [None] * 5


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _loaded(images: list[np.ndarray], load_seconds: float) -> dict[str, np.ndarray]:
    batch = _batch(images)
    batch["load_seconds"] = np.full(len(images), load_seconds, dtype=np.float32)
    return batch


@pytest.mark.parametrize(("load_seconds", "threads_after"), [(0.0, 2), (30.0, 1)])
def test_predictor_sets_torch_threads_from_what_it_measured(
    tmp_path: Path, restore_threads: None, load_seconds: float, threads_after: int
) -> None:
    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    rw = resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4))
    predictor = Predictor("semantic", rw, {"batch_size": 2}, num_threads=1, max_threads=2)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    for _ in range(4):
        out = predictor(_loaded([image, image], load_seconds))
        assert "load_seconds" not in out  # consumed by the actor, never written
        assert [str(s) for s in out["status"]] == ["ok", "ok"]
    assert predictor.tuner is not None and predictor.tuner.decided
    assert predictor.gate.threads == [threads_after]  # one stream (max_streams=1) with all the threads
    predictor(_loaded([image], load_seconds))
    assert torch.get_num_threads() == threads_after  # the next call runs with them


def test_predictor_without_max_threads_never_tunes(tmp_path: Path, restore_threads: None) -> None:
    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    rw = resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4))
    predictor = Predictor("semantic", rw, {"batch_size": 2}, num_threads=1)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    for _ in range(5):
        predictor(_loaded([image], 0.0))
    assert predictor.tuner is None and torch.get_num_threads() == 1


def test_threads_are_split_into_even_streams() -> None:
    assert stream_threads(1, 4) == [1]
    assert stream_threads(2, 4) == [1, 1]  # a 2-core laptop: two 1-thread forward passes
    assert stream_threads(7, 4) == [2, 2, 2, 1]  # every thread used, none twice
    assert stream_threads(16, 4) == [4, 4, 4, 4]
    assert stream_threads(8, 1) == [8]  # one pass: all threads in it
    assert stream_threads(0, 4) == [1]


def test_gate_runs_at_most_its_streams_and_grows_when_resized() -> None:
    gate = StreamGate([1])
    running, most, lock = 0, 0, threading.Lock()
    release = threading.Event()
    got: list[int] = []

    def call() -> None:
        nonlocal running, most
        with gate.slot() as threads:
            with lock:
                running += 1
                most = max(most, running)
                got.append(threads)
            release.wait(5)
            with lock:
                running -= 1

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(call) for _ in range(3)]
        time.sleep(0.3)
        assert most == 1  # two calls wait for the one stream
        gate.resize([1, 3])  # the tuner moved: two streams now
        time.sleep(0.3)
        assert most == 2 and sorted(got) == [1, 3]  # the second call got the new stream's threads; the third waits
        release.set()
        for f in futures:
            f.result(timeout=5)
    assert running == 0 and len(got) == 3


def test_concurrent_streams_give_the_same_masks_as_one(tmp_path: Path, restore_threads: None) -> None:
    """Two threads calling one actor at once (Ray Data's concurrent calls) get exactly the serial results."""
    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    rw = resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(6)]
    serial = Predictor("semantic", rw, {"batch_size": 1}, num_threads=1)
    expected = [serial(_loaded([im], 0.0))["label_map"][0] for im in images]
    parallel = Predictor("semantic", rw, {"batch_size": 1}, num_threads=2, max_streams=2)
    assert parallel.gate.threads == [1, 1]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda im: parallel(_loaded([im], 0.0)), images * 3))
    for i, out in enumerate(outs):
        assert [str(s) for s in out["status"]] == ["ok"]
        np.testing.assert_array_equal(out["label_map"][0], expected[i % len(images)])


def test_predictor_that_moves_splits_its_threads_into_streams(tmp_path: Path, restore_threads: None) -> None:
    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    rw = resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4))
    predictor = Predictor("semantic", rw, {"batch_size": 1}, num_threads=1, max_threads=2, max_streams=2)
    assert predictor.gate.threads == [1]  # a core left for the loaders while it measures
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    for _ in range(4):
        predictor(_loaded([image], 0.0))
    assert predictor.tuner is not None
    assert "moving to 2 torch threads (all cores) in 2 concurrent forward passes" in predictor.tuner.decision
    assert predictor.gate.threads == [1, 1]
