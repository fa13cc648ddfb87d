"""How many torch threads a CPU predict actor should run, decided from what it measures.

On a one-node machine with no GPU the predict actor and the load/write tasks share the cores. Two
layouts compete:

- the actor takes all cores but one and the loaders run on the one left (no contention), or
- the actor takes every core and the loaders squeeze in between its parallel regions.

Which is faster depends on how much CPU work an image needs outside the model. When loading and
writing cost about as much as the forward pass, the loaders need a core of their own, and torch's
threads stall whenever a loader takes one of theirs. When they cost a few percent, the free core mostly
idles: on 2 cores a 1-thread actor caps LRASPP 512² at ~8.4 images/s (0.119 s per forward) while the
model alone on both cores makes 14-17, and Mask R-CNN v2 640×480 runs at 0.097 images/s with 1 thread
against 0.167 with 2 (`benchmarks/stages.py`: LRASPP's decode + encode + write are ~4% of its time).

So the actor starts with the cores but one, times its first batches against the loaders' reported
CPU time per image, and moves to all cores once unless loading and writing cost over `share` of the
model's time.

How the actor spends its threads matters as much as how many it has. A small batch gives torch's
intra-op threads little to share: on 2 cores LRASPP 512² at batch 1 makes 13.1 images/s as one
forward pass on 2 threads and 17.1 as two concurrent forward passes on 1 thread each (one process,
same model object; `benchmarks/pipeline_efficiency.py` reports both as `model_only_*`); Mask R-CNN
v2 640×480 makes 0.175 and 0.207. So the actor splits its threads into up to `MAX_STREAMS`
concurrent forward passes ("streams", Ray Data calls the actor from that many threads), each setting
its own torch thread count. The cap bounds the activations held at once; past a few streams each
stream has threads enough to share.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# The write stage (PNG or RLE encoding, one small write) is not timed by the actor; it costs about as
# much as decoding the image did, so the CPU side of an image is counted as twice its load cost.
WRITE_TO_LOAD = 1.0

# Most concurrent forward passes one actor runs when it picks its own layout (each holds a batch's activations).
MAX_STREAMS = 4


def stream_threads(threads: int, max_streams: int) -> list[int]:
    """Split `threads` torch threads into concurrent forward passes: the threads of each, as even as can be.

    >>> stream_threads(2, 4), stream_threads(7, 4), stream_threads(8, 1)
    ([1, 1], [2, 2, 2, 1], [8])
    """
    threads = max(1, threads)
    streams = max(1, min(threads, max_streams))
    base, extra = divmod(threads, streams)
    return [base + (1 if i < extra else 0) for i in range(streams)]


class StreamGate:
    """Lets at most `len(threads)` model calls run at once and hands each its stream's torch threads.

    Ray Data may call the actor from more threads than the layout allows (its concurrency is fixed when
    the actor starts; the layout can grow later), so calls past the current streams wait here.
    """

    def __init__(self, threads: list[int]) -> None:
        self._threads = list(threads)
        self._busy: set[int] = set()
        self._cond = threading.Condition()

    @property
    def threads(self) -> list[int]:
        """Torch threads of each stream."""
        return list(self._threads)

    def resize(self, threads: list[int]) -> None:
        with self._cond:
            self._threads = list(threads)
            self._cond.notify_all()

    @contextmanager
    def slot(self) -> Iterator[int]:
        """Hold one stream while the body runs; yields that stream's torch threads."""
        with self._cond:
            while True:
                free = next((i for i in range(len(self._threads)) if i not in self._busy), None)
                if free is not None:
                    break
                self._cond.wait()
            self._busy.add(free)
            threads = self._threads[free]
        try:
            yield threads
        finally:
            with self._cond:
                self._busy.discard(free)
                self._cond.notify()


@dataclass
class ThreadTuner:
    """Decides once, after `warmup` + `measure` batches, between `threads` and `most` torch threads.

    Args:
        threads: The threads the actor starts with (the node's cores but one, shared among actors).
        most: The threads it may move to (all the node's cores, shared among actors).
        share: Move when loads and writes cost at most this fraction of the model's time per image.
        warmup: Batches not timed (the first forward pass allocates and tunes kernels).
        measure: Batches timed before deciding, unless `enough_seconds` of model time come first (a
            heavy model should not spend many images on the slower setting).
    """

    threads: int
    most: int
    share: float = 0.3
    warmup: int = 1
    measure: int = 3
    enough_seconds: float = 2.0
    max_streams: int = 1  # only for the log line: how the actor will split its threads
    decided: bool = field(default=False, init=False)
    decision: str = field(default="", init=False)  # what was measured and chosen, as logged
    _seen: int = field(default=0, init=False, repr=False)
    _images: int = field(default=0, init=False, repr=False)
    _predict_s: float = field(default=0.0, init=False, repr=False)
    _load_s: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.decided = self.most <= self.threads

    def observe(self, images: int, predict_seconds: float, load_seconds: float) -> int | None:
        """Record one batch: its image count, the actor's seconds on it, the loaders' seconds on it.

        With concurrent forward passes, `predict_seconds` is the call's time over the streams running:
        the actor's time per image is what it takes between results, not the length of one call.

        Returns:
            The new thread count when the tuner moves to `most`, else None (no change).
        """
        if self.decided or images <= 0:
            return None
        self._seen += 1
        if self._seen <= self.warmup:
            return None
        self._images += images
        self._predict_s += predict_seconds
        self._load_s += load_seconds
        if self._seen < self.warmup + self.measure and self._predict_s < self.enough_seconds:
            return None
        self.decided = True
        model = self._predict_s / self._images
        cpu_side = self._load_s * (1.0 + WRITE_TO_LOAD) / self._images
        move = cpu_side <= self.share * model
        def layout(threads: int) -> str:
            streams = len(stream_threads(threads, self.max_streams))
            return f" in {streams} concurrent forward passes" if streams > 1 else ""

        verdict = (
            f"moving to {self.most} torch threads (all cores){layout(self.most)}"
            if move
            else f"keeping {self.threads} torch thread(s) (a core left for loads and writes){layout(self.threads)}"
        )
        self.decision = (
            f"model {model:.3f} s/image with {self.threads} torch thread(s){layout(self.threads)}, "
            f"load+write ~{cpu_side:.3f} s/image: {verdict}"
        )
        logger.info("predict actor: %s", self.decision)
        return self.most if move else None
