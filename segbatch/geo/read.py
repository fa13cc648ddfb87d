"""Scene windows → RGB uint8: the scene load stage (CPU tasks). Reads by range requests, never whole.

A scene is opened with rasterio: local paths directly, remote URIs (`s3://`, `gs://`) through the
fsspec filesystem of :func:`segbatch.storage.filesystem` passed as rasterio's `opener`, so the same
`AWS_*` settings (`AWS_ENDPOINT_URL` included) apply as everywhere else. GDAL then reads only the
header and the internal blocks a window overlaps; s3fs fetches them in blocks of :data:`S3_BLOCK`
bytes (`blockcache`) instead of its 50 MiB read-ahead. `GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR` stops
GDAL probing for sidecar files on every open.

Bands and values (:class:`segbatch.spec.SceneSettings`):

* `bands`: 1-based indexes read as R, G, B, or one band read as gray (replicated to 3 channels).
  Default: bands 1, 2, 3, or band 1 of a 1- or 2-band scene.
* `scale`: `v' = round((v - min) * 255 / (max - min))`, clipped to 0..255, per band when lists are given;
  with `percentile: [low, high]` min and max are each scene's own percentiles (:func:`percentile_scale`,
  computed once while planning and carried in the plan's `scale_min` / `scale_max` columns).
  Default by dtype: uint8 as is; uint16 0..65535; int16 -32768..32767; float32 0..1.
* nodata: `input.nodata`, else the file's nodata value; a pixel is nodata when every band read holds
  it (NaN counts as nodata for float scenes). The mask travels with the window as `nodata` (HxW bool).

Every failure is an error row (:class:`~segbatch.errors.ItemError`), with the classes of image loads:
`unreadable` (missing, denied, storage failure), `not_an_image` (not a raster GDAL recognises),
`truncated` (a recognised TIFF whose header or blocks are damaged or cut short), `unsupported`
(a dtype other than uint8 / uint16 / int16 / float32, or a band index beyond the scene's count).
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from segbatch.errors import ItemError
from segbatch.geo.windows import Window
from segbatch.rows import RowStatus, object_array
from segbatch.spec import SceneSettings, ScaleSpec
from segbatch.storage import filesystem, protocol_of

try:
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
    from rasterio.windows import Window as RioWindow
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError("scenes (a job with `tiling`) need rasterio: pip install 'segbatch[geo]'") from e

__all__ = ["S3_BLOCK", "SUPPORTED_DTYPES", "SceneHeader", "WindowLoader", "open_scene", "read_header", "read_window", "load_windows"]

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "float32")
#: s3fs block size for scene reads (blockcache): about one 512² block of a compressed COG per request.
S3_BLOCK = 2 * 1024 * 1024
_GDAL_ENV = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_CACHEMAX": 64}
_DEFAULT_RANGE = {"uint8": (0.0, 255.0), "uint16": (0.0, 65535.0), "int16": (-32768.0, 32767.0), "float32": (0.0, 1.0)}


@dataclass(frozen=True, slots=True)
class SceneHeader:
    """What planning and assembly need of a scene: size, bands, georeferencing, blocks."""

    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]
    block: tuple[int, int] | None  # (height, width) of internal tiles, None when striped

    @property
    def georeferenced(self) -> bool:
        return self.crs_wkt is not None


@contextmanager
def open_scene(uri: str, storage_options: dict[str, Any] | None, assets: tuple[str, ...] | None = None) -> Iterator[Any]:
    """A rasterio dataset for `uri`, read by ranges (see the module docstring); for a scene stacked from
    several STAC assets (`<json>#<item id>`, `assets` their keys), a :class:`~segbatch.geo.stack.BandStack`.

    Raises:
        ItemError: `unreadable`, `not_an_image` or `truncated`, naming the URI.
    """
    from segbatch.geo.stac import asset_hrefs, is_stacked

    if is_stacked(uri):
        from segbatch.geo.stack import BandStack

        keys_hrefs = asset_hrefs(uri, storage_options, assets or ())
        with ExitStack() as opened:
            datasets = [opened.enter_context(_open_file(href, storage_options)) for _, href in keys_hrefs]
            yield BandStack(uri, [k for k, _ in keys_hrefs], datasets)
        return
    with _open_file(uri, storage_options) as ds:
        yield ds


@contextmanager
def _open_file(uri: str, storage_options: dict[str, Any] | None) -> Iterator[Any]:
    with rasterio.Env(**_GDAL_ENV), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            if protocol_of(uri) == "file":
                path = uri.split("://", 1)[-1]
                ds = rasterio.open(path)
            else:
                options = dict(storage_options or {})
                if protocol_of(uri) in ("s3", "s3a"):
                    options.setdefault("default_block_size", S3_BLOCK)
                    options.setdefault("default_cache_type", "blockcache")
                fs, path = filesystem(uri, options)
                if not fs.exists(path):
                    raise FileNotFoundError(path)
                ds = rasterio.open(path, opener=fs)
        except FileNotFoundError:
            raise ItemError("unreadable", f"{uri}: object not found") from None
        except PermissionError as e:
            raise ItemError("unreadable", f"{uri}: permission denied: {e}") from None
        except RasterioIOError as e:
            raise _classify(uri, e) from None
        except Exception as e:  # noqa: BLE001 - an unopenable scene is data
            raise ItemError("unreadable", f"{uri}: cannot open: {type(e).__name__}: {e}") from None
        try:
            yield ds
        finally:
            ds.close()


def _classify(uri: str, e: Exception) -> ItemError:
    text = str(e)
    low = text.lower()
    if "not recognized" in low or "not a supported file format" in low:
        return ItemError("not_an_image", f"{uri}: not a raster format GDAL recognises: {text}")
    if "no such file" in low or "does not exist" in low:
        return ItemError("unreadable", f"{uri}: object not found: {text}")
    return ItemError("truncated", f"{uri}: raster data is truncated or corrupt: {text}")


def header_of(ds: Any) -> SceneHeader:
    """The :class:`SceneHeader` of an open dataset."""
    bh, bw = ds.block_shapes[0]
    tiled = bool(ds.profile.get("tiled")) and bw < ds.width
    return SceneHeader(
        width=int(ds.width),
        height=int(ds.height),
        count=int(ds.count),
        dtype=str(ds.dtypes[0]),
        nodata=None if ds.nodata is None else float(ds.nodata),
        crs_wkt=ds.crs.to_wkt() if ds.crs else None,
        transform=tuple(ds.transform)[:6],  # type: ignore[arg-type]
        block=(int(bh), int(bw)) if tiled else None,
    )


def check_header(uri: str, header: SceneHeader, bands: tuple[int, ...] | None) -> None:
    """Refuse scenes this stage cannot read as asked.

    Raises:
        ItemError: `unsupported` for a dtype outside :data:`SUPPORTED_DTYPES` or a band beyond the count.
    """
    if header.dtype not in SUPPORTED_DTYPES:
        raise ItemError("unsupported", f"{uri}: band dtype {header.dtype} is not supported (expected one of {', '.join(SUPPORTED_DTYPES)})")
    wanted = band_indexes(header.count, bands)
    if max(wanted) > header.count:
        raise ItemError("unsupported", f"{uri}: input.bands {list(wanted)} expected a scene with at least {max(wanted)} bands, but it has {header.count}")


def read_header(
    uri: str, storage_options: dict[str, Any] | None, bands: tuple[int, ...] | None = None, assets: tuple[str, ...] | None = None
) -> SceneHeader:
    """Open a scene, read its header only and check it can be read as asked (:func:`check_header`)."""
    with open_scene(uri, storage_options, assets) as ds:
        header = header_of(ds)
    check_header(uri, header, bands)
    return header


def band_indexes(count: int, bands: tuple[int, ...] | None) -> tuple[int, ...]:
    """The 1-based bands read: `bands`, else 1, 2, 3 (or 1 for a 1- or 2-band scene)."""
    if bands:
        return tuple(bands)
    return (1, 2, 3) if count >= 3 else (1,)


def _range(scale: ScaleSpec | None, dtype: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    if scale is None:
        lo, hi = _DEFAULT_RANGE[dtype]
        return np.full(n, lo), np.full(n, hi)
    if scale.min is None or scale.max is None:
        raise ItemError("unsupported", "input.scale.percentile needs the scene's own stats (planned with the scene)")
    lo_v = scale.min if isinstance(scale.min, tuple) else (scale.min,)
    hi_v = scale.max if isinstance(scale.max, tuple) else (scale.max,)  # type: ignore[assignment]
    lo_a = np.array(lo_v * n if len(lo_v) == 1 else lo_v, dtype=np.float64)
    hi_a = np.array(hi_v * n if len(hi_v) == 1 else hi_v, dtype=np.float64)
    if lo_a.size != n or hi_a.size != n:
        raise ItemError("unsupported", f"input.scale names {max(lo_a.size, hi_a.size)} bands, but {n} are read")
    return lo_a, hi_a


def to_uint8(data: np.ndarray, dtype: str, scale: ScaleSpec | None) -> np.ndarray:
    """(bands, H, W) values → (H, W, 3) uint8 by the scaling rule of the module docstring.

    Example:
        >>> to_uint8(np.array([[[0, 1500, 3000]]], dtype=np.uint16), "uint16", ScaleSpec(min=0, max=3000))[0, :, 0]
        array([  0, 128, 255], dtype=uint8)
    """
    n = data.shape[0]
    if dtype == "uint8" and scale is None:
        out = data
    else:
        lo, hi = _range(scale, dtype, n)
        x = data.astype(np.float32)
        x -= lo.astype(np.float32)[:, None, None]
        x *= (255.0 / (hi - lo)).astype(np.float32)[:, None, None]
        np.nan_to_num(x, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    hwc = np.moveaxis(out, 0, -1)
    if n == 1:
        hwc = np.repeat(hwc, 3, axis=2)
    return np.ascontiguousarray(hwc)


def read_window(
    ds: Any, window: Window, settings: SceneSettings, uri: str = "", scale: ScaleSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One window of an open scene → (HxWx3 uint8, HxW bool nodata mask; (0, 0) when there is none).

    `scale` (the scene's own, from :func:`percentile_scale`) takes the place of `settings.scale`.
    """
    header = header_of(ds)
    check_header(uri or ds.name, header, settings.bands)
    bands = band_indexes(header.count, settings.bands)
    try:
        data = ds.read(list(bands), window=RioWindow(window.col_off, window.row_off, window.width, window.height))
    except RasterioIOError as e:
        raise ItemError("truncated", f"{uri}: raster data is truncated or corrupt in window {window}: {e}") from None
    nodata = settings.nodata if settings.nodata is not None else header.nodata
    mask = np.zeros((0, 0), dtype=bool)
    if nodata is not None or data.dtype.kind == "f":
        flags = np.zeros(data.shape, dtype=bool)
        if nodata is not None and not np.isnan(nodata):
            flags |= data == nodata
        if data.dtype.kind == "f":
            flags |= np.isnan(data)
        mask = flags.all(axis=0)
    return to_uint8(data, header.dtype, scale or settings.scale), mask


