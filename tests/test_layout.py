"""The predict actor's layout: decided once on the driver (segbatch.layout), applied whole by the actor."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from segbatch.layout import MAX_STREAMS, ActorLayout, StreamGate, decide_layout, stream_threads
from segbatch.models import Predictor, resolve_weights
from segbatch.spec import ComputeSpec, ModelSpec, PredictSettings
from tests.conftest import save_checkpoint
from tests.test_models import ARCH, _batch, lraspp


def test_layout_threads_take_a_laptops_cores_and_respect_reservations_on_clusters() -> None:
    def threads(compute: ComputeSpec, cpus: int | None) -> int:
        return decide_layout(compute, one_node_cpus=cpus).threads

    assert threads(ComputeSpec(), 8) == 8  # laptop, one CPU actor: all cores
    assert threads(ComputeSpec(), 2) == 2
    assert threads(ComputeSpec(actors=2), 9) == 4  # its share of the cores
    assert threads(ComputeSpec(actors=2), 8) == 4
    assert threads(ComputeSpec(actors=2, cpus_per_actor=6), 8) == 6  # never below the reservation
    assert threads(ComputeSpec(), None) == 1  # a multi-node cluster: the reservation
    assert threads(ComputeSpec(cpus_per_actor=3.6), None) == 4
    assert threads(ComputeSpec(gpus_per_actor=1, cpus_per_actor=2), 16) == 2  # GPU actor
    assert threads(ComputeSpec(actors=(1, 4)), 8) == 1  # autoscaling pool: the reservation
    assert threads(ComputeSpec(threads_per_actor=3), 8) == 3  # set by hand
    assert threads(ComputeSpec(threads_per_actor=3), None) == 3


def test_layout_streams_split_a_laptops_threads_and_stay_single_elsewhere() -> None:
    def streams(compute: ComputeSpec, cpus: int | None) -> int:
        return decide_layout(compute, one_node_cpus=cpus).streams

    assert streams(ComputeSpec(), 2) == 2  # two 1-thread passes on a 2-core laptop
    assert streams(ComputeSpec(), 16) == MAX_STREAMS == 4  # at most MAX_STREAMS
    assert streams(ComputeSpec(actors=2), 9) == 4  # its share: 4 threads, 4 passes
    assert streams(ComputeSpec(), None) == 1  # multi-node: the reservation, one pass
    assert streams(ComputeSpec(gpus_per_actor=1), 16) == 1  # GPU actor
    assert streams(ComputeSpec(actors=(1, 4)), 8) == 1  # autoscaling pool
    assert streams(ComputeSpec(threads_per_actor=4), 8) == 1  # threads fixed by hand
    assert streams(ComputeSpec(streams_per_actor=3, cpus_per_actor=6), None) == 3  # set by hand
    assert streams(ComputeSpec(streams_per_actor=3), None) == 1  # one thread: one pass
    assert streams(ComputeSpec(streams_per_actor=8), 4) == 4  # never more than its threads


def test_layout_is_one_frozen_value() -> None:
    layout = decide_layout(ComputeSpec(), one_node_cpus=6)
    assert layout == ActorLayout(threads=6, streams=4) and layout.stream_threads == [2, 2, 1, 1]
    with pytest.raises(AttributeError):
        layout.threads = 1  # type: ignore[misc]


def test_threads_are_split_into_even_streams() -> None:
    assert stream_threads(1, 4) == [1]
    assert stream_threads(2, 4) == [1, 1]  # a 2-core laptop: two 1-thread forward passes
    assert stream_threads(7, 4) == [2, 2, 2, 1]  # every thread used, none twice
    assert stream_threads(16, 4) == [4, 4, 4, 4]
    assert stream_threads(8, 1) == [8]  # one pass: all threads in it
    assert stream_threads(0, 4) == [1]


def test_gate_runs_at_most_its_streams() -> None:
    gate = StreamGate([1, 3])
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
        assert most == 2 and sorted(got) == [1, 3]  # each stream's threads handed out once; the third call waits
        release.set()
        for f in futures:
            f.result(timeout=5)
    assert running == 0 and len(got) == 3 and most == 2


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_predictor_applies_the_layout_it_is_given(tmp_path: Path, restore_threads: None) -> None:
    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    rw = resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4))
    predictor = Predictor("semantic", rw, PredictSettings(batch_size=2), ActorLayout(threads=2, streams=1))
    assert predictor.gate.threads == [2]
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    torch.set_num_threads(1)
    out = predictor(_batch([image, image]))
    assert [str(s) for s in out["status"]] == ["ok", "ok"]
    assert torch.get_num_threads() == 2  # the call ran with its stream's threads
    assert Predictor("semantic", rw, PredictSettings(batch_size=1), ActorLayout(2, 2)).gate.threads == [1, 1]


def test_concurrent_streams_give_the_same_masks_as_one(tmp_path: Path, restore_threads: None) -> None:
    """Two threads calling one actor at once (Ray Data's concurrent calls) get exactly the serial results."""
    ckpt = save_checkpoint(lraspp(), tmp_path / "m.pt")
    rw = resolve_weights(ModelSpec(task="semantic", arch=ARCH, weights=str(ckpt), num_classes=4))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8) for i in range(6)]
    serial = Predictor("semantic", rw, PredictSettings(batch_size=1), ActorLayout(threads=1))
    expected = [serial(_batch([im]))["label_map"][0] for im in images]
    parallel = Predictor("semantic", rw, PredictSettings(batch_size=1), ActorLayout(threads=2, streams=2))
    assert parallel.gate.threads == [1, 1]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda im: parallel(_batch([im])), images * 3))
    for i, out in enumerate(outs):
        assert [str(s) for s in out["status"]] == ["ok"]
        np.testing.assert_array_equal(out["label_map"][0], expected[i % len(images)])
