"""How many torch threads a CPU predict actor should run, decided from what it measures.

On a one-node machine with no GPU the predict actor and the load/write tasks share the cores. Two
layouts compete:

- the actor takes all cores but one and the loaders run on the one left (no contention), or
- the actor takes every core and the loaders squeeze in between its parallel regions.

Which is faster depends on the model. When loading and writing an image cost a sizeable share of a
forward pass, torch's worker threads stall whenever a loader takes one of their cores, and keeping a
core free wins (measured on 2 cores, LRASPP 512²: 11.9 images/s with 1 thread against 8.5 with 2).
When the model costs a hundred times more than the loaders, the free core mostly idles and all cores
win (Mask R-CNN v2 640×480: 0.166 images/s with 2 threads against 0.097 with 1).

So the actor starts with the cores but one, times its first batches and the loaders' reported cost
per image, and moves to all cores once, if the load and write work is below `share` of the model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# The write stage (PNG or RLE encoding, one small write) is not timed by the actor; it costs about as
# much as decoding the image did, so the CPU side of an image is counted as twice its load cost.
WRITE_TO_LOAD = 1.0


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
    share: float = 0.1
    warmup: int = 1
    measure: int = 3
    enough_seconds: float = 2.0
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
        verdict = (
            f"moving to {self.most} torch threads (all cores)"
            if move
            else f"keeping {self.threads} torch thread(s) (a core left for loads and writes)"
        )
        self.decision = (
            f"model {model:.3f} s/image with {self.threads} torch thread(s), load+write ~{cpu_side:.3f} s/image: {verdict}"
        )
        logger.info("predict actor: %s", self.decision)
        return self.most if move else None
