"""Synthetic scenes with exact ground truth: circles (1), rectangles (2) and triangles (3) on clutter.

Deterministic for a seed. Used by `segbatch demo`, the tests and the benchmarks, where no real
dataset or pretrained weights can be downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "Scene", "make_scene", "write_scene_folder"]

CLASSES = ("background", "circle", "rectangle", "triangle")


@dataclass(slots=True)
class Scene:
    """An RGB image, its label map (0 = background) and its instance-id map (0 = none)."""

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    classes: list[int]


def _polygon(cls: int, cx: float, cy: float, r: float, angle: float, aspect: float) -> list[tuple[float, float]]:
    if cls == 2:
        w, h = r, r * aspect
        pts = [(-w, -h), (w, -h), (w, h), (-w, h)]
    else:
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (0.0, 2.2 * aspect, 4.1)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def make_scene(rng: np.random.Generator, height: int, width: int, max_objects: int = 6) -> Scene:
    """Draw one scene: a noisy gradient background and 0..max_objects filled shapes."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, size=(2, 3)).astype(np.float32)
    bg = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    labels = Image.new("L", (width, height), 0)
    instances = Image.new("L", (width, height), 0)
    draw, dl, di = ImageDraw.Draw(image), ImageDraw.Draw(labels), ImageDraw.Draw(instances)
    classes: list[int] = []
    for k in range(int(rng.integers(0, max_objects + 1))):
        cls = int(rng.integers(1, 4))
        r = float(rng.uniform(8, min(height, width) / 4))
        cx, cy = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if cls == 1:
            box = [cx - r, cy - r, cx + r, cy + r]
            draw.ellipse(box, fill=color)
            dl.ellipse(box, fill=cls)
            di.ellipse(box, fill=k + 1)
        else:
            poly = _polygon(cls, cx, cy, r, float(rng.uniform(0, math.pi)), float(rng.uniform(0.4, 1.0)))
            draw.polygon(poly, fill=color)
            dl.polygon(poly, fill=cls)
            di.polygon(poly, fill=k + 1)
        classes.append(cls)
    return Scene(np.asarray(image), np.asarray(labels), np.asarray(instances), classes)


def write_scene_folder(folder: Path, count: int, seed: int) -> list[Path]:
    """Write `count` scenes as JPEG/PNG files of varied sizes (some in a subfolder); returns the paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = int(rng.integers(160, 321)), int(rng.integers(160, 321))
        scene = make_scene(rng, h, w)
        sub = folder / ("batch-b" if i % 3 == 2 else "batch-a")
        sub.mkdir(exist_ok=True)
        ext = "png" if i % 4 == 1 else "jpg"
        path = sub / f"scene-{i:04d}.{ext}"
        Image.fromarray(scene.image).save(path, quality=92) if ext == "jpg" else Image.fromarray(scene.image).save(path)
        paths.append(path)
    return paths
