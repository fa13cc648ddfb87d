"""Models whose masks vary, and the checks that keep equivalence tests from going vacuous.

A random-init segmentation model paints one class everywhere, and a random Mask R-CNN finds nothing,
so "the pipeline gives the direct call's masks" would hold for padded batches, shuffled results or
transposed RLEs alike. Every equivalence test takes its model from here (or uses the shipped
`builtin:shapes` models on generated scenes) and first proves its expected output is not degenerate
with :func:`assert_varied_labels` / :func:`assert_varied_instances`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from tests.conftest import save_checkpoint

LRASPP = "lraspp_mobilenet_v3_large"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def varied_lraspp(num_classes: int = 4, seed: int = 0, scale: float = 300.0) -> torch.nn.Module:
    """A random LRASPP whose two classifier heads are scaled up, so its labels follow the pixels.

    Unscaled, the logits are nearly equal and one class wins everywhere. Scaled by 300 (seed 0), the
    conftest images get 2-3 classes at >= 5% each, and zero-padding them into a 128² batch moves
    0.6-2.7% of their labels (LRASPP's global pooling sees the padding).
    """
    torch.manual_seed(seed)
    model = torchvision.models.get_model(LRASPP, weights=None, weights_backbone=None, num_classes=num_classes)
    with torch.no_grad():
        model.classifier.low_classifier.weight.mul_(scale)
        model.classifier.high_classifier.weight.mul_(scale)
    return model.eval()


def varied_lraspp_checkpoint(path: Path, num_classes: int = 4) -> tuple[torch.nn.Module, Path]:
    """The model and a plain state_dict checkpoint of it at `path`."""
    model = varied_lraspp(num_classes)
    return model, save_checkpoint(model, path)


def direct_labels(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """The model called by hand on one RGB image (ImageNet normalisation, no resize): its label map."""
    x = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - IMAGENET_MEAN) / IMAGENET_STD
    with torch.inference_mode():
        out = model(x[None])
    logits = out["out"] if isinstance(out, dict) else out
    return logits[0].argmax(0).numpy()


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def class_shares(mask: np.ndarray) -> np.ndarray:
    return np.bincount(mask.ravel().astype(np.int64)) / max(mask.size, 1)


def assert_varied_labels(
    masks: Sequence[np.ndarray], min_classes: int = 2, min_share: float = 0.05, min_fraction: float = 1.0
) -> None:
    """Expected label maps that can tell a right pipeline from a wrong one.

    At least `min_fraction` of the masks have `min_classes` classes covering >= `min_share` of their
    pixels each, and no two such masks of the same size are identical (a result handed to the wrong image
    of a group would otherwise go unseen).
    """
    assert masks, "no expected masks"
    rich = [int((class_shares(m) >= min_share).sum()) >= min_classes for m in masks]
    assert sum(rich) >= min_fraction * len(masks), (
        f"degenerate expected masks: only {sum(rich)} of {len(masks)} have {min_classes} classes "
        f">= {min_share:.0%} (shares: {[np.round(class_shares(m), 3).tolist() for m in masks]})"
    )
    seen: dict[tuple[int, ...], list[np.ndarray]] = {}
    for m in (m for m, r in zip(masks, rich) if r):
        for other in seen.setdefault(m.shape, []):
            assert not np.array_equal(m, other), "two expected masks are identical: a mix-up would pass"
        seen[m.shape].append(m)


def assert_varied_instances(per_image: Iterable[Sequence[Any]], min_images: int, min_objects: int) -> None:
    """Expected instance results worth comparing: objects in at least `min_images` images, at least
    `min_objects` in all, and every mask non-empty (an object's boolean `mask`, or its `area`)."""
    counts, total = [], 0
    for objects in per_image:
        counts.append(len(objects))
        for obj in objects:
            area = int(obj["mask"].sum()) if "mask" in obj else int(obj["area"])
            assert area > 0, "an expected instance mask is empty"
            total += 1
    assert sum(c > 0 for c in counts) >= min_images and total >= min_objects, (
        f"degenerate expected instances: {counts} objects per image"
    )


def builtin_shapes_detector(score_threshold: float = 0.5, max_detections: int = 100) -> torch.nn.Module:
    """The shipped `builtin:shapes` instance model as a plain torchvision Mask R-CNN, built by hand.

    Read straight from the package's checkpoint file with `torch.load(weights_only=True)`, so a test
    comparing the pipeline with it does not go through segbatch's own loading code.
    """
    from importlib import resources

    from segbatch.models.small import maskrcnn_small

    data = resources.files("segbatch.models").joinpath("builtin", "shapes-instance.pt").read_bytes()
    import io

    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = maskrcnn_small(num_classes=len(checkpoint["classes"]))
    model.load_state_dict({k: v.float() for k, v in checkpoint["state_dict"].items()})
    model.roi_heads.score_thresh = score_threshold
    model.roi_heads.detections_per_img = max_detections
    return model.eval()


def direct_instances(model: torch.nn.Module, image: np.ndarray, mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """A detector called by hand on one RGB image: label, score and boolean mask per detection."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    with torch.inference_mode():
        out = model([x])[0]
    return [
        {"label": int(out["labels"][k]), "score": float(out["scores"][k]), "mask": out["masks"][k, 0].numpy() > mask_threshold}
        for k in range(len(out["scores"]))
    ]


def write_rich_scenes(folder: Path, count: int, seed: int = 10_000_000, size_range: tuple[int, int] = (160, 256)) -> list[Path]:
    """Generated scenes (`segbatch.synth`) whose truth has two classes at >= 5% of the pixels or more,
    so `builtin:shapes` masks of them vary; seeds are taken in order from `seed`, skipping sparse
    scenes. Every third image goes to `b/`, the rest to `a/`; every fourth is a PNG, the rest JPEGs."""
    from segbatch.synth import scene_from_seed

    paths: list[Path] = []
    s = seed
    while len(paths) < count:
        scene = scene_from_seed(s, size_range=size_range)
        s += 1
        if (class_shares(scene.labels) >= 0.05).sum() < 2:
            continue
        i = len(paths)
        ext = "png" if i % 4 == 1 else "jpg"
        path = folder / ("b" if i % 3 == 2 else "a") / f"scene-{i:04d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(path, **({"quality": 92} if ext == "jpg" else {}))
        paths.append(path)
    return paths
