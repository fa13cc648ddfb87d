"""Synthetic scenes with exact ground truth: circles (1), rectangles (2) and triangles (3) on clutter.

Everything a scene contains is drawn from one seeded generator, so a seed always gives the same
pixels and the same truth. A scene varies what a real dataset varies:

- **image size**: each side 192-384 px (:data:`SIZE_RANGE`), drawn independently;
- **object count**: 0-12 (:data:`MAX_OBJECTS`), uniform;
- **object size**: 12 px to half the image's shorter side, log-uniform. The *size* of an object is the
  diameter of a circle, the long side of a rectangle, the longest edge of a triangle;
- **shapes**: rectangles of any aspect ratio (1:1 to 5:1, short side at least 6 px) and any rotation;
  triangles of any shape whose smallest angle is at least 15 degrees (no slivers that read as lines);
- **fills**: solid, linear gradient, or noisy, in a colour that stands out from what lies beneath
  (mean RGB distance at least 60);
- **clutter**: backgrounds of flat colour or gradients with pixel noise, low-frequency blotches,
  stripes and distractor lines (all background, label 0); then light blur and sensor noise;
- **occlusion**: later objects are painted over earlier ones; each object keeps at least half of its
  in-image pixels visible (:data:`MIN_VISIBLE_FRACTION`) and at least :data:`MIN_VISIBLE_PIXELS`;
- **border**: objects may be cut by the image border, keeping at least half of their area inside.

Ground truth is the visible part of each object, exactly the pixels painted with its fill: a PNG label
map (0 background, 1..3 the class) and a COCO instances JSON (compressed RLE of the visible part,
`area` and `bbox` of the visible part, `iscrowd` 0).

Seed ranges: training uses scene seeds in [0, 10_000_000) (:data:`TRAIN_SEEDS`); the demo and
evaluations use seeds from 10_000_000 up, which no shipped model has seen.

Example:
    >>> from segbatch.synth import scene_from_seed
    >>> scene = scene_from_seed(10_000_000)
    >>> scene.image.shape[2], scene.labels.dtype.name
    (3, 'uint8')
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_util

__all__ = [
    "CLASSES",
    "MAX_OBJECTS",
    "MIN_VISIBLE_FRACTION",
    "MIN_VISIBLE_PIXELS",
    "SIZE_RANGE",
    "TRAIN_SEEDS",
    "Fill",
    "Scene",
    "Shape",
    "circle",
    "coco_annotations",
    "coco_categories",
    "compose",
    "make_scene",
    "rectangle",
    "scene_from_seed",
    "shape_mask",
    "triangle",
    "GeoScene",
    "write_dataset",
    "write_geo_scene",
    "write_scene_folder",
]

CLASSES = ("background", "circle", "rectangle", "triangle")
#: Smallest and largest side of a generated image, in pixels (inclusive).
SIZE_RANGE = (192, 384)
#: Most objects in one scene.
MAX_OBJECTS = 12
#: Smallest object size (diameter / long side / longest edge), in pixels.
MIN_OBJECT_SIZE = 12.0
#: Each object keeps at least this share of its in-image pixels visible after occlusion.
MIN_VISIBLE_FRACTION = 0.5
#: ... and at least this many visible pixels.
MIN_VISIBLE_PIXELS = 16
#: Each object keeps at least this share of its area inside the image.
MIN_INSIDE_FRACTION = 0.5
#: Scene seeds the shipped models were trained on; demo and evaluation seeds start above.
TRAIN_SEEDS = range(0, 10_000_000)

_MIN_CONTRAST = 60.0
_PLACEMENT_TRIES = 25


@dataclass(slots=True, frozen=True)
class Shape:
    """One object's class and geometry, in pixels (x to the right, y down).

    Build with :func:`circle`, :func:`rectangle` or :func:`triangle`. A circle has one vertex (its
    centre) and a radius; polygons list their vertices.
    """

    label: int
    vertices: tuple[tuple[float, float], ...]
    radius: float = 0.0

    def area(self) -> float:
        """Geometric area in square pixels (pi r^2, or the shoelace formula)."""
        if self.label == 1:
            return math.pi * self.radius**2
        pts = self.vertices
        s = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))
        return abs(s) / 2.0


def circle(cx: float, cy: float, radius: float) -> Shape:
    """A circle (class 1) centred at (cx, cy)."""
    return Shape(1, ((cx, cy),), radius)


def rectangle(cx: float, cy: float, width: float, height: float, angle: float = 0.0) -> Shape:
    """A rectangle (class 2) centred at (cx, cy), rotated by `angle` radians."""
    ca, sa = math.cos(angle), math.sin(angle)
    w, h = width / 2, height / 2
    corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
    return Shape(2, tuple((cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners))


def triangle(p1: tuple[float, float], p2: tuple[float, float], p3: tuple[float, float]) -> Shape:
    """A triangle (class 3) with the given vertices."""
    return Shape(3, (p1, p2, p3))


def shape_mask(shape: Shape, height: int, width: int) -> np.ndarray:
    """The pixels a shape covers inside a `height` x `width` image (bool), as Pillow fills it.

    Circles are Pillow ellipses in the box (cx - r, cy - r, cx + r, cy + r); polygons are Pillow
    polygon fills (outline pixels included).
    """
    im = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(im)
    if shape.label == 1:
        (cx, cy), r = shape.vertices[0], shape.radius
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(list(shape.vertices), fill=1)
    return np.asarray(im, dtype=bool)


@dataclass(slots=True, frozen=True)
class Fill:
    """How an object is painted: `solid` colour, linear `gradient` from `color` to `color2` along
    `angle` (radians), or `noisy` (`color` plus Gaussian noise of std `noise`, per pixel and channel)."""

    kind: Literal["solid", "gradient", "noisy"]
    color: tuple[int, int, int]
    color2: tuple[int, int, int] = (0, 0, 0)
    angle: float = 0.0
    noise: float = 0.0

    def mean(self) -> np.ndarray:
        """The fill's average colour (float RGB)."""
        c = np.asarray(self.color, np.float32)
        return (c + np.asarray(self.color2, np.float32)) / 2 if self.kind == "gradient" else c


