"""Tile windows of a scene and the core each one owns: pure functions on ints (units: pixels).

A scene of `width` x `height` pixels is cut into windows of side `size` that overlap by `overlap`;
window starts are multiples of the step `s = size - overlap` along each axis:

    starts(n) = [0, s, 2s, ...]  up to the first start k*s with k*s + size >= n
    window k  = [k*s, min(k*s + size, n))   (windows at the right / bottom edge may be smaller)

Each output pixel is owned by exactly one window, its **core**: overlap/2 is dropped at every inner
window edge, nothing at the scene's own edges. With `a = overlap // 2` and `b = overlap - a`:

    core k = [k*s + a if k > 0 else 0,  k*s + size - b if window k is not the last else n)

so core k ends where core k+1 begins (`k*s + size - b = (k+1)*s + a`), and the cores tile the scene
exactly. A model whose receptive field reaches at most `a` pixels gives a core the same labels it
would give on the whole scene (the seam-exactness property the tests check).

Block alignment (:func:`aligned_size`, applied by :func:`grid` per axis when the file has internal
blocks): the step becomes the multiple of the block side nearest to `size - overlap` (at least one
block) and the window widens (or narrows) to `step + overlap`, so every window starts on a block
boundary and spans the fewest blocks a window of its side can (`m + 1` per axis for a step of `m`
blocks, where an unaligned window of the same side usually spans `m + 2`). Used only when that window
is within 25% of `size` (e.g. 512/64 on 512² or 256² blocks → 576-px windows, step 512; 256/32 on
256² blocks → 288, step 256); otherwise, and for strip-organised files, the grid is the plain one
above. The core formula is unchanged (it depends on the step and `overlap` only), so ownership stays
exact. Fewer windows cover the scene: on a 4,096² COG with 512² blocks, 64 windows of 576 read 225
blocks where 81 windows of 512 read 256 (`benchmarks/README.md`, "Scenes").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALIGN_TOLERANCE", "Window", "aligned_size", "core_of", "grid", "starts", "window_key"]


@dataclass(frozen=True, slots=True)
class Window:
    """A pixel window: column and row offset, width and height (rasterio's order)."""

    col_off: int
    row_off: int
    width: int
    height: int


def starts(n: int, size: int, overlap: int) -> list[int]:
    """Window starts along an axis of `n` pixels (see the module docstring).

    Example:
        >>> starts(600, 256, 32)
        [0, 224, 448]
        >>> starts(100, 256, 32)
        [0]
    """
    if n <= 0:
        return []
    step = size - overlap
    if step <= 0:
        raise ValueError(f"expected overlap < size, but got overlap {overlap}, size {size}")
    out = [0]
    while out[-1] + size < n:
        out.append(out[-1] + step)
    return out


def grid(width: int, height: int, size: int, overlap: int, block: tuple[int, int] | None = None) -> list[Window]:
    """The scene's windows, row by row; `block` (height, width) of the file's internal tiles aligns
    them (see the module docstring), None (strips, or no header) keeps the plain grid.

    Example:
        >>> [(w.col_off, w.width) for w in grid(600, 10, 256, 32)]
        [(0, 256), (224, 256), (448, 152)]
        >>> [(w.col_off, w.width) for w in grid(600, 10, 256, 32, block=(256, 256))]
        [(0, 288), (256, 288), (512, 88)]
    """
    size_y = aligned_size(size, overlap, block[0]) if block else size
    size_x = aligned_size(size, overlap, block[1]) if block else size
    cols, rows = starts(width, size_x, overlap), starts(height, size_y, overlap)
    return [
        Window(c, r, min(size_x, width - c), min(size_y, height - r)) for r in rows for c in cols
    ]


def _core_axis(start: int, length: int, n: int, overlap: int) -> tuple[int, int]:
    a, b = overlap // 2, overlap - overlap // 2
    lo = start + a if start > 0 else 0
    hi = n if start + length >= n else start + length - b
    return lo, hi


def core_of(window: Window, width: int, height: int, overlap: int) -> Window:
    """The part of `window` it owns, in scene pixels (see the module docstring for the formula).

    Example:
        >>> core_of(Window(224, 0, 256, 10), 600, 10, 32)
        Window(col_off=240, row_off=0, width=224, height=10)
    """
    x0, x1 = _core_axis(window.col_off, window.width, width, overlap)
    y0, y1 = _core_axis(window.row_off, window.height, height, overlap)
    return Window(x0, y0, x1 - x0, y1 - y0)


def window_key(window: Window) -> str:
    """A window's name in item ids and part keys: `c<col_off>_r<row_off>_w<width>_h<height>`."""
    return f"c{window.col_off}_r{window.row_off}_w{window.width}_h{window.height}"


#: Largest change of the window side block alignment may make, as a share of `tiling.size`.
ALIGN_TOLERANCE = 0.25


def aligned_size(size: int, overlap: int, block: int) -> int:
    """The window side whose step (`side - overlap`) is the multiple of `block` nearest to
    `size - overlap` (at least one block), when it is within :data:`ALIGN_TOLERANCE` of `size`;
    else `size` (the plain grid). Windows of that side start on the file's block boundaries.

    Example:
        >>> aligned_size(512, 64, 512), aligned_size(512, 64, 256), aligned_size(256, 32, 512)
        (576, 576, 256)
    """
    if block <= 0:
        return size
    blocks = max(1, int((size - overlap) / block + 0.5))
    side = blocks * block + overlap
    return side if abs(side - size) <= ALIGN_TOLERANCE * size else size
