"""Label raster → one polygon per connected region of a class, polygonized by windows (driver).

The raster is read in windows of `polygon_window` pixels; each window is polygonized on its own
(`rasterio.features.shapes`, 4-connected, nodata left out), in pixel coordinates. A piece whose pixel
bounds reach an inner window edge may continue in the neighbour: such seam pieces are merged per class
(shapely `unary_union` of the class's seam pieces, then split into its polygons); all other pieces are
whole regions already. Pieces of one region share whole pixel edges across a seam, so the union
joins them exactly, and regions that only touch at a corner stay apart, as in one whole-raster
`shapes` call. Finally pixel coordinates go through the scene's transform into its CRS.

Memory: one window's labels and pieces, GDAL's block cache (bounded to :data:`GDAL_CACHEMAX` MiB: its
default, 5% of RAM, kept every block of the raster read: 509 MB PSS polygonizing a 20,000² raster,
against 120 MB bounded), plus the seam pieces and the finished polygons.

GeoParquet 1.1 via geopandas (`geometry_encoding="WKB"`, `write_covering_bbox=True`): WKB geometry, `geo`
metadata with the CRS as PROJJSON, `geometry_types`, and a `bbox` covering column; DuckDB reads it
without extensions.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.features import shapes
from rasterio.windows import Window as RioWindow

try:
    import shapely
    import shapely.affinity
    from shapely.geometry import shape
except ImportError as e:  # pragma: no cover
    raise ImportError("scene polygons need shapely and geopandas: pip install 'segbatch[geo]'") from e

__all__ = ["GDAL_CACHEMAX", "polygonize", "write_geoparquet"]

#: GDAL block cache (MiB) while polygonizing.
GDAL_CACHEMAX = 64


def _windows(width: int, height: int, side: int) -> list[tuple[int, int, int, int]]:
    return [(x, y, min(side, width - x), min(side, height - y)) for y in range(0, height, side) for x in range(0, width, side)]


def polygonize(path: Path, window: int = 2048, skip: tuple[int, ...] = (0,)) -> tuple[list[int], list[Any], Any, Any]:
    """Polygons of every class region of a label raster, by windows, seam pieces merged.

    Labels in `skip` (default: 0, the background) and nodata make no polygons.

    Returns:
        (labels, shapely polygons in the raster's CRS, the CRS, the nodata value).
    """
    labels: list[int] = []
    polys: list[Any] = []
    seam: dict[int, list[Any]] = defaultdict(list)
    # GDAL's block cache defaults to 5% of RAM and would keep every block read: bound it
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHEMAX), rasterio.open(path) as ds:
        width, height, nodata, crs, transform = ds.width, ds.height, ds.nodata, ds.crs, ds.transform
        for x, y, w, h in _windows(width, height, window):
            data = ds.read(1, window=RioWindow(x, y, w, h))
            valid = np.ones(data.shape, dtype=bool) if nodata is None else data != nodata
            for value in skip:
                valid &= data != value
            offset = rasterio.Affine.translation(x, y)
            for geom, value in shapes(data, mask=valid, connectivity=4, transform=offset):
                poly = shape(geom)
                x0, y0, x1, y1 = poly.bounds
                touches = (x0 <= x and x > 0) or (y0 <= y and y > 0) or (x1 >= x + w and x + w < width) or (
                    y1 >= y + h and y + h < height
                )
                if touches:
                    seam[int(value)].append(poly)
                else:
                    labels.append(int(value))
                    polys.append(poly)
    for value, pieces in sorted(seam.items()):
        merged = shapely.unary_union(pieces)
        for part in getattr(merged, "geoms", [merged]):
            labels.append(value)
            polys.append(part)
    a = transform
    matrix = [a.a, a.b, a.d, a.e, a.c, a.f]
    world = [shapely.affinity.affine_transform(p, matrix) for p in polys]
    return labels, world, crs, nodata


def write_geoparquet(
    path: Path,
    labels: list[int],
    polygons: list[Any],
    crs: Any,
    classes: list[str],
    rel_key: str,
    uri: str,
    scores: list[float] | None = None,
    instance_ids: bool = False,
) -> int:
    """Write the polygons as GeoParquet 1.1 (`label`, `class_name`, [`score`], [`instance_id`: 1-based row
    number, the pixel value of the object in the instance-id COG], `rel_key`, `uri`, `geometry`, `bbox`);
    returns rows."""
    import geopandas as gpd

    names = [classes[v] if 0 <= v < len(classes) else str(v) for v in labels]
    frame = gpd.GeoDataFrame(
        {
            "label": np.asarray(labels, dtype=np.int32),
            "class_name": names,
            **({"score": np.asarray(scores, dtype=np.float32)} if scores is not None else {}),
            **({"instance_id": np.arange(1, len(labels) + 1, dtype=np.int32)} if instance_ids else {}),
            "rel_key": [rel_key] * len(labels),
            "uri": [uri] * len(labels),
        },
        geometry=gpd.GeoSeries(polygons, crs=crs.to_wkt() if crs else None),
    )
    frame.to_parquet(path, geometry_encoding="WKB", write_covering_bbox=True, index=False)
    return len(frame)
