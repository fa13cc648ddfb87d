"""Label Studio's brush RLE, vectorised: what `label_studio_sdk.converter.brush.mask2rle` gives, 7-15× faster.

The format (label-studio-sdk's `encode_rle`): the mask row-major, every value repeated 4 times (RGBA),
as a bit string: a 53-bit header (value count: 32 bits; word size − 1 = 7: 5 bits; the run-length
field sizes 3, 4, 8, 16, less one: 4 bits each), then one token per run, most significant bit first:

    run of 1          0 00 000  value(8)                       14 bits
    run of 2..8       1 00 (n−1)(3)  value(8)                  14 bits
    run of 9..16      1 01 (n−1)(4)  value(8)                  15 bits
    run of 17..256    1 10 (n−1)(8)  value(8)                  19 bits
    longer            1 11 (n−1)(16) value(8), in pieces of 65,536 (the last one holds the rest)

then 1 to 8 zero bits (8 when the length is already a multiple of 8: the reference's quirk, kept), as
bytes. The reference builds that string in Python one run at a time (0.3-1 ms for an object on a
256×256 image, three quarters of a Label Studio export's time); this builds the same tokens with numpy
and packs the bits once. tests/test_export_brush.py checks it against the reference byte for byte.
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode_brush"]

_HEADER_CODES = (7, 0b0010_0011_0111_1111)  # word size 8 − 1; field sizes 3, 4, 8, 16 less one
_PIECE = 65536
#: Per token kind (run of 1, 2..8, 9..16, 17..256, longer): the leading bits in place, and the width.
_LEAD = np.array([0, 0b100 << 11, 0b101 << 12, 0b110 << 16, 0b111 << 24], np.uint64)
_WIDTH = np.array([14, 14, 15, 19, 27], np.int64)
_KIND_EDGES = np.array([1, 8, 16, 256])


def encode_brush(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a 2-D mask, as a list of byte values.

    `mask` is uint8 (the values as given: 0/255 for a brush label) or bool (written as 0/255).
    """
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"expected a non-empty 2-D mask, but got shape {mask.shape}")
    flat = np.ascontiguousarray(mask).ravel()
    if flat.dtype != np.bool_:
        flat = flat.astype(np.uint8, copy=False)
    ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]), flat.size - 1)
    lengths = np.diff(ends, prepend=-1) * 4  # each value 4 times (RGBA)
    values = flat[ends].astype(np.uint64) * np.uint64(255 if flat.dtype == np.bool_ else 1)
    long = lengths > 256
    if not long.any():
        n, value, kind = lengths, values, np.searchsorted(_KIND_EDGES, lengths)
    else:  # long runs: in pieces of _PIECE, the last holding the rest
        pieces = (lengths - 1) // _PIECE * long + 1
        run = np.repeat(np.arange(lengths.size), pieces)
        n = np.full(run.size, _PIECE, np.int64)
        n[np.cumsum(pieces) - 1] = lengths - (pieces - 1) * _PIECE
        value = values[run]
        kind = np.where(long[run], 4, np.searchsorted(_KIND_EDGES, n))
    code = _LEAD[kind] | ((n - 1).astype(np.uint64) << np.uint64(8)) | value
    codes = np.concatenate([np.array([flat.size * 4, *_HEADER_CODES], np.uint64), code])
    widths = np.concatenate([np.array([32, 5, 16], np.int64), _WIDTH[kind]])
    total = int(widths.sum())
    ends_at = np.cumsum(widths)
    shift = (np.repeat(ends_at, widths) - 1 - np.arange(total)).astype(np.uint64)
    bits = ((np.repeat(codes, widths) >> shift) & np.uint64(1)).astype(np.uint8)
    bits = np.concatenate([bits, np.zeros(8 - total % 8, np.uint8)])
    return np.packbits(bits).tolist()  # type: ignore[no-any-return]
