"""A scene's label COG from its window parts (driver, after the stream).

Two steps, neither holding the raster in memory:

1. Each part (a window's core, :mod:`segbatch.geo.stitch`) is copied into place in a tiled GeoTIFF in a
   local temporary folder, with the input's CRS, transform and size; memory: one part plus GDAL's block
   cache (:data:`GDAL_CACHEMAX`, MiB).
2. rio-cogeo's `cog_translate(..., in_memory=False)` turns it into a Cloud-Optimized GeoTIFF: internal
   512² tiles, DEFLATE, overviews by `nearest` (labels must stay labels), built through a temporary
   file on disk rather than in memory. (GDAL's `COG` driver with rio-cogeo's in-memory default buffers
   the whole raster: ~1.5 GiB for a 1 GiB label raster.)

The result carries `nodata` = :data:`segbatch.geo.stitch.NODATA_LABEL` (255; 65535 for uint16 labels),
no class uses it, and the class names as the dataset tag `segbatch_classes` (a JSON list, index = label).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window as RioWindow

from segbatch.geo.read import SceneHeader
from segbatch.geo.stitch import nodata_label, part_uri
from segbatch.geo.windows import core_of, grid
from segbatch.masks import decode_png_label_map
from segbatch.retry import call_with_retries
from segbatch.storage import filesystem

__all__ = ["GDAL_CACHEMAX", "assemble_labels", "label_dtype", "label_profile", "to_cog"]

#: GDAL block cache (MiB) while assembling and converting: bounds the driver's memory.
GDAL_CACHEMAX = 128
_BLOCK = 512


def label_dtype(num_classes: int) -> str:
    """uint8 while the classes leave 255 free for nodata, else uint16."""
    return "uint8" if num_classes <= 255 else "uint16"


def label_profile(header: SceneHeader, dtype: str, nodata: int | None) -> dict[str, Any]:
    """The tiled GeoTIFF profile of a one-band raster over the scene (its CRS, transform and size)."""
    return {
        "driver": "GTiff",
        "width": header.width,
        "height": header.height,
        "count": 1,
        "dtype": dtype,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": _BLOCK,
        "blockysize": _BLOCK,
        "compress": "deflate",
        "crs": CRS.from_wkt(header.crs_wkt) if header.crs_wkt else None,
        "transform": Affine(*header.transform),
    }


def assemble_labels(
    header: SceneHeader,
    output_uri: str,
    storage_options: dict[str, Any] | None,
    rel_key: str,
    size: int,
    overlap: int,
    dtype: str,
    path: Path,
) -> None:
    """Copy every window's core part into a tiled GeoTIFF at `path` (see the module docstring)."""
    fs, _ = filesystem(output_uri, storage_options)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHEMAX), rasterio.open(path, "w", **label_profile(header, dtype, nodata_label(dtype))) as dst:
        for w in grid(header.width, header.height, size, overlap, header.block):
            core = core_of(w, header.width, header.height, overlap)
            uri = part_uri(output_uri, rel_key, w)
            _, p = filesystem(uri, storage_options)
            data = call_with_retries(lambda: fs.cat_file(p), what=f"reading {uri}")  # noqa: B023
            labels = decode_png_label_map(bytes(data)).astype(dtype, copy=False)
            if labels.shape != (core.height, core.width):
                raise ValueError(f"part {uri} expected shape {(core.height, core.width)}, but got {labels.shape}")
            dst.write(labels[None], window=RioWindow(core.col_off, core.row_off, core.width, core.height))


def to_cog(src: Path, dst: Path, classes: list[str] | None) -> None:
    """Convert a tiled label GeoTIFF into a COG (nearest overviews, through disk, not memory)."""
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    profile = cog_profiles.get("deflate")
    profile.update(blockxsize=_BLOCK, blockysize=_BLOCK)
    with rasterio.open(src) as ds:
        nodata, side = ds.nodata, max(ds.width, ds.height)
    levels = 1  # internal overviews always: halve until the longest side fits one 256-px tile
    while side >> (levels + 1) > 256:
        levels += 1
    cog_translate(
        str(src),
        str(dst),
        profile,
        nodata=nodata,
        overview_resampling="nearest",
        overview_level=levels,
        in_memory=False,
        quiet=True,
        config={"GDAL_CACHEMAX": GDAL_CACHEMAX, "GDAL_TIFF_OVR_BLOCKSIZE": str(_BLOCK)},
        additional_cog_metadata={"segbatch_classes": json.dumps(classes or [])},
    )


def put_file(local: Path, uri: str, storage_options: dict[str, Any] | None) -> None:
    """Upload (or move, locally) a finished file to its output URI, whole."""
    fs, path = filesystem(uri, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(local, "rb") as f, open(tmp, "wb") as g:
            while chunk := f.read(8 << 20):
                g.write(chunk)
        os.replace(tmp, path)
    else:
        call_with_retries(lambda: fs.put_file(str(local), path), what=f"writing {uri}")


