"""Label Studio's brush RLE (segbatch.export.brush) against label-studio-sdk's own encoder and decoder."""

from __future__ import annotations

import numpy as np
import pytest

from segbatch.export.brush import encode_brush


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(15)
    out = [
        np.zeros((256, 256), np.uint8),  # one run of 262,144: pieces of 65,536
        np.full((300, 500), 255, np.uint8),
        np.zeros((1, 1), np.uint8),
        np.full((1, 3), 255, np.uint8),
        (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8),  # runs of one pixel (4 values)
    ]
    for i in range(150):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        m = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(0, 4))):
            y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
            m[y : y + int(rng.integers(1, h + 1)), x : x + int(rng.integers(1, w + 1))] = 255
        if i % 5 == 0:
            m = (rng.random((h, w)) < 0.3).astype(np.uint8) * 255
        out.append(m)
    out.append(np.asfortranarray(out[-1]))  # as pycocotools decodes masks
    return out


def test_brush_rle_is_label_studio_sdks_byte_for_byte_and_decodes_pixel_exact() -> None:
    from label_studio_sdk.converter.brush import decode_rle, mask2rle

    masks = _masks()
    assert sum(1 for m in masks if 0 < (m == 255).mean() < 1) > 100  # mostly masks with both values
    lengths = set()
    for m in masks:
        ours = encode_brush(m)
        assert ours == mask2rle(m), m.shape
        assert encode_brush(m == 255) == ours  # bool masks (as exports pass them) are written as 0/255
        lengths.add(len(ours) % 8)
        pixels = decode_rle(ours).reshape(*m.shape, 4)
        assert (pixels[:, :, 3] == m).all()
    assert len(lengths) > 4  # the padding at the end takes every length


def test_brush_rle_refuses_what_is_not_a_mask() -> None:
    with pytest.raises(ValueError, match="expected a non-empty 2-D mask"):
        encode_brush(np.zeros((2, 2, 3), np.uint8))