@dataclass(slots=True)
class Scene:
    """An RGB image and its truth.

    Attributes:
        image: HxWx3 uint8.
        labels: HxW uint8 label map, 0 = background, 1..3 = :data:`CLASSES`.
        instances: HxW uint16 map of visible instance ids, 0 = none; id k+1 is `classes[k]`.
        classes: the class of each instance, in painting order (later ones on top).
        shapes: the geometry of each instance (same order).
    """

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    classes: list[int]
    shapes: list[Shape] = field(default_factory=list)


def _paint(canvas: np.ndarray, mask: np.ndarray, fill: Fill, rng: np.random.Generator) -> None:
    """Paint `fill` into the float HxWx3 `canvas` where `mask` is set (in place)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return
    c1 = np.asarray(fill.color, np.float32)
    if fill.kind == "gradient":
        c2 = np.asarray(fill.color2, np.float32)
        proj = xs * math.cos(fill.angle) + ys * math.sin(fill.angle)
        span = float(proj.max() - proj.min())
        t = ((proj - proj.min()) / span if span > 0 else np.zeros_like(proj, dtype=np.float64)).astype(np.float32)
        values = c1[None, :] + t[:, None] * (c2 - c1)[None, :]
    elif fill.kind == "noisy":
        values = c1[None, :] + rng.normal(0.0, fill.noise, (ys.size, 3)).astype(np.float32)
    else:
        values = np.broadcast_to(c1, (ys.size, 3))
    canvas[ys, xs] = values


def compose(
    background: np.ndarray, objects: Sequence[tuple[Shape, Fill]], rng: np.random.Generator | None = None
) -> Scene:
    """Paint objects in order (later on top) over a background; the truth is exactly what was painted.

    No occlusion or border rule is applied here (see :func:`make_scene`); an object painted over
    completely has no pixels in `labels`/`instances`.

    Args:
        background: HxWx3 uint8 image.
        objects: (shape, fill) pairs, bottom first.
        rng: randomness for noisy fills (default: seed 0).

    Returns:
        The scene: image, label map, instance map, classes and shapes.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    height, width = background.shape[:2]
    canvas = background.astype(np.float32)
    ids = np.zeros((height, width), np.uint16)
    for k, (shape, fill) in enumerate(objects):
        mask = shape_mask(shape, height, width)
        _paint(canvas, mask, fill, rng)
        ids[mask] = k + 1
    return _finish(np.clip(canvas, 0, 255).astype(np.uint8), ids, list(objects))


