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


class ColorProbe(nn.Module):
    """A deterministic fully convolutional semantic model: class k (1-3) where channel k - 1 is the
    brightest and above 0 after two 3x3 mean filters; else class 0.

    Two 3x3 convolutions: a receptive field of 5x5 (2 px each side), well inside a 32-px overlap's 16.
    The weights are fixed, not learnt, so any process builds the same model.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.smooth1 = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        self.smooth2 = nn.Conv2d(3, 3, 3, padding=1, groups=3, bias=False)
        with torch.no_grad():
            self.smooth1.weight.fill_(1 / 9)
            self.smooth2.weight.fill_(1 / 9)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.smooth2(self.smooth1(x))
        background = torch.zeros_like(y[:, :1])
        logits = torch.cat([background, y], dim=1)
        if self.num_classes > 4:
            pad = torch.full_like(y[:, :1], -1e4).expand(-1, self.num_classes - 4, -1, -1)
            logits = torch.cat([logits, pad], dim=1)
        return {"out": logits[:, : self.num_classes]}


def color_probe(num_classes: int) -> nn.Module:
    return ColorProbe(num_classes)


class ShapeInstanceProbe(nn.Module):
    """A deterministic instance model for scenes: every 4-connected region where one channel is bright
    (> 0.5 on the 0..1 input) is an object of class (that channel + 1), score 0.9, its mask exact.

    Returns torchvision detector outputs (boxes, labels, scores, masks as (K, 1, H, W) probabilities)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        import numpy as np
        from rasterio.features import rasterize, shapes

        outputs = []
        for image in images:
            x = image.detach().cpu().numpy()
            bright = x.max(axis=0) > 0.5
            labels = np.where(bright, x.argmax(axis=0) + 1, 0).astype(np.uint8)
            h, w = labels.shape
            boxes, classes, masks = [], [], []
            for geom, value in shapes(labels, mask=labels > 0, connectivity=4):
                m = rasterize([(geom, 1)], out_shape=(h, w), dtype=np.uint8).astype(bool)
                ys, xs = np.nonzero(m)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                classes.append(int(value))
                masks.append(m)
            k = len(boxes)
            outputs.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(k, 4),
                    "labels": torch.tensor(classes, dtype=torch.int64),
                    "scores": torch.full((k,), 0.9),
                    "masks": torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)) if k else torch.zeros(0, 1, h, w),
                }
            )
        return outputs


def shape_instance_probe(num_classes: int) -> nn.Module:
    return ShapeInstanceProbe(num_classes)


class PositionProbe(nn.Module):
    """A semantic model whose output depends on where a pixel sits in its window, not only on the image:
    class 1 grows from left to right, class 2 from top to bottom, class 0 stays 0 (any input).

    Core stitching takes each pixel from one window, so its labels jump at core seams; weighted
    blending mixes neighbouring windows across the overlap, so the two modes must differ there."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n, _, h, w = x.shape
        cols = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(n, 1, h, w)
        rows = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(n, 1, h, w)
        logits = torch.cat([torch.zeros_like(cols), cols, rows], dim=1)
        pad = torch.full((n, self.num_classes - 3, h, w), -1e4)
        return {"out": torch.cat([logits, pad], dim=1) * self.scale}


def position_probe(num_classes: int) -> nn.Module:
    return PositionProbe(num_classes)
