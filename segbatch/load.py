"""Load stage (CPU): fetch many objects at once, decode, orient, convert to RGB uint8.

Formats: PNG, JPEG, GIF, TIFF, WebP, BMP, AVIF and JPEG 2000, recognised by content, not by the file
name's extension (a PNG named `.jpg` decodes as PNG). Others are refused, PostScript/EPS on purpose
(decoding it would run Ghostscript on untrusted input), HEIF/JPEG XL because Pillow cannot read them.

Colour conversion follows PIL's `Image.convert("RGB")`, which users already know, with two modes
defined by us because PIL's result is useless for them:

* 16-bit and 32-bit integer gray (`I;16*`, `I`): scaled to 8 bits by the type's range
  (`v * 255 / 65535`, rounded; 32-bit values are clipped to 0..65535 first) instead of clipped at 255.
* float gray (`F`): values are taken as 0..1 if the image's largest finite value is ≤ 1, else as
  0..255; then clipped to 0..255 (NaN → 0, ±inf → 255 / 0).

Everything else is PIL's: gray → replicated, RGBA/LA → alpha dropped (not composited), palette →
looked up (transparency dropped), CMYK → PIL's naive inversion (`R = (255 - C) * (255 - K) / 255`,
likewise G, B; no ICC profile), 1-bit → 0/255, 16-bit RGB/RGBA PNG → the high byte of each sample
(`v >> 8`). EXIF orientation is applied first (an unreadable EXIF block is ignored: the pixels are kept
as stored); animated GIF / multi-page TIFF give their first frame.

Every failure is an :class:`~segbatch.errors.ItemError` whose message starts with the file's URI:

* `unreadable`: the object cannot be fetched (missing, permission denied, or a storage error that
  outlasted the retries of :mod:`segbatch.retry`; the message then says how many).
* `too_large`: the listed or fetched size exceeds `max_bytes` (checked before fetching, and the read
  stops at `max_bytes + 1`), or the header's width x height exceeds `max_pixels` (checked right after
  `Image.open`, which reads only the header, so a decompression bomb is never decoded).
* `not_an_image`: empty, or not a recognised image format.
* `truncated`: a recognised format whose header or data ends early or is corrupt.
* `unsupported`: an image format or colour mode that cannot be turned into RGB.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from segbatch.errors import ItemError
from segbatch.retry import Retries, call_with_retries
from segbatch.rows import RowStatus, object_array
from segbatch.spec import LoadSettings
from segbatch.storage import filesystem

__all__ = ["EMPTY_IMAGE", "Loader", "decode_image", "inspect_jpeg", "load_batch", "to_rgb"]

logger = logging.getLogger(__name__)

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)

#: Pillow formats `Image.open` may pick (by content). EPS is left out on purpose (Ghostscript).
_FORMATS = ("PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP", "AVIF", "JPEG2000")

#: EXIF orientation → the transpose that shows the image upright (as `ImageOps.exif_transpose`).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

#: PIL's own bomb guard is process-global; raising it for one decode is done under this lock.
_PIL_LIMIT_LOCK = threading.Lock()

# Message fragments of decoder errors that mean "cannot handle this", not "the data is damaged".
_UNSUPPORTED_HINTS = ("not supported", "unsupported", "unknown", "not implemented", "cannot handle")


def to_rgb(im: Image.Image) -> np.ndarray:
    """An HxWx3 uint8 array from any PIL mode (see the module docstring for the rules).

    Raises:
        ValueError: PIL cannot convert the mode to RGB.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        arr = np.clip(arr.astype(np.int64), 0, 65535)
        gray = np.round(arr * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size == 0 or finite.max() <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(arr * scale, nan=0.0), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the same colours as P → RGB, without PIL's transparency warning
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """Decode bytes to an oriented RGB array (first frame), refusing more than `max_pixels` pixels.

    The pixel count is read from the header by `Image.open` and checked before any pixel is decoded.

    Args:
        data: The file's bytes.
        uri: The file's URI, named in every error message.
        max_pixels: The most pixels (width x height) an image may have.

    Returns:
        An HxWx3 uint8 array, H and W after EXIF orientation.

    Raises:
        ItemError: `not_an_image`, `too_large`, `truncated` or `unsupported`, naming the file.

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO()
        >>> Image.new("L", (4, 2), 7).save(buf, "PNG")
        >>> decode_image(buf.getvalue(), "mem://a.png", max_pixels=100).shape
        (2, 4, 3)
    """
    with warnings.catch_warnings(), _pil_pixel_limit(max_pixels):
        # PIL warns about bombs (we check ourselves), palette transparency, odd EXIF: not the user's concern.
        warnings.simplefilter("ignore")
        im = _open(data, uri, max_pixels)
        try:
            im.seek(0)
            im.load()
        except MemoryError:
            raise ItemError("too_large", f"{uri}: not enough memory to decode {im.width}x{im.height} pixels") from None
        except Exception as e:  # noqa: BLE001 - a decoder failure is data, never a dead job
            raise _decode_error(uri, im.format, e) from None
        try:
            im = _orient(im, uri)
            return to_rgb(im)
        except MemoryError:
            raise ItemError("too_large", f"{uri}: not enough memory to convert {im.width}x{im.height} pixels") from None
        except Exception as e:  # noqa: BLE001
            raise ItemError("unsupported", f"{uri}: cannot convert colour mode {im.mode} to RGB: {e}") from None


def inspect_jpeg(data: bytes, uri: str, max_pixels: int) -> tuple[int, int, int] | None:
    """(height, width, EXIF orientation) of a JPEG the predict actor can decode itself, else None.

    For `compute.jpeg_decode: device`. Only colour (YCbCr) or gray JPEGs that end with an EOI marker
    qualify; anything else (other formats, CMYK, a file cut short) returns None and is decoded here,
    so it gets exactly the default path's result or error. Height and width are after orientation.

    Raises:
        ItemError: the same header and size errors :func:`decode_image` raises.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    with warnings.catch_warnings(), _pil_pixel_limit(max_pixels):
        warnings.simplefilter("ignore")
        im = _open(data, uri, max_pixels)
        if im.format != "JPEG" or im.mode not in ("RGB", "L") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return None
        try:
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # noqa: BLE001 - as _orient: unreadable EXIF means "as stored"
            orientation = 1
    orientation = orientation if isinstance(orientation, int) and orientation in _ORIENTATION else 1
    w, h = im.size
    return (w, h, orientation) if orientation in (5, 6, 7, 8) else (h, w, orientation)


def _open(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """`Image.open` (header only) plus the size checks; classify failures by what the bytes look like."""
    if not data:
        raise ItemError("not_an_image", f"{uri}: empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as e:
        # PIL's own guard (see _pil_pixel_limit) fired first: the header claims more than max_pixels
        message = f"{uri}: refused before decoding: exceeds input.max_pixels={max_pixels}: {e}"
        raise ItemError("too_large", message) from None
    except UnidentifiedImageError:
        raise _unidentified(data, uri) from None
    except Exception as e:  # noqa: BLE001 - e.g. a header cut short inside a recognised format
        raise _decode_error(uri, _sniff(data), e) from None
    w, h = im.size
    if w * h > max_pixels:
        raise ItemError(
            "too_large",
            f"{uri}: refused before decoding: {w}x{h} = {w * h} pixels exceeds input.max_pixels={max_pixels}",
        )
    if w <= 0 or h <= 0:
        raise ItemError("unsupported", f"{uri}: image has zero size {w}x{h}")
    return im


def _orient(im: Image.Image, uri: str) -> Image.Image:
    """Apply the EXIF orientation tag; an unreadable EXIF block leaves the image as stored."""
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as e:  # noqa: BLE001 - bad metadata must not lose good pixels
        logger.debug("%s: ignoring unreadable EXIF: %s", uri, e)
        return im
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return im if method is None else im.transpose(method)


def _decode_error(uri: str, fmt: str | None, e: BaseException) -> ItemError:
    """`unsupported` when the decoder says it cannot handle the file, else `truncated` (damaged data)."""
    text = f"{type(e).__name__}: {e}"
    what = f"{fmt} " if fmt else ""
    if any(hint in text.lower() for hint in _UNSUPPORTED_HINTS):
        return ItemError("unsupported", f"{uri}: cannot decode this {what}image: {text}")
    return ItemError("truncated", f"{uri}: {what}image data is truncated or corrupt: {text}")


def _unidentified(data: bytes, uri: str) -> ItemError:
    """Pillow recognised no format: say whether the bytes still look like a (damaged) image."""
    fmt = _sniff(data)
    if fmt is None:
        head = data[:8]
        return ItemError("not_an_image", f"{uri}: not a recognised image format ({len(data)} bytes, starting {head!r})")
    if fmt not in _FORMATS:
        return ItemError("unsupported", f"{uri}: {fmt} images are not supported")
    reason = "header could not be read"
    try:  # the format's own parser says why; Image.open hides it behind "cannot identify"
        Image.OPEN[fmt][0](io.BytesIO(data)).close()
    except Exception as e:  # noqa: BLE001
        reason = f"{type(e).__name__}: {e}"
    if fmt == "TIFF" and "unknown pixel mode" in reason:
        # The header was read: it describes samples Pillow has no mode for (not damage).
        layout = _tiff_layout(data)
        planar = layout is not None and layout.startswith("planar")
        fix = "a contiguous (chunky) 8- or 16-bit RGB TIFF" if planar else "an 8- or 16-bit RGB or grayscale TIFF"
        what = f"{layout}: unknown pixel mode" if layout else "unknown pixel mode"
        return ItemError("unsupported", f"{uri}: TIFF layout Pillow cannot decode ({what}); convert it to {fix}")
    if any(hint in reason.lower() for hint in _UNSUPPORTED_HINTS):
        # Read, but describing something Pillow has no decoder for: not damage either.
        return ItemError("unsupported", f"{uri}: cannot decode this {fmt} image: {reason}")
    return _decode_error(uri, fmt, _DamagedHeader(f"header is damaged or cut short ({reason})"))


_TIFF_SAMPLE_FORMATS = {1: "unsigned", 2: "signed", 3: "float"}
_TIFF_PHOTOMETRIC = {0: "gray", 1: "gray", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK", 6: "YCbCr", 8: "CIELab"}


def _tiff_layout(data: bytes) -> str | None:
    """A TIFF's first image as words ("planar configuration, 3 RGB samples of 32-bit float"), or None."""
    from PIL import TiffImagePlugin

    try:
        fp = io.BytesIO(data)
        ifd = TiffImagePlugin.ImageFileDirectory_v2(fp.read(8))
        fp.seek(ifd.next)
        ifd.load(fp)
        bits = tuple(ifd.get(258, (1,)))
        formats = tuple(ifd.get(339, (1,)))
        samples = int(ifd.get(277, len(bits)))
        photometric = _TIFF_PHOTOMETRIC.get(int(ifd.get(262, -1)), f"photometric {ifd.get(262)}")
        planar = int(ifd.get(284, 1)) == 2
        extra_samples = ifd.get(338, ())
        extra = len(extra_samples) if isinstance(extra_samples, tuple) else 1
    except Exception:  # noqa: BLE001 - only wording depends on it
        return None
    width = "/".join(str(b) for b in sorted(set(bits)))
    kind = _TIFF_SAMPLE_FORMATS.get(formats[0], f"sample format {formats[0]}") if formats else "unsigned"
    described = f"{samples} {photometric} samples of {width}-bit {kind}" + (f" ({extra} extra)" if extra else "")
    return f"planar configuration (separate planes), {described}" if planar else described


class _DamagedHeader(ValueError):
    """A recognised signature whose header Pillow cannot parse."""


def _sniff(data: bytes) -> str | None:
    """The image format the leading bytes claim (Pillow's format names), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in (12, 40, 52, 56, 64, 108, 124):  # DIB header size
        return "BMP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "HEIF"
    if data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    if data.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "EPS"
    if data.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    return None


@contextmanager
def _pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make PIL's own bomb guard allow `max_pixels` while one decode runs, then restore it.

    PIL refuses images above `2 * Image.MAX_IMAGE_PIXELS` by itself (`DecompressionBombError`, the
    default being 178,956,970 pixels). Our own check after `Image.open` is the one users configure; PIL's
    stays in place as a second guard (it also checks TIFF tiles and GIF frames) and is raised only when
    `max_pixels` exceeds it, under a lock, for the duration of the decode.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or max_pixels <= 2 * limit:
        yield
        return
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None if saved is None else max(saved, -(-max_pixels // 2))
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


class Loader:
    """Ray Data stage: a batch of work items → the same rows plus `image` (RGB uint8) or an error.

    Output columns added: `image` (HxWx3 uint8; empty for errors), `width`, `height`, `status`,
    `error_class`, `error`, `retries` (int32: retries spent fetching the item; later stages add theirs).
    With `jpeg_decode="device"` also `jpeg` (the file's bytes, for JPEGs :func:`inspect_jpeg` accepts,
    whose `image` is then left empty for the actor to decode; else b"") and `orientation` (EXIF).

    Args:
        settings: the job's load settings (:meth:`segbatch.spec.JobSpec.load_settings`); the spec's
            defaults when omitted.
    """

    def __init__(self, settings: LoadSettings | None = None) -> None:
        self.settings = settings = settings or LoadSettings()
        self.storage_options = settings.storage_options
        self.jpeg_decode = settings.jpeg_decode
        self.max_pixels = settings.max_pixels
        self.max_bytes = settings.max_bytes
        self.fetch_concurrency = settings.fetch_concurrency

    def _fetch(self, uris: list[str]) -> list[tuple[bytes | ItemError, int]]:
        """Each object's bytes or its error, with the retries spent; reads stop after `max_bytes + 1` bytes.

        The bound matters when the listed size is unknown (0 from a manifest) or stale. Transient
        faults are retried (:func:`segbatch.retry.call_with_retries`); an item becomes `unreadable` only
        once the retries are spent, or at once for a missing object or a denied read.
        """

        def one(uri: str) -> tuple[bytes | ItemError, int]:
            retries = Retries()
            try:
                fs, path = filesystem(uri, self.storage_options)
                data = call_with_retries(
                    lambda: fs.cat_file(path, start=0, end=self.max_bytes + 1), counter=retries, what=f"reading {uri}"
                )
                if len(data) > self.max_bytes:
                    return ItemError(
                        "too_large", f"{uri}: more than input.max_bytes={self.max_bytes} bytes; refused while fetching"
                    ), retries.count
                return bytes(data), retries.count
            except FileNotFoundError:
                return ItemError("unreadable", f"{uri}: object not found"), retries.count
            except PermissionError as e:
                return ItemError("unreadable", f"{uri}: permission denied: {e}"), retries.count
            except Exception as e:  # noqa: BLE001 - after the retries, a read error is data
                after = f" after {retries.count} retries" if retries.count else ""
                return ItemError("unreadable", f"{uri}: cannot read{after}: {type(e).__name__}: {e}"), retries.count

        if len(uris) <= 1:
            return [one(u) for u in uris]
        with ThreadPoolExecutor(max_workers=min(self.fetch_concurrency, len(uris))) as pool:
            return list(pool.map(one, uris))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        uris = [str(u) for u in batch["uri"]]
        sizes = [int(s) for s in batch["size"]]
        plan_errors = [str(e) if e else "" for e in batch["plan_error"]] if "plan_error" in batch else [""] * len(uris)
        to_fetch = [i for i, s in enumerate(sizes) if s <= self.max_bytes and not plan_errors[i]]
        fetched = dict(zip(to_fetch, self._fetch([uris[i] for i in to_fetch])))
        images, widths, heights = [], [], []
        rows = RowStatus.all_ok(len(uris))
        jpegs: list[bytes] = [b""] * len(uris)
        orientations = np.ones(len(uris), dtype=np.int8)
        retries = [fetched[i][1] if i in fetched else 0 for i in range(len(uris))]
        for i, uri in enumerate(uris):
            result: np.ndarray | ItemError
            if plan_errors[i]:
                result = ItemError("unsafe_key", plan_errors[i])
            elif i not in fetched:
                message = f"{uri}: {sizes[i]} bytes exceeds input.max_bytes={self.max_bytes}; refused before fetching"
                result = ItemError("too_large", message)
            else:
                got = fetched[i][0]
                if isinstance(got, ItemError):
                    result = got
                else:
                    try:
                        shape = inspect_jpeg(got, uri, self.max_pixels) if self.jpeg_decode == "device" else None
                        if shape is None:
                            result = decode_image(got, uri, self.max_pixels)
                        else:  # the actor decodes it on its device; an empty array of the final size
                            result = np.empty((shape[0], shape[1], 0), dtype=np.uint8)
                            jpegs[i], orientations[i] = got, shape[2]
                    except ItemError as e:
                        result = e
            if isinstance(result, ItemError):
                images.append(EMPTY_IMAGE)
                widths.append(0)
                heights.append(0)
                rows.fail(i, result.error_class, result.message)
            else:
                images.append(result if result.shape[2] else EMPTY_IMAGE)
                heights.append(result.shape[0])
                widths.append(result.shape[1])
        out = {k: v for k, v in batch.items()}
        out["image"] = object_array(images)
        out["width"] = np.asarray(widths, dtype=np.int32)
        out["height"] = np.asarray(heights, dtype=np.int32)
        rows.into(out)
        out["retries"] = np.asarray(retries, dtype=np.int32)
        if self.jpeg_decode == "device":
            out["jpeg"] = np.asarray(jpegs, dtype=object)
            out["orientation"] = orientations
        return out


def load_batch(batch: dict[str, np.ndarray], settings: LoadSettings) -> dict[str, Any]:
    """The load stage as a plain function for Ray Data tasks.

    It lives here, not in the pipeline module, so a load worker imports Pillow and fsspec but never
    torch: CPU task workers stay small and start fast.
    """
    return Loader(settings)(batch)
