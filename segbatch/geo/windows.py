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

Block alignment: when the step is a multiple of the file's internal block side (e.g. 512 - 0, or
576 - 64 with 512 blocks... the step is what matters), every window starts on a block boundary and a
window read fetches whole blocks only; :func:`aligned_size` suggests such a size.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Window", "aligned_size", "core_of", "grid", "starts", "window_key"]


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


def grid(width: int, height: int, size: int, overlap: int) -> list[Window]:
    """The scene's windows, row by row.

    Example:
        >>> [(w.col_off, w.width) for w in grid(600, 10, 256, 32)]
        [(0, 256), (224, 256), (448, 152)]
    """
    cols, rows = starts(width, size, overlap), starts(height, size, overlap)
    return [
        Window(c, r, min(size, width - c), min(size, height - r)) for r in rows for c in cols
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


def aligned_size(size: int, overlap: int, block: int) -> int:
    """The smallest size >= `size` whose step (`size - overlap`) is a multiple of `block`: windows then
    start on the file's internal block boundaries.

    Example:
        >>> aligned_size(512, 64, 256)
        576
    """
    if block <= 0:
        return size
    step = -(-(size - overlap) // block) * block
    return step + overlap
