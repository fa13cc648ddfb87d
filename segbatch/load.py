"""Load stage (CPU): fetch many objects at once, decode, orient, convert to RGB uint8.

Colour conversion follows PIL's `Image.convert("RGB")`, which users already know, with two modes
defined by us because PIL's result is useless for them:

* 16-bit and 32-bit integer gray (`I;16*`, `I`): scaled to 8 bits by the type's range
  (`v * 255 / 65535`, rounded; 32-bit values are clipped to 0..65535 first) instead of clipped at 255.
* float gray (`F`): values are taken as 0..1 if the image's maximum is ≤ 1, else as 0..255; clipped.

Everything else is PIL's: gray → replicated, RGBA/LA → alpha dropped (not composited), palette →
looked up (transparency dropped), CMYK → PIL's naive inversion, 1-bit → 0/255. EXIF orientation is
applied first; animated GIF / multi-page TIFF give their first frame.
"""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segbatch.errors import ItemError
from segbatch.storage import filesystem

__all__ = ["Loader", "decode_image", "to_rgb"]

EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)


def to_rgb(im: Image.Image) -> np.ndarray:
    """An HxWx3 uint8 array from any PIL mode (see the module docstring for the rules)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        arr = np.clip(arr.astype(np.int64), 0, 65535)
        gray = np.round(arr * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """Decode bytes to an oriented RGB array.

    Raises:
        ItemError: `not_an_image`, `too_large`, `truncated` or `unsupported`, naming the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise ItemError("too_large", f"{uri}: {w}x{h} = {w * h} pixels exceeds input.max_pixels={max_pixels}")
            if w == 0 or h == 0:
                raise ItemError("unsupported", f"{uri}: image has zero size {w}x{h}")
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ItemError:
        raise
    except Image.DecompressionBombError as e:
        raise ItemError("too_large", f"{uri}: {e}") from None
    except UnidentifiedImageError:
        raise ItemError("not_an_image", f"{uri}: not a recognised image format ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e)
        if "truncated" in text.lower() or "broken data stream" in text or isinstance(e, EOFError) or "premature end" in text.lower():
            raise ItemError("truncated", f"{uri}: image data is truncated or corrupt: {text}") from None
        raise ItemError("unsupported", f"{uri}: cannot decode: {type(e).__name__}: {text}") from None
    except Exception as e:  # noqa: BLE001 - any decoder bug becomes data, never a dead job
        raise ItemError("unsupported", f"{uri}: cannot decode: {type(e).__name__}: {e}") from None


class Loader:
    """Ray Data stage: a batch of work items → the same rows plus `image` (RGB uint8) or an error.

    Output columns added: `image` (HxWx3 uint8; empty for errors), `width`, `height`, `status`,
    `error_class`, `error`.
    """

    def __init__(
        self,
        storage_options: dict[str, Any] | None = None,
        max_pixels: int = 178_956_970,
        max_bytes: int = 512 * 1024 * 1024,
        fetch_concurrency: int = 16,
    ) -> None:
        self.storage_options = storage_options or {}
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.fetch_concurrency = fetch_concurrency

    def _fetch(self, uris: list[str]) -> list[bytes | ItemError]:
        def one(uri: str) -> bytes | ItemError:
            try:
                fs, path = filesystem(uri, self.storage_options)
                return fs.cat_file(path)
            except FileNotFoundError:
                return ItemError("unreadable", f"{uri}: object not found")
            except PermissionError as e:
                return ItemError("unreadable", f"{uri}: permission denied: {e}")
            except Exception as e:  # noqa: BLE001 - after the filesystem's own retries, a read error is data
                return ItemError("unreadable", f"{uri}: cannot read: {type(e).__name__}: {e}")

        if len(uris) <= 1:
            return [one(u) for u in uris]
        with ThreadPoolExecutor(max_workers=min(self.fetch_concurrency, len(uris))) as pool:
            return list(pool.map(one, uris))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        uris = [str(u) for u in batch["uri"]]
        sizes = [int(s) for s in batch["size"]]
        plan_errors = [str(e) for e in batch["plan_error"]] if "plan_error" in batch else [""] * len(uris)
        to_fetch = [i for i, s in enumerate(sizes) if s <= self.max_bytes and not plan_errors[i]]
        fetched: dict[int, bytes | ItemError] = dict(zip(to_fetch, self._fetch([uris[i] for i in to_fetch])))
        images, widths, heights, status, classes, errors = [], [], [], [], [], []
        for i, uri in enumerate(uris):
            result: np.ndarray | ItemError
            if plan_errors[i]:
                result = ItemError("unsafe_key", plan_errors[i])
            elif i not in fetched:
                result = ItemError("too_large", f"{uri}: {sizes[i]} bytes exceeds input.max_bytes={self.max_bytes}")
            else:
                got = fetched[i]
                if isinstance(got, ItemError):
                    result = got
                else:
                    try:
                        result = decode_image(got, uri, self.max_pixels)
                    except ItemError as e:
                        result = e
            if isinstance(result, ItemError):
                images.append(EMPTY_IMAGE)
                widths.append(0)
                heights.append(0)
                status.append("error")
                classes.append(result.error_class)
                errors.append(result.message)
            else:
                images.append(result)
                heights.append(result.shape[0])
                widths.append(result.shape[1])
                status.append("ok")
                classes.append("")
                errors.append("")
        out = {k: v for k, v in batch.items()}
        out["image"] = _object_array(images)
        out["width"] = np.asarray(widths, dtype=np.int32)
        out["height"] = np.asarray(heights, dtype=np.int32)
        out["status"] = np.asarray(status, dtype=object)
        out["error_class"] = np.asarray(classes, dtype=object)
        out["error"] = np.asarray(errors, dtype=object)
        return out


def _object_array(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of arrays (keeps ragged shapes; numpy would try to stack equal ones)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out
