"""Instance scenes: objects owned by one window, the few cut by a window edge merged across seams.

Ownership: a window keeps the objects whose box centre lies in its core (:func:`owned`): an object that
lies whole in the overlap of two windows is detected by both and kept by exactly one. An object larger
than the overlap is cut by the edge of every window that sees it; each window keeps the piece whose
centre falls in its core, so one object can leave pieces in neighbouring windows. Those pieces touch
an inner window edge (`cut`) and overlap each other in the overlap strip; after the stream, cut pieces
of one class whose intersection covers at least :data:`MERGE_IOS` of the smaller piece (IoS) are
merged (union-find over an STRtree's candidates), keeping the highest score. Everything else is one
object already.

With `output.instance_png`, the scene's objects are also burnt into an instance-id raster
(:func:`write_instance_raster`): object k of the scene's GeoParquet rows (its `instance_id` column,
1-based, in row order) has pixel value k, background 0; uint16 (uint32 above 65,535 objects). Where
objects overlap, the higher score wins, as in an image job's instance PNG. It is written by windows
of `polygon_window` pixels (an STRtree finds each window's objects), so memory is one window plus the
polygons, and then converted to a COG like the label raster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from segbatch.geo.windows import Window, core_of

__all__ = ["MERGE_IOS", "owned", "scene_objects", "write_instance_raster"]

#: Intersection over the smaller piece at which two cut pieces are one object.
MERGE_IOS = 0.5


def owned(instances: list[dict[str, Any]], window: Window, width: int, height: int, overlap: int) -> list[dict[str, Any]]:
    """The window's instances whose box centre lies in its core, each with `cut` (touches an inner window edge).

    `bbox` is [x, y, w, h] in window pixels (the predictor's convention).
    """
    core = core_of(window, width, height, overlap)
    out = []
    for inst in instances:
        x, y, w, h = inst["bbox"]
        cx, cy = window.col_off + x + w / 2, window.row_off + y + h / 2
        if not (core.col_off <= cx < core.col_off + core.width and core.row_off <= cy < core.row_off + core.height):
            continue
        cut = (x <= 0.5 and window.col_off > 0) or (y <= 0.5 and window.row_off > 0) or (
            x + w >= window.width - 0.5 and window.col_off + window.width < width
        ) or (y + h >= window.height - 0.5 and window.row_off + window.height < height)
        out.append({**inst, "cut": bool(cut)})
    return out


def _polygon(rle: str, window: dict[str, int]) -> Any:
    import shapely
    from rasterio.features import shapes
    from rasterio.transform import Affine
    from shapely.geometry import shape

    from segbatch.masks import rle_to_mask

    mask = rle_to_mask(rle, window["height"], window["width"])
    offset = Affine.translation(window["col_off"], window["row_off"])
    pieces = [shape(g) for g, _ in shapes(mask.astype(np.uint8), mask=mask, connectivity=4, transform=offset)]
    return shapely.unary_union(pieces)


def scene_objects(parts: list[bytes]) -> tuple[list[int], list[float], list[Any]]:
    """Window parts (JSON: window + owned instances) → (labels, scores, polygons in scene pixels), seams merged."""
    import shapely

    labels: list[int] = []
    scores: list[float] = []
    polys: list[Any] = []
    cut: list[bool] = []
    windows: list[int] = []
    for k, data in enumerate(parts):
        part = json.loads(data)
        for inst in part["instances"]:
            labels.append(int(inst["label"]))
            scores.append(float(inst["score"]))
            polys.append(_polygon(inst["rle"], part["window"]))
            cut.append(bool(inst["cut"]))
            windows.append(k)
    parent = list(range(len(polys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    idx = [i for i in range(len(polys)) if cut[i]]
    if idx:
        tree = shapely.STRtree([polys[i] for i in idx])
        for a_pos, a in enumerate(idx):
            for b_pos in tree.query(polys[a]):
                b = idx[int(b_pos)]
                if b <= a or windows[a] == windows[b] or labels[a] != labels[b]:
                    continue
                inter = polys[a].intersection(polys[b]).area
                smaller = min(polys[a].area, polys[b].area)
                if smaller > 0 and inter / smaller >= MERGE_IOS:
                    parent[find(b)] = find(a)
    groups: dict[int, list[int]] = {}
    for i in range(len(polys)):
        groups.setdefault(find(i), []).append(i)
    out_l, out_s, out_p = [], [], []
    for members in groups.values():
        out_l.append(labels[members[0]])
        out_s.append(max(scores[i] for i in members))
        out_p.append(shapely.unary_union([polys[i] for i in members]) if len(members) > 1 else polys[members[0]])
    return out_l, out_s, out_p


def write_instance_raster(header: Any, polygons: list[Any], scores: list[float], path: Path, window: int = 2048) -> str:
    """Burn `polygons` (scene pixel coordinates) into a tiled instance-id GeoTIFF at `path`: polygon k
    has id k + 1, background 0, the higher score on top where objects overlap; returns the dtype."""
    import rasterio
    import shapely
    from rasterio.features import rasterize
    from rasterio.transform import Affine
    from rasterio.windows import Window as RioWindow

    from segbatch.geo.cog import GDAL_CACHEMAX, label_profile

    dtype = "uint16" if len(polygons) <= np.iinfo(np.uint16).max else "uint32"
    tree = shapely.STRtree(polygons)
    profile = label_profile(header, dtype, None)  # 0 is background, not nodata
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHEMAX), rasterio.open(path, "w", **profile) as dst:
        for y in range(0, header.height, window):
            for x in range(0, header.width, window):
                w, h = min(window, header.width - x), min(window, header.height - y)
                hits = tree.query(shapely.box(x, y, x + w, y + h)) if polygons else []
                order = sorted((int(k) for k in hits), key=lambda k: (scores[k], -k))  # painted last = on top
                ids = np.zeros((h, w), dtype=dtype)
                if order:
                    ids = rasterize([(polygons[k], k + 1) for k in order], out_shape=(h, w), transform=Affine.translation(x, y), dtype=dtype)
                dst.write(ids[None], window=RioWindow(x, y, w, h))
    return dtype
