"""Weighted blending of class probabilities across windows (`tiling.blend: weighted`, semantic only).

The default stitching (`core`, :mod:`segbatch.geo.stitch`) takes each pixel from the one window whose
core owns it. With `weighted`, the actor returns each window's class probabilities (softmax of the
logits) instead, the write stage stores them whole as a part (`parts/<rel_key>/<window key>.npz`:
`probs` float16 C x H x W and the window's `nodata` mask, zlib-compressed), and after the stream every
pixel's label is the argmax of the weighted sum of the probabilities of every window that covers it.

Weights (:func:`axis_weights`, per axis, multiplied): 1 inside a window, a linear ramp over `overlap`
pixels down to `0.5 / overlap` at an *inner* window edge, and no ramp at the scene's own edges, so
pixels on the scene's outer frame keep full weight and are labelled (geoai's blending weighs every
tile edge to 0 and leaves the scene's 1-px frame nodata). Two windows overlap by exactly `overlap`
pixels, so their ramps cross-fade: the weights sum to 1 across a seam, and a pixel near one window's
inner edge (where zero padding distorts that window's output) is decided mostly by its neighbour.

Memory while assembling (:func:`assemble_blended`, driver): the scene is produced in row bands, one
per row of windows, so the buffers are a `C x band_height x scene_width` float32 accumulator and a
`band_height x scene_width` bool nodata band (plus one window's part and weights), `band_height` being
the window height (`tiling.size`, or its block-aligned side): for C = 4, 576-px windows and a
10,980-px wide scene, 101 MB + 6 MB (measured: an 8,192-px wide scene peaks 92-95 MB above the
process's imports for 2,048 and 8,192 rows alike, against 76.5 MiB predicted; `benchmarks/scene_blend.py`).
No weight sum is kept: every weight is positive, so the argmax of the weighted sum is the argmax of the
weighted mean. Parts are large: ~6.5 bytes per scene pixel for 4 classes (float16, the overlap stored
twice), where `core` PNG parts of real labels take a fraction of a byte. Rows a later window row still touches (the
overlap) carry over into the next band; every finished band is written to the tiled GeoTIFF and dropped.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from segbatch.geo.windows import Window, grid

__all__ = ["ARGMAX_ROWS", "axis_weights", "assemble_blended", "decode_probs", "encode_probs", "window_weights"]

#: Rows of a finished band turned into labels at once (numpy's argmax makes an int64 array).
ARGMAX_ROWS = 64


def axis_weights(start: int, length: int, n: int, overlap: int) -> np.ndarray:
    """Blend weights along one axis of a window `[start, start + length)` of a scene axis of `n` pixels.

    Example:
        >>> axis_weights(0, 6, 10, 4).tolist()  # the scene's edge on the left, an inner edge on the right
        [1.0, 1.0, 0.875, 0.625, 0.375, 0.125]
        >>> axis_weights(2, 8, 10, 4).tolist()  # an inner edge on the left, the scene's edge on the right
        [0.125, 0.375, 0.625, 0.875, 1.0, 1.0, 1.0, 1.0]
    """
    w = np.ones(length, dtype=np.float32)
    if overlap <= 0:
        return w
    d = (np.arange(length, dtype=np.float32) + 0.5) / overlap
    if start > 0:  # inner left / top edge
        w = np.minimum(w, d)
    if start + length < n:  # inner right / bottom edge
        w = np.minimum(w, d[::-1])
    return w


def window_weights(window: Window, width: int, height: int, overlap: int) -> np.ndarray:
    """A window's H x W blend weights (the product of its two axes' :func:`axis_weights`)."""
    wy = axis_weights(window.row_off, window.height, height, overlap)
    wx = axis_weights(window.col_off, window.width, width, overlap)
    return wy[:, None] * wx[None, :]


def encode_probs(probs: np.ndarray, nodata: np.ndarray) -> bytes:
    """A window's part: `probs` (C x H x W, stored float16) and its nodata mask (H x W bool, or empty)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, probs=np.asarray(probs, dtype=np.float16), nodata=np.asarray(nodata, dtype=bool))
    return buf.getvalue()


def decode_probs(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(probs C x H x W float16, nodata H x W bool or empty) of a part written by :func:`encode_probs`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return z["probs"], z["nodata"]


def assemble_blended(
    header: Any,
    output_uri: str,
    storage_options: dict[str, Any] | None,
    rel_key: str,
    size: int,
    overlap: int,
    dtype: str,
    path: Path,
) -> None:
    """Blend every window's probability part into a tiled label GeoTIFF at `path`, row band by row
    band (see the module docstring); nodata pixels get :func:`segbatch.geo.stitch.nodata_label`."""
    import rasterio
    from rasterio.windows import Window as RioWindow

    from segbatch.geo.cog import GDAL_CACHEMAX, label_profile
    from segbatch.geo.stitch import nodata_label, part_uri
    from segbatch.retry import call_with_retries
    from segbatch.storage import filesystem

    fs, _ = filesystem(output_uri, storage_options)
    width, height = header.width, header.height
    wins = grid(width, height, size, overlap, header.block)
    rows = sorted({w.row_off for w in wins})
    nodata_value = nodata_label(dtype)
    carry: tuple[int, np.ndarray, np.ndarray] | None = None  # (top row, acc, nodata) of rows still open
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHEMAX), rasterio.open(path, "w", **label_profile(header, dtype, nodata_value)) as dst:
        for k, row_off in enumerate(rows):
            band = [w for w in wins if w.row_off == row_off]
            h = band[0].height
            acc: np.ndarray | None = None
            nod = np.zeros((h, width), dtype=bool)
            for w in band:
                uri = part_uri(output_uri, rel_key, w, "npz")
                _, p = filesystem(uri, storage_options)
                probs, mask = decode_probs(bytes(call_with_retries(lambda: fs.cat_file(p), what=f"reading {uri}")))  # noqa: B023
                if probs.shape[1:] != (w.height, w.width):
                    raise ValueError(f"part {uri} expected probabilities of shape (C, {w.height}, {w.width}), but got {probs.shape}")
                if acc is None:
                    acc = np.zeros((probs.shape[0], h, width), dtype=np.float32)
                    if carry is not None:
                        top, c_acc, c_nod = carry
                        y = top - row_off
                        acc[:, y : y + c_nod.shape[0]] += c_acc
                        nod[y : y + c_nod.shape[0]] |= c_nod
                weight = window_weights(w, width, height, overlap)
                x0, x1 = w.col_off, w.col_off + w.width
                acc[:, :, x0:x1] += probs.astype(np.float32) * weight[None]
                if mask.size:
                    nod[:, x0:x1] |= mask
            assert acc is not None  # every window row has windows
            done = (rows[k + 1] if k + 1 < len(rows) else height) - row_off  # rows no later window touches
            labels = np.empty((done, width), dtype=dtype)
            for y in range(0, done, ARGMAX_ROWS):  # argmax gives int64: by a few rows, not the whole band
                stop = min(y + ARGMAX_ROWS, done)
                labels[y:stop] = acc[:, y:stop].argmax(axis=0)
            labels[nod[:done]] = nodata_value
            dst.write(labels[None], window=RioWindow(0, row_off, width, done))
            carry = (row_off + done, acc[:, done:].copy(), nod[done:].copy()) if done < h else None