def _finish(image: np.ndarray, ids: np.ndarray, objects: list[tuple[Shape, Fill]]) -> Scene:
    lut = np.asarray([0] + [s.label for s, _ in objects], np.uint8)
    return Scene(image, lut[ids], ids, [s.label for s, _ in objects], [s for s, _ in objects])


# --- random scenes ------------------------------------------------------------------------------


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Clutter: flat or gradient base, pixel noise, blotches, stripes, distractor lines (float HxWx3)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c1 = _color(rng)
    if rng.random() < 0.7:
        a = rng.uniform(0, 2 * math.pi)
        proj = xx * math.cos(a) + yy * math.sin(a)
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
        bg = c1 + t[..., None] * (_color(rng) - c1)
    else:
        bg = np.broadcast_to(c1, (height, width, 3)).copy()
    if rng.random() < 0.4:  # low-frequency blotches
        gh, gw = max(2, height // int(rng.integers(16, 64))), max(2, width // int(rng.integers(16, 64)))
        grid = rng.normal(0, 1, (gh, gw, 3)).astype(np.float32)
        blot = np.stack(
            [np.asarray(Image.fromarray(grid[..., c]).resize((width, height), Image.BILINEAR)) for c in range(3)],
            axis=-1,
        )
        bg += blot * rng.uniform(10, 40)
    if rng.random() < 0.35:  # stripes
        a = rng.uniform(0, math.pi)
        period = rng.uniform(6, 40)
        phase = (xx * math.cos(a) + yy * math.sin(a)) / period * 2 * math.pi
        wave = np.sin(phase) if rng.random() < 0.5 else (np.sin(phase) > 0).astype(np.float32) * 2 - 1
        alpha = rng.uniform(0.15, 0.5)
        bg = bg * (1 - alpha) + alpha * (wave[..., None] * 0.5 + 0.5) * _color(rng)
    image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    if rng.random() < 0.6:  # distractor lines and polylines
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 9))):
            n = 2 if rng.random() < 0.7 else int(rng.integers(3, 5))
            pts = [(float(rng.uniform(-20, width + 20)), float(rng.uniform(-20, height + 20))) for _ in range(n)]
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.line(pts, fill=color, width=int(rng.integers(1, 5)))
    out = np.asarray(image).astype(np.float32)
    if rng.random() < 0.6:  # pixel noise
        out += rng.normal(0, rng.uniform(3, 25), out.shape).astype(np.float32)
    return out


def _random_shape(rng: np.random.Generator, label: int, size: float, cx: float, cy: float) -> Shape:
    if label == 1:
        return circle(cx, cy, size / 2)
    if label == 2:
        max_aspect = max(1.0, min(5.0, size / 6.0))
        aspect = math.exp(rng.uniform(0, math.log(max_aspect)))
        return rectangle(cx, cy, size, size / aspect, rng.uniform(0, math.pi))
    while True:  # a triangle whose smallest angle is at least 15 degrees
        pts = rng.uniform(-1, 1, (3, 2))
        edges = [np.linalg.norm(pts[i] - pts[(i + 1) % 3]) for i in range(3)]
        if min(edges) < 1e-3:
            continue
        angles = []
        for i in range(3):
            u, v = pts[(i + 1) % 3] - pts[i], pts[(i + 2) % 3] - pts[i]
            cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
            angles.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
        if min(angles) >= 15.0:
            break
    pts = pts * (size / max(edges))
    pts = pts - (pts.min(axis=0) + pts.max(axis=0)) / 2 + np.asarray([cx, cy])
    return triangle(*(tuple(float(v) for v in p) for p in pts))  # type: ignore[arg-type]


