"""User-factory models for tests that need to see inside a Ray actor from its outputs alone."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

_lock = threading.Lock()
_running = 0


class ConcurrencyProbe(nn.Module):
    """A semantic model whose label map is how many forward passes ran in its process at once with it.

    Every pixel of an image's mask is the most passes (this one included) seen running between its
    start and its end, so the written PNGs show whether the actor's streams really overlapped.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(1))  # a state dict to load, like any model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        global _running
        with _lock:
            _running += 1
            seen = _running
        time.sleep(0.25)  # a forward pass's worth of time, without the GIL
        with _lock:
            seen = max(seen, _running)
            _running -= 1
        logits = torch.zeros(x.shape[0], self.num_classes, *x.shape[-2:])
        logits[:, min(seen, self.num_classes - 1)] = self.scale
        return {"out": logits}


def concurrency_probe(num_classes: int) -> nn.Module:
    return ConcurrencyProbe(num_classes)
