"""STAC Items / ItemCollections as scene sources (`input.uri` ending in `.json`, with `tiling`).

Each item gives one scene: the asset named by `input.assets` (one key: a multi-band asset such as a
COG with all bands), else its first GeoTIFF asset with role `data`, else its first GeoTIFF asset.
Relative hrefs are resolved against the JSON's folder. The output key is `<item id>/<asset key>`
(checked like any key), the version the asset's storage version (etag, or size + mtime) and the
item's id, so a changed asset is new work. Band names come from the asset's STAC 1.1 `bands`, falling
back to `eo:bands` (:func:`band_names`); `input.bands` still selects by 1-based index.

Multi-asset items (one single-band file per band, stacked per window) are not supported yet: an
`input.assets` with more than one key is refused by the spec.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any

from segbatch.spec import InputSpec
from segbatch.storage import ListedObject, filesystem, unstrip

__all__ = ["band_names", "is_stac", "stac_objects"]

_TIFF_TYPES = ("image/tiff", "image/vnd.stac.geotiff")


def is_stac(uri: str) -> bool:
    """A STAC Item or ItemCollection JSON (by its name)."""
    return uri.lower().endswith(".json")


def _items(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc.get("type") == "FeatureCollection":
        return list(doc.get("features") or [])
    if doc.get("type") == "Feature":
        return [doc]
    raise ValueError(f"expected a STAC Item or ItemCollection (type Feature / FeatureCollection), but got type {doc.get('type')!r}")


def _pick(item: dict[str, Any], keys: tuple[str, ...] | None) -> tuple[str, dict[str, Any]]:
    assets = item.get("assets") or {}
    if keys:
        if keys[0] not in assets:
            raise KeyError(f"item '{item.get('id')}' has no asset '{keys[0]}' (it has {sorted(assets)})")
        return keys[0], assets[keys[0]]
    tiffs = [(k, a) for k, a in assets.items() if str(a.get("type", "")).split(";")[0].strip() in _TIFF_TYPES
             or str(a.get("href", "")).lower().endswith((".tif", ".tiff"))]
    data = [(k, a) for k, a in tiffs if "data" in (a.get("roles") or [])]
    if not (data or tiffs):
        raise KeyError(f"item '{item.get('id')}' has no GeoTIFF asset (assets {sorted(assets)})")
    return (data or tiffs)[0]


def band_names(asset: dict[str, Any]) -> list[str]:
    """Band names of an asset: STAC 1.1 `bands[].name`, else `eo:bands[].name` (or common_name)."""
    bands = asset.get("bands") or asset.get("eo:bands") or []
    return [str(b.get("name") or b.get("common_name") or i + 1) for i, b in enumerate(bands)]


def stac_objects(spec: InputSpec) -> tuple[str, Iterator[list[ListedObject]], dict[str, str]]:
    """(base "", one page of scene objects, {asset URI: output key}) for a STAC JSON input."""
    fs, path = filesystem(spec.uri, spec.storage_options)
    with fs.open(path, "rb") as f:
        doc = json.load(f)
    folder = posixpath.dirname(path)
    objects: list[ListedObject] = []
    keys: dict[str, str] = {}
    for item in _items(doc):
        key, asset = _pick(item, spec.assets)
        href = str(asset["href"])
        if "://" not in href and not href.startswith("/"):
            href = unstrip(fs, posixpath.normpath(posixpath.join(folder, href)))
        afs, apath = filesystem(href, spec.storage_options)
        try:
            info = afs.info(apath)
            version = str(info.get("ETag") or info.get("etag") or f"{info.get('size', 0)}-{info.get('mtime') or info.get('LastModified')}").strip('"')
            size = int(info.get("size") or 0)
        except FileNotFoundError:
            version, size = "missing", 0
        objects.append(ListedObject(uri=href, size=size, version=f"{item.get('id')}:{version}"))
        keys[href] = f"{item.get('id')}/{key}"
    return "", iter([objects]), keys
