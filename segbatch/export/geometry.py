"""Mask geometry for exports: tight boxes, CVAT's mask RLE, polygons, class colours. Pure functions.

Units are pixels; (x, y) = (column, row); boxes are [x, y, w, h] (COCO) unless named otherwise.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLASS_COLORS", "class_color", "cvat_rle", "hex_color", "polygons", "tight_box"]

#: Fixed class colours (RGB), by label: the same in overlays, the report's legend, CVAT and Label Studio.
#: Label 0 (background) is never drawn. Labels past the list wrap around.
CLASS_COLORS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)


def class_color(label: int) -> tuple[int, int, int]:
    """The colour of a label (1.. cycle through :data:`CLASS_COLORS` after the first)."""
    if label <= 0:
        return CLASS_COLORS[0]
    return CLASS_COLORS[1 + (label - 1) % (len(CLASS_COLORS) - 1)]


def hex_color(label: int) -> str:
    r, g, b = class_color(label)
    return f"#{r:02x}{g:02x}{b:02x}"


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the set pixels of a bool HxW mask; (0, 0, 0, 0) when none is set."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, 0, 0, 0
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def cvat_rle(mask: np.ndarray, box: tuple[int, int, int, int]) -> list[int]:
    """CVAT 1.1's mask RLE (`<mask rle=... left top width height>`) of `mask` over `box` (left, top, w, h).

    Run lengths over the box's pixels in row-major order, alternating background / mask and starting
    with background: the first run is 0 when the box's first pixel is set. The runs sum to w × h.
    `cvat_sdk.masks.encode_mask` gives the same runs (followed by the box corners).
    """
    left, top, w, h = box
    flat = np.ascontiguousarray(mask[top : top + h, left : left + w]).ravel().astype(bool)
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size])))
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return [int(v) for v in runs]


def polygons(mask: np.ndarray, min_points: int = 3) -> list[list[tuple[float, float]]]:
    """Outer contours of a bool mask as polygons of (x, y) pixel coordinates (OpenCV `findContours`).

    An approximation of the mask, for tools that want polygons: vertices are the centres of boundary
    pixels, holes are dropped (neither COCO polygons nor CVAT polygons express them), and parts of
    fewer than `min_points` vertices are left out. Exports keep areas and boxes from the mask itself.

    Raises:
        ImportError: OpenCV is missing (`pip install 'segbatch[export]'`).
    """
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "--polygons needs OpenCV (opencv-python-headless): pip install 'segbatch[export]'"
        ) from e
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        pts = c.reshape(-1, 2)
        if len(pts) >= min_points:
            out.append([(float(x), float(y)) for x, y in pts])
    return out