def _random_fill(rng: np.random.Generator, under: np.ndarray) -> Fill:
    """A fill whose mean colour is at least `_MIN_CONTRAST` away from `under` (best of a few tries)."""
    best: tuple[float, Fill] | None = None
    kind: Literal["solid", "gradient", "noisy"] = ("solid", "gradient", "noisy")[int(rng.integers(0, 3))]
    for _ in range(12):
        c1 = rng.integers(0, 256, 3)
        if kind == "gradient":
            c2 = np.clip(c1 + rng.normal(0, 60, 3), 0, 255).astype(int)
            fill = Fill("gradient", tuple(int(v) for v in c1), tuple(int(v) for v in c2), float(rng.uniform(0, 2 * math.pi)))  # type: ignore[arg-type]
        elif kind == "noisy":
            fill = Fill("noisy", tuple(int(v) for v in c1), noise=float(rng.uniform(8, 30)))  # type: ignore[arg-type]
        else:
            fill = Fill("solid", tuple(int(v) for v in c1))  # type: ignore[arg-type]
        d = float(np.linalg.norm(fill.mean() - under))
        if d >= _MIN_CONTRAST:
            return fill
        if best is None or d > best[0]:
            best = (d, fill)
    assert best is not None
    return best[1]


def make_scene(rng: np.random.Generator, height: int, width: int, max_objects: int = MAX_OBJECTS) -> Scene:
    """Draw one random scene of `height` x `width` pixels with 0..`max_objects` objects.

    Placement is by rejection: a candidate object is dropped when less than half of its area would lie
    inside the image, or when painting it would leave any earlier object with less than
    :data:`MIN_VISIBLE_FRACTION` of its in-image pixels (or :data:`MIN_VISIBLE_PIXELS`) visible; after
    25 failed candidates the object is skipped.
    """
    canvas = _background(rng, height, width)
    ids = np.zeros((height, width), np.uint16)
    inside: list[int] = []  # in-image pixels of each placed object
    objects: list[tuple[Shape, Fill]] = []
    max_size = max(MIN_OBJECT_SIZE, min(height, width) / 2)
    for _ in range(int(rng.integers(0, max_objects + 1))):
        label = int(rng.integers(1, 4))
        for _try in range(_PLACEMENT_TRIES):
            size = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(max_size)))
            margin = size / 4
            cx, cy = rng.uniform(-margin, width + margin), rng.uniform(-margin, height + margin)
            shape = _random_shape(rng, label, size, float(cx), float(cy))
            mask = shape_mask(shape, height, width)
            n_inside = int(mask.sum())
            if n_inside < MIN_VISIBLE_PIXELS or n_inside < MIN_INSIDE_FRACTION * shape.area():
                continue
            covered = np.bincount(ids[mask], minlength=len(objects) + 1)[1:]
            visible = np.bincount(ids.ravel(), minlength=len(objects) + 1)[1:] - covered
            if any(v < MIN_VISIBLE_FRACTION * n or v < MIN_VISIBLE_PIXELS for v, n in zip(visible, inside)):
                continue
            fill = _random_fill(rng, canvas[mask].mean(axis=0))
            _paint(canvas, mask, fill, rng)
            ids[mask] = len(objects) + 1
            inside.append(n_inside)
            objects.append((shape, fill))
            break
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    out = np.asarray(image)
    if rng.random() < 0.5:
        out = np.clip(out + rng.normal(0, rng.uniform(1, 6), out.shape), 0, 255).astype(np.uint8)
    return _finish(out, ids, objects)