#: Windows sampled for percentile stats when a scene has no overview.
STATS_WINDOWS = 16


def percentile_scale(ds: Any, settings: SceneSettings) -> ScaleSpec:
    """A scene's own min/max per band read from `settings.scale.percentile` (see ScaleSpec for the source).

    Reads the smallest overview whose longest side is at least 512 px (a decimated read GDAL serves from
    that overview), else :data:`STATS_WINDOWS` evenly spaced 256² windows: never the whole scene.
    """
    if settings.scale is None or settings.scale.percentile is None:
        raise ValueError("percentile_scale needs input.scale.percentile")
    header = header_of(ds)
    bands = list(band_indexes(header.count, settings.bands))
    factors = [f for f in ds.overviews(bands[0]) if max(header.width, header.height) // f >= 512]
    if factors:
        f = max(factors)
        shape = (len(bands), max(1, header.height // f), max(1, header.width // f))
        samples = [ds.read(bands, out_shape=shape)]
    else:
        side = 256
        k = int(np.ceil(np.sqrt(STATS_WINDOWS)))
        xs = np.linspace(0, max(0, header.width - side), k).astype(int)
        ys = np.linspace(0, max(0, header.height - side), k).astype(int)
        samples = [
            ds.read(bands, window=RioWindow(int(x), int(y), min(side, header.width), min(side, header.height)))
            for y in ys for x in xs
        ]
    values = np.concatenate([s.reshape(len(bands), -1) for s in samples], axis=1).astype(np.float64)
    nodata = settings.nodata if settings.nodata is not None else header.nodata
    valid = np.isfinite(values).all(axis=0)
    if nodata is not None:
        valid &= ~(values == nodata).all(axis=0)
    lo_p, hi_p = settings.scale.percentile
    picked = values[:, valid] if valid.any() else values
    lo = np.percentile(picked, lo_p, axis=1)
    hi = np.percentile(picked, hi_p, axis=1)
    hi = np.where(hi > lo, hi, lo + 1)
    return ScaleSpec(min=tuple(float(v) for v in lo), max=tuple(float(v) for v in hi))


class WindowLoader:
    """Ray Data stage: window work items → the same rows plus `image` (RGB uint8), `nodata`, or an error.

    Rows of one scene in a batch share one open dataset. Output columns as :class:`segbatch.load.Loader`
    (`image`, `width`, `height`, status columns, `retries`) plus `nodata` (HxW bool, or (0, 0)).
    """

    def __init__(self, settings: SceneSettings) -> None:
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["item_id"])
        rows = RowStatus.all_ok(n)
        images: list[np.ndarray] = [np.zeros((0, 0, 3), np.uint8)] * n
        masks: list[np.ndarray] = [np.zeros((0, 0), bool)] * n
        by_scene: dict[str, list[int]] = defaultdict(list)
        for i in range(n):
            if str(batch["plan_error"][i]):
                rows.fail(i, str(batch["plan_error_class"][i]) or "unsafe_key", str(batch["plan_error"][i]))
            else:
                by_scene[str(batch["uri"][i])].append(i)
        for uri, idxs in by_scene.items():
            try:
                with open_scene(uri, self.settings.storage_options, self.settings.assets) as ds:
                    for i in idxs:
                        w = Window(int(batch["col_off"][i]), int(batch["row_off"][i]), int(batch["win_width"][i]), int(batch["win_height"][i]))
                        scale = None
                        if "scale_min" in batch and len(batch["scale_min"][i]):
                            scale = ScaleSpec(min=tuple(batch["scale_min"][i]), max=tuple(batch["scale_max"][i]))
                        try:
                            images[i], masks[i] = read_window(ds, w, self.settings, uri, scale)
                        except ItemError as e:
                            rows.fail(i, e.error_class, e.message)
            except ItemError as e:
                for i in idxs:
                    rows.fail(i, e.error_class, e.message)
        out = dict(batch)
        out["image"] = object_array(images)
        out["nodata"] = object_array(masks)
        out["width"] = np.asarray([im.shape[1] for im in images], dtype=np.int32)
        out["height"] = np.asarray([im.shape[0] for im in images], dtype=np.int32)
        rows.into(out)
        out["retries"] = np.zeros(n, dtype=np.int32)
        return out


def load_windows(batch: dict[str, np.ndarray], settings: SceneSettings) -> dict[str, Any]:
    """The scene load stage as a plain function for Ray Data tasks (never imports torch)."""
    return WindowLoader(settings)(batch)
