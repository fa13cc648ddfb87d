"""Model builders by name: torchvision's segmentation and Mask R-CNN architectures, or a user factory.

Every builder returns an `nn.Module` in eval mode with random weights; weights are loaded separately
(:mod:`segbatch.models.weights`) so one code path serves `none`, `torchvision` and checkpoints.

A user factory (`arch: mypkg.models:build`) is called with the keyword arguments it accepts among
`num_classes` and `task`, and must return a module with torchvision's interface: semantic models map
an `(N, 3, H, W)` float batch to `(N, C, H, W)` logits (or a dict with `out`); instance models take a
list of `(3, H, W)` float tensors in [0, 1] and return, per image, a dict with `boxes` (xyxy),
`labels`, `scores` and `masks` (`(K, 1, H, W)` probabilities), as torchvision's Mask R-CNN does.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from segbatch.models.archs import INSTANCE_ARCHS, SEMANTIC_ARCHS

__all__ = ["DEFAULT_NUM_CLASSES", "build_model", "configure_detector"]

#: torchvision's class counts for its own weights (VOC-style 21 for segmentation, COCO 91 for Mask R-CNN).
DEFAULT_NUM_CLASSES = {"semantic": 21, "instance": 91}


def _load_factory(arch: str) -> Any:
    module_name, _, attr = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"model.arch '{arch}': cannot import module '{module_name}': {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ImportError(f"model.arch '{arch}': module '{module_name}' has no callable '{attr}'")
    return fn


def build_model(task: str, arch: str, num_classes: int) -> nn.Module:
    """Build an architecture with random weights (no downloads, backbone weights included)."""
    import torchvision

    if arch in SEMANTIC_ARCHS:
        model = torchvision.models.get_model(
            arch, weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )
    elif arch in INSTANCE_ARCHS:
        model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes)
    else:
        fn = _load_factory(arch)
        accepted = inspect.signature(fn).parameters
        offered = {"num_classes": num_classes, "task": task}
        kwargs = {k: v for k, v in offered.items() if k in accepted}
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model.arch '{arch}' expected to return a torch.nn.Module, but got {type(model).__name__}")
    return model.eval()


def configure_detector(
    model: nn.Module,
    *,
    score_threshold: float,
    max_detections: int,
    min_size: int | None,
    mean: tuple[float, float, float] | None,
    std: tuple[float, float, float] | None,
) -> None:
    """Apply job options to a torchvision-style detector (GeneralizedRCNN) in place."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        roi_heads.score_thresh = score_threshold
        roi_heads.detections_per_img = max_detections
    transform = getattr(model, "transform", None)
    if transform is not None:
        if min_size is not None:
            ratio = transform.max_size / max(transform.min_size)
            transform.min_size = (int(min_size),)
            transform.max_size = int(round(min_size * ratio))
        if mean is not None:
            transform.image_mean = list(mean)
        if std is not None:
            transform.image_std = list(std)


def num_parameters(model: nn.Module) -> int:
    """Parameter count, for the run manifest."""
    return sum(p.numel() for p in model.parameters())


def seeded_init(seed: int = 0) -> torch.Generator:
    """Seed torch so every actor builds identical random weights for `weights: none`."""
    torch.manual_seed(seed)
    return torch.default_generator