def scene_from_seed(seed: int, *, size_range: tuple[int, int] = SIZE_RANGE, max_objects: int = MAX_OBJECTS) -> Scene:
    """The scene of one seed: its size (each side in `size_range`, inclusive) and content.

    Example:
        >>> a, b = scene_from_seed(7), scene_from_seed(7)
        >>> bool((a.image == b.image).all())
        True
    """
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    return make_scene(rng, height, width, max_objects)


# --- ground truth files -------------------------------------------------------------------------


def coco_categories() -> list[dict[str, Any]]:
    """COCO `categories`: ids 1..3 with the names in :data:`CLASSES`."""
    return [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES) if i > 0]


def coco_annotations(scene: Scene, image_id: int, first_id: int = 1) -> list[dict[str, Any]]:
    """COCO annotations of a scene's visible instances (compressed RLE, visible `area` and `bbox`, plus
    `occluded_fraction` and `cut_fraction`).

    Instances with no visible pixel are left out. Ids count up from `first_id`.
    """
    out: list[dict[str, Any]] = []
    for k, label in enumerate(scene.classes):
        mask = scene.instances == k + 1
        if not mask.any():
            continue
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        out.append(
            {
                "id": first_id + len(out),
                "image_id": image_id,
                "category_id": int(label),
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": 0,
                **_hidden_fractions(scene.shapes[k], mask),
            }
        )
    return out


def _hidden_fractions(shape: Shape, visible: np.ndarray) -> dict[str, float]:
    """How much of an object the truth does not show: `occluded_fraction` (of its in-image pixels, hidden
    by later objects) and `cut_fraction` (of its geometric area, outside the image). `segbatch eval`
    reports AP on the occluded and cut subsets from these (extra COCO fields; pycocotools ignores them)."""
    inside = int(shape_mask(shape, *visible.shape).sum())
    occluded = 1.0 - int(visible.sum()) / inside if inside else 0.0
    cut = max(0.0, 1.0 - inside / shape.area()) if shape.area() > 0 else 0.0
    return {"occluded_fraction": round(occluded, 4), "cut_fraction": round(cut, 4)}


