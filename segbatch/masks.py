"""Mask encodings: PNG label maps (8/16-bit) and COCO RLE helpers (pycocotools)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

__all__ = ["decode_png_label_map", "encode_png_label_map", "rle_to_mask"]


def encode_png_label_map(labels: np.ndarray) -> bytes:
    """A label map as a lossless gray PNG: 8-bit for uint8, 16-bit for uint16 (values are the labels)."""
    if labels.ndim != 2:
        raise ValueError(f"expected a 2-D label map, but got shape {labels.shape}")
    if labels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected uint8 or uint16 labels, but got {labels.dtype}")
    im = Image.fromarray(np.ascontiguousarray(labels))  # uint8 → mode L, uint16 → mode I;16
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png_label_map(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_png_label_map` (uint8 or uint16)."""
    im = Image.open(io.BytesIO(data))
    arr = np.asarray(im)
    return arr.astype(np.uint16) if im.mode.startswith("I") else arr.astype(np.uint8)


def rle_to_mask(counts: str, height: int, width: int) -> np.ndarray:
    """Decode one compressed COCO RLE (as stored in the `instances` column) to a bool HxW mask."""
    rle: dict[str, Any] = {"size": [height, width], "counts": counts.encode("ascii")}
    return mask_util.decode(rle).astype(bool)
