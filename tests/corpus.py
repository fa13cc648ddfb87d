"""A corpus of awkward and broken image files, generated (never committed), each with its expected outcome.

`write_corpus(root)` writes the files under `root` and returns one :class:`CorpusFile` per entry; the
load stage must turn each into exactly the expected row: `ok` with the expected (H, W, 3) shape, or an
error of the expected class whose message names the file. Run this file to write a corpus somewhere
and print the table:

    python tests/corpus.py /tmp/corpus
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CORPUS_MAX_BYTES", "CORPUS_NAMES", "CorpusFile", "png_bytes", "write_corpus"]

#: The `max_bytes` the corpus is meant to be loaded with (`oversize.png` is larger).
CORPUS_MAX_BYTES = 1024 * 1024


@dataclass(slots=True, frozen=True)
class CorpusFile:
    """One corpus entry: where it is and what the load stage must make of it."""

    name: str
    uri: str
    size: int  # as a listing reports it (0 for the missing object)
    status: str  # "ok" or "error"
    error_class: str = ""  # for errors
    shape: tuple[int, int, int] | None = None  # (H, W, 3) for ok rows, after EXIF orientation
    why: str = ""


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written by hand: `raw` is the filtered scanlines (a 0 filter byte before each row).

    Lets the corpus say things Pillow would not write (a header claiming 30000x30000, 16-bit RGB).
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _save(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header is rewritten to claim `width` x `height`."""
    data = bytearray(_save(Image.new("RGB", (16, 16), (9, 9, 9)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _exif_jpeg(orientation: int) -> bytes:
    """8 wide x 4 high, stored unrotated, with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(_noise(4, 8)), "JPEG", exif=exif.tobytes())


def _palette_transparent() -> bytes:
    im = Image.new("P", (5, 3), 1)
    im.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    return _save(im, "PNG", transparency=1)


def _animated_gif() -> bytes:
    frames = []
    for i in range(3):
        f = Image.new("P", (6, 4), i)
        f.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
        frames.append(f)
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _multipage_tiff() -> bytes:
    first, second = Image.new("RGB", (6, 4), (255, 0, 0)), Image.new("RGB", (3, 9), (0, 255, 0))
    return _save(first, "TIFF", save_all=True, append_images=[second])


def _gray16_png() -> bytes:
    return _save(Image.fromarray(np.array([[0, 32768, 65535]] * 2, dtype=np.uint16)), "PNG")


def _rgb16_png() -> bytes:
    row = b"\x00" + struct.pack(">HHH", 0x8000, 0xFFFF, 0x0101) * 3
    return png_bytes(3, 2, 16, 2, row * 2)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    data = bytearray(_save(Image.fromarray(_noise(64, 64)), "PNG"))
    at = data.find(b"IDAT") + 100
    data[at : at + 16] = b"\xff" * 16
    return bytes(data)


def _oversize_png() -> bytes:
    """A valid PNG just over `CORPUS_MAX_BYTES` (noise, stored uncompressed)."""
    return _save(Image.fromarray(_noise(640, 640)), "PNG", compress_level=0)


_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
_HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64

#: name → (bytes factory or None for "not written", status, error_class, shape, why)
_ENTRIES: list[tuple[str, Callable[[], bytes] | None, str, str, tuple[int, int, int] | None, str]] = [
    # awkward but valid
    ("cmyk.jpg", lambda: _save(Image.new("CMYK", (8, 6), (10, 20, 30, 40)), "JPEG"), "ok", "", (6, 8, 3), "CMYK JPEG"),
    ("gray16.png", _gray16_png, "ok", "", (2, 3, 3), "16-bit gray PNG (I;16)"),
    ("gray16.tif", lambda: _save(Image.fromarray(np.full((3, 2), 40000, np.uint16)), "TIFF"), "ok", "", (3, 2, 3),
     "16-bit gray TIFF"),
    ("rgb16.png", _rgb16_png, "ok", "", (2, 3, 3), "16-bit RGB PNG"),
    ("float.tif", lambda: _save(Image.fromarray(np.full((2, 2), 0.5, np.float32)), "TIFF"), "ok", "", (2, 2, 3),
     "32-bit float TIFF (F)"),
    ("bilevel.png", lambda: _save(Image.new("1", (7, 5), 1), "PNG"), "ok", "", (5, 7, 3), "1-bit"),
    ("palette_transparent.png", _palette_transparent, "ok", "", (3, 5, 3), "palette with tRNS transparency"),
    ("gray_alpha.png", lambda: _save(Image.new("LA", (4, 4), (90, 10)), "PNG"), "ok", "", (4, 4, 3), "gray + alpha"),
    ("rgba.png", lambda: _save(Image.new("RGBA", (4, 3), (1, 2, 3, 0)), "PNG"), "ok", "", (3, 4, 3), "RGBA"),
    ("exif_rotated6.jpg", lambda: _exif_jpeg(6), "ok", "", (8, 4, 3), "8x4 stored, EXIF orientation 6"),
    ("exif_rotated8.jpg", lambda: _exif_jpeg(8), "ok", "", (8, 4, 3), "8x4 stored, EXIF orientation 8"),
    ("animated.gif", _animated_gif, "ok", "", (4, 6, 3), "3-frame GIF → first frame"),
    ("multipage.tif", _multipage_tiff, "ok", "", (4, 6, 3), "2 pages of different sizes → first page"),
    ("image.webp", lambda: _save(Image.fromarray(_noise(5, 9)), "WEBP", lossless=True), "ok", "", (5, 9, 3), "WebP"),
    ("image.bmp", lambda: _save(Image.fromarray(_noise(5, 9)), "BMP"), "ok", "", (5, 9, 3), "BMP"),
    ("png_named.jpg", lambda: _save(Image.fromarray(_noise(6, 2)), "PNG"), "ok", "", (6, 2, 3),
     "PNG content, .jpg name"),
    ("wide.png", lambda: _save(Image.new("RGB", (4000, 3), (5, 6, 7)), "PNG"), "ok", "", (3, 4000, 3), "4000x3"),
    ("tiny.png", lambda: _save(Image.new("RGB", (1, 1), (5, 6, 7)), "PNG"), "ok", "", (1, 1, 3), "1x1"),
    # broken
    ("missing.png", None, "error", "unreadable", None, "listed, then deleted"),
    ("random.jpg", lambda: np.random.default_rng(1).bytes(2048), "error", "not_an_image", None, "random bytes"),
    ("text.png", lambda: b"this is a note, not a picture\n" * 4, "error", "not_an_image", None, "text named .png"),
    ("empty.png", lambda: b"", "error", "not_an_image", None, "0 bytes"),
    ("truncated.jpg", lambda: _truncated(_save(Image.fromarray(_noise(128, 128)), "JPEG")), "error", "truncated", None,
     "JPEG cut in half"),
    ("truncated.png", lambda: _truncated(_save(Image.fromarray(_noise(64, 64)), "PNG")), "error", "truncated", None,
     "PNG cut in half"),
    ("truncated.webp", lambda: _truncated(_save(Image.fromarray(_noise(64, 64)), "WEBP")), "error", "truncated", None,
     "WebP cut in half"),
    ("header_only.png", lambda: _save(Image.new("RGB", (4, 4)), "PNG")[:40], "error", "truncated", None,
     "PNG cut inside its header"),
    ("corrupt.png", _corrupt_png, "error", "truncated", None, "PNG with overwritten compressed data"),
    ("bomb.png", lambda: png_bytes(30000, 30000, 8, 0, b"\x00" * 100), "error", "too_large", None,
     "header claims 30000x30000 (900 Mpx)"),
    ("bomb.jpg", lambda: _jpeg_with_size(60000, 60000), "error", "too_large", None, "JPEG header claims 60000x60000"),
    ("oversize.png", _oversize_png, "error", "too_large", None, "valid, but larger than max_bytes"),
    ("postscript.png", lambda: _EPS, "error", "unsupported", None, "EPS named .png (never handed to Ghostscript)"),
    ("heic.jpg", lambda: _HEIC, "error", "unsupported", None, "HEIF brand header, no decoder"),
]

#: Entry names in order, for parametrizing tests before the files exist.
CORPUS_NAMES = [entry[0] for entry in _ENTRIES]


def write_corpus(root: Path) -> list[CorpusFile]:
    """Write every corpus file under `root` (which must exist) and return the entries in order."""
    out = []
    for name, make, status, error_class, shape, why in _ENTRIES:
        path = root / name
        size = 0
        if make is not None:
            data = make()
            path.write_bytes(data)
            size = len(data)
        out.append(CorpusFile(name, str(path), size, status, error_class, shape, why))
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
    target.mkdir(parents=True, exist_ok=True)
    for f in write_corpus(target):
        outcome = f"ok {f.shape}" if f.status == "ok" else f.error_class
        print(f"{f.name:28} {f.size:>9}  {outcome:22} {f.why}")