def write_scene_folder(folder: Path, count: int, seed: int, *, truth: Path | None = None) -> list[Path]:
    """Write `count` scenes (seeds `seed`, `seed + 1`, ...) as image files; returns their paths.

    Images go to `folder/batch-a/` and `folder/batch-b/` (every third), as JPEG (quality 92) or PNG
    (every fourth, starting with the second). With `truth`, their ground truth is written too: label
    maps at `truth/labels/<image path relative to folder>.png` (the layout of a job's `masks/`) and
    `truth/instances.json` (COCO, `file_name` = the image path relative to `folder`).

    Args:
        folder: Where the images go (created).
        count: Number of scenes.
        seed: The first scene's seed; keep demo and evaluation seeds out of :data:`TRAIN_SEEDS`.
        truth: Folder for the ground truth, or None for images only.

    Returns:
        The image paths, in seed order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(count):
        scene = scene_from_seed(seed + i)
        sub = "batch-b" if i % 3 == 2 else "batch-a"
        ext = "png" if i % 4 == 1 else "jpg"
        rel = f"{sub}/scene-{i:04d}.{ext}"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(scene.image)
        if ext == "jpg":
            im.save(path, quality=92)
        else:
            im.save(path)
        paths.append(path)
        if truth is not None:
            label_path = truth / "labels" / f"{rel}.png"
            label_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(scene.labels).save(label_path)
            h, w = scene.labels.shape
            images.append({"id": i + 1, "file_name": rel, "height": h, "width": w, "seed": seed + i})
            annotations += coco_annotations(scene, i + 1, first_id=len(annotations) + 1)
    if truth is not None:
        coco = {
            "info": {"description": f"segbatch.synth scenes, seeds {seed}..{seed + count - 1}"},
            "images": images,
            "annotations": annotations,
            "categories": coco_categories(),
        }
        truth.mkdir(parents=True, exist_ok=True)
        (truth / "instances.json").write_text(json.dumps(coco))
    return paths


def write_dataset(root: Path, count: int, seed: int) -> tuple[Path, Path]:
    """Write a dataset: `root/images/...` and its truth, `root/truth/labels/...` + `root/truth/instances.json`.

    The truth folder is what `segbatch eval OUTPUT --truth root/truth` reads, for semantic and
    instance outputs alike (see :func:`write_scene_folder` for the layout).

    Args:
        root: Dataset folder (created).
        count: Number of scenes.
        seed: The first scene's seed (scenes use `seed`, `seed + 1`, ...).

    Returns:
        (images folder, truth folder).

    Example:
        >>> import tempfile
        >>> images, truth = write_dataset(Path(tempfile.mkdtemp()), count=2, seed=10_000_000)
        >>> sorted(p.name for p in truth.iterdir())
        ['instances.json', 'labels']
    """
    images, truth = root / "images", root / "truth"
    write_scene_folder(images, count, seed, truth=truth)
    return images, truth


# --- georeferenced scenes (`segbatch[geo]`) ------------------------------------------------------------

#: A georeferenced scene's colour per class: class k is bright in channel k - 1 (R, G, B), dim elsewhere.
GEO_BRIGHT, GEO_DIM = 210, 30
#: Band value of nodata pixels in written scenes (every band); int16 scenes use :data:`GEO_NODATA_INT16`.
GEO_NODATA = 0
GEO_NODATA_INT16 = -9999


@dataclass(slots=True)
class GeoScene:
    """A written georeferenced scene: its file, its truth label raster (255 = nodata) and truth polygons."""

    path: Path
    labels: np.ndarray
    objects: int
    truth_raster: Path | None = None
    truth_polygons: Path | None = None


def write_geo_scene(
    path: Path,
    *,
    width: int = 600,
    height: int = 500,
    seed: int = 10_000_000,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500_000.0, 5_000_000.0),
    pixel_size: float = 10.0,
    block: int | None = 256,
    spacing: int = 110,
    shape_size: tuple[float, float] = (24.0, 40.0),
    nodata_corner: int = 64,
    kind: Literal["rgb8", "uint16x4", "int16x4", "float32x4"] = "rgb8",
    nodata_in_file: bool = True,
    truth: Path | None = None,
    truth_key: str | None = None,
) -> GeoScene:
    """Write a tiled GeoTIFF scene of separated shapes in a projected CRS, with its exact truth.

    Shapes (circles, rectangles, triangles; class 1-3) sit on a jittered grid `spacing` px apart,
    `shape_size` px in size (with 600x500 px and 256/32 tiling many cross tile seams), painted in pure class colours
    (:data:`GEO_BRIGHT` in channel k - 1, :data:`GEO_DIM` elsewhere) on a noisy gray background
    (values 40-90, never the nodata value). The top-left `nodata_corner` square is nodata
    (:data:`GEO_NODATA` in every band; the file's nodata is set), and no shape touches it.

    `block` is the side of the file's internal tiles; None writes strips (GDAL's default layout).

    `kind="rgb8"` writes 3 uint8 bands (R, G, B); the others write 4 bands (B', G', R', noise) that
    bands [3, 2, 1] scaled as shown give back the 8-bit RGB scene exactly:

    ============  ====================  ===========================  ====================
    kind          band value            input.scale                  nodata value
    ============  ====================  ===========================  ====================
    `uint16x4`    `v * 10`              `{min: 0, max: 2550}`        0
    `int16x4`     `v * 10 - 1000`       `{min: -1000, max: 1550}`    -9999 (:data:`GEO_NODATA_INT16`)
    `float32x4`   `v / 255`             `{min: 0, max: 1}`           NaN (in the file), else -1.0
    ============  ====================  ===========================  ====================

    (int16 values are negative below v = 100: the background.) With `nodata_in_file=False` the corner
    still holds the nodata value but the file declares none (a job then names it in `input.nodata`).

    With `truth`, also `truth/labels/<key>.tif` (uint8 labels, 255 nodata, same georeferencing) and
    `truth/polygons/<key>.geojson` (one feature per shape, `label` and `class_name`, in the scene's CRS),
    `key` being `truth_key` (the scene's key relative to the job's input, as `segbatch eval` matches
    it; default: the file name): the layout of a scene job's `masks/` and `polygons/`.
    """
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    image = rng.integers(40, 91, size=(height, width, 3)).astype(np.uint8)
    labels = np.zeros((height, width), dtype=np.uint8)
    objects = 0
    for cy in range(spacing // 2, height, spacing):
        for cx in range(spacing // 2, width, spacing):
            x = cx + float(rng.uniform(-spacing / 10, spacing / 10))
            y = cy + float(rng.uniform(-spacing / 10, spacing / 10))
            size = float(rng.uniform(*shape_size))
            if x - size < nodata_corner + 8 and y - size < nodata_corner + 8:
                continue
            label = int(rng.integers(1, 4))
            if label == 1:
                shape = circle(x, y, size / 2)
            elif label == 2:
                shape = rectangle(x, y, size, size * 0.6, float(rng.uniform(0, 180)))
            else:
                r = size / 2
                shape = triangle((x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8))
            mask = shape_mask(shape, height, width)
            if not mask.any():
                continue
            labels[mask] = label
            colour = np.full(3, GEO_DIM, dtype=np.uint8)
            colour[label - 1] = GEO_BRIGHT
            image[mask] = colour
            objects += 1
    if nodata_corner:
        image[:nodata_corner, :nodata_corner] = GEO_NODATA
        labels[:nodata_corner, :nodata_corner] = 255
    transform = from_origin(origin[0], origin[1], pixel_size, pixel_size)
    nodata: float = GEO_NODATA
    if kind == "rgb8":
        bands = np.moveaxis(image, -1, 0)
    else:
        extra = rng.integers(1, 4000, size=(height, width))
        if kind == "uint16x4":
            values, dtype = image.astype(np.float64) * 10, np.uint16
        elif kind == "int16x4":
            values, dtype, nodata = image.astype(np.float64) * 10 - 1000, np.int16, GEO_NODATA_INT16
            extra = extra - 2000
        elif kind == "float32x4":
            values, dtype, nodata = image.astype(np.float64) / 255, np.float32, float("nan") if nodata_in_file else -1.0
            extra = extra / 4000
        else:
            raise ValueError(f"expected kind rgb8, uint16x4, int16x4 or float32x4, but got {kind!r}")
        bands = np.stack([values[..., 2], values[..., 1], values[..., 0], extra]).astype(dtype)
        if nodata_corner:
            bands[:, :nodata_corner, :nodata_corner] = nodata
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": bands.shape[0], "dtype": bands.dtype.name,
        "crs": crs, "transform": transform, "nodata": nodata if nodata_in_file else None, "compress": "deflate",
        **({"tiled": True, "blockxsize": block, "blockysize": block} if block else {}),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands)
    out = GeoScene(path, labels, objects)
    if truth is not None:
        from rasterio.features import shapes

        key = truth_key or path.name
        out.truth_raster = truth / "labels" / f"{key}.tif"
        out.truth_raster.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(out.truth_raster, "w", **{**profile, "count": 1, "dtype": "uint8", "nodata": 255}) as dst:
            dst.write(labels[None])
        features = [
            {"type": "Feature", "geometry": geom, "properties": {"label": int(v), "class_name": CLASSES[int(v)]}}
            for geom, v in shapes(labels, mask=(labels > 0) & (labels < 255), transform=transform)
        ]
        out.truth_polygons = truth / "polygons" / f"{key}.geojson"
        out.truth_polygons.parent.mkdir(parents=True, exist_ok=True)
        collection = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": crs}}, "features": features}
        out.truth_polygons.write_text(json.dumps(collection))
    return out
