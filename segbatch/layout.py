"""The predict actor's layout: torch threads and concurrent forward passes ("streams"), decided once.

The driver decides the layout (:func:`decide_layout`) and hands it whole to every predict actor; the
actor only applies it (:class:`StreamGate`). Nothing else works out threads or streams. No torch here:
the rule is plain arithmetic on the job's `compute` section and the node's CPUs.

The rule:

- `compute.threads_per_actor` set: those threads. Else `cpus_per_actor` (rounded), except for a
  CPU-only pool of fixed size on a one-node Ray (a laptop), where a 1-CPU reservation must not leave
  the other cores idle: there each actor gets its share of **all** the node's cores (never below its
  reservation). Loads and writes squeeze in between torch's parallel regions.
- `compute.streams_per_actor` set: that many, at most one per thread. Else one stream per thread up to
  :data:`MAX_STREAMS` where the actor took the node's cores, one stream elsewhere (a GPU, threads
  fixed by hand, a multi-node cluster).

Why all cores and not "all but one, measured at run time": a runtime tuner that started with the cores
but one and timed its first batches against the loaders' CPU time ended at all cores for LRASPP and
Mask R-CNN alike and only spent its first batches on the slower layout; side by side it did not beat
this rule by more than the run-to-run noise (`benchmarks/README.md`, "Thread layout").

Why streams: a small batch gives torch's intra-op threads little to share. On 2 cores LRASPP 512² at
batch 1 makes 13.1 images/s as one forward pass on 2 threads and 17.1 as two concurrent passes on 1
thread each (one process, one model object; `benchmarks/pipeline_efficiency.py` reports both as
`model_only_*`); Mask R-CNN v2 640×480 makes 0.175 and 0.207. The cap bounds the activations held at
once; past a few streams each stream has threads enough to share.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from segbatch.spec import ComputeSpec

__all__ = ["MAX_STREAMS", "ActorLayout", "StreamGate", "decide_layout", "stream_threads"]

#: Most concurrent forward passes one actor runs when the rule picks them (each holds a batch's activations).
MAX_STREAMS = 4


def stream_threads(threads: int, streams: int) -> list[int]:
    """Split `threads` torch threads into at most `streams` concurrent passes, as even as can be.

    >>> stream_threads(2, 4), stream_threads(7, 4), stream_threads(8, 1)
    ([1, 1], [2, 2, 2, 1], [8])
    """
    threads = max(1, threads)
    streams = max(1, min(threads, streams))
    base, extra = divmod(threads, streams)
    return [base + (1 if i < extra else 0) for i in range(streams)]


@dataclass(frozen=True, slots=True)
class ActorLayout:
    """Torch threads of one predict actor (all streams together) and its concurrent forward passes."""

    threads: int = 1
    streams: int = 1

    @property
    def stream_threads(self) -> list[int]:
        """Torch threads of each stream."""
        return stream_threads(self.threads, self.streams)

    def describe(self) -> str:
        split = f", split into {self.streams} concurrent forward passes" if self.streams > 1 else ""
        return f"{self.threads} torch thread(s){split}"


def _shares_one_node(compute: ComputeSpec, one_node_cpus: int | None) -> bool:
    """A CPU-only pool of fixed size on a one-node Ray, threads not fixed by hand."""
    return bool(
        one_node_cpus and compute.gpus_per_actor == 0 and isinstance(compute.actors, int) and not compute.threads_per_actor
    )


def decide_layout(compute: ComputeSpec, one_node_cpus: int | None) -> ActorLayout:
    """The layout every predict actor of a job runs (see the module docstring for the rule).

    Args:
        compute: The job's `compute` section.
        one_node_cpus: The CPUs of the Ray cluster when it is one node, else None.

    Example:
        >>> decide_layout(ComputeSpec(), one_node_cpus=2)
        ActorLayout(threads=2, streams=2)
        >>> decide_layout(ComputeSpec(cpus_per_actor=3), one_node_cpus=None)
        ActorLayout(threads=3, streams=1)
    """
    base = compute.threads_per_actor or max(1, round(compute.cpus_per_actor))
    shares = _shares_one_node(compute, one_node_cpus)
    threads = base
    if shares and one_node_cpus and isinstance(compute.actors, int):  # (the last two: narrowing for mypy)
        threads = max(base, one_node_cpus // compute.actors)
    if compute.streams_per_actor:
        streams = min(compute.streams_per_actor, threads)
    else:
        streams = min(threads, MAX_STREAMS) if shares else 1
    return ActorLayout(threads=threads, streams=streams)


class StreamGate:
    """Lets at most one model call per stream run at once and hands each its stream's torch threads.

    Ray Data calls the actor from `layout.streams` threads (`max_concurrent_calls_per_actor`); the gate
    keeps a call from running on a stream that is busy, whatever Ray Data does.
    """

    def __init__(self, threads: list[int]) -> None:
        self._threads = list(threads)
        self._busy: set[int] = set()
        self._cond = threading.Condition()

    @property
    def threads(self) -> list[int]:
        """Torch threads of each stream."""
        return list(self._threads)

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
