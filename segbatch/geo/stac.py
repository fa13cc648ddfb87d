"""STAC Items / ItemCollections as scene sources (`input.uri` ending in `.json`, with `tiling`).

Each item gives one scene, from the assets `input.assets` names:

* one key (or none): one multi-band asset such as a COG with all bands; without `input.assets`, the
  item's first GeoTIFF asset with role `data`, else its first GeoTIFF asset. The scene's URI is the
  asset's, its output key `<item id>/<asset key>`.
* several keys (`[red, green, blue]`): one asset per band, stacked in that order
  (:class:`segbatch.geo.stack.BandStack`; every asset on one pixel grid). The scene's URI is
  `<json URI>#<item id>` and its output key `<item id>`; :func:`asset_hrefs` finds the files again.

Relative hrefs are resolved against the JSON's folder. The version joins the assets' storage versions
(etag, or size + mtime) and the item's id, so a changed asset is new work. Band names come from an
asset's STAC 1.1 `bands`, falling back to `eo:bands` (:func:`band_names`); `input.bands` selects by
1-based index (over the stack's bands, in asset order).
"""

from __future__ import annotations

import functools
import json
import posixpath
from collections.abc import Iterator
from typing import Any

from segbatch.errors import ItemError
from segbatch.spec import InputSpec
from segbatch.storage import ListedObject, filesystem, unstrip

__all__ = ["asset_hrefs", "band_names", "is_stac", "is_stacked", "stac_objects"]

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


def _pick(item: dict[str, Any], keys: tuple[str, ...] | None) -> list[tuple[str, dict[str, Any]]]:
    """The item's assets read as one scene: those `keys` names, in order, else its first GeoTIFF."""
    assets = item.get("assets") or {}
    if keys:
        missing = [k for k in keys if k not in assets]
        if missing:
            raise KeyError(f"item '{item.get('id')}' has no asset '{missing[0]}' (it has {sorted(assets)})")
        return [(k, assets[k]) for k in keys]
    tiffs = [(k, a) for k, a in assets.items() if str(a.get("type", "")).split(";")[0].strip() in _TIFF_TYPES
             or str(a.get("href", "")).lower().endswith((".tif", ".tiff"))]
    data = [(k, a) for k, a in tiffs if "data" in (a.get("roles") or [])]
    if not (data or tiffs):
        raise KeyError(f"item '{item.get('id')}' has no GeoTIFF asset (assets {sorted(assets)})")
    return [(data or tiffs)[0]]


def is_stacked(uri: str) -> bool:
    """A scene stacked from several assets of a STAC item (`<json URI>#<item id>`)."""
    head, sep, _ = uri.rpartition("#")
    return bool(sep) and is_stac(head)


def _resolve(href: str, fs: Any, folder: str) -> str:
    if "://" not in href and not href.startswith("/"):
        return unstrip(fs, posixpath.normpath(posixpath.join(folder, href)))
    return href


def _version(href: str, storage_options: dict[str, Any] | None) -> tuple[str, int]:
    afs, apath = filesystem(href, storage_options)
    try:
        info = afs.info(apath)
    except FileNotFoundError:
        return "missing", 0
    version = str(info.get("ETag") or info.get("etag") or f"{info.get('size', 0)}-{info.get('mtime') or info.get('LastModified')}")
    return version.strip('"'), int(info.get("size") or 0)


def _options_key(storage_options: dict[str, Any] | None) -> str:
    return json.dumps(storage_options or {}, sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _read_json(uri: str, options_json: str) -> dict[str, Any]:
    """A STAC JSON, read once per process (each load task opens every window's scene again)."""
    fs, path = filesystem(uri, json.loads(options_json))
    with fs.open(path, "rb") as f:
        return json.load(f)


def asset_hrefs(uri: str, storage_options: dict[str, Any] | None, keys: tuple[str, ...]) -> list[tuple[str, str]]:
    """(asset key, file URI) of each band asset of a stacked scene (`<json URI>#<item id>`), in `keys` order.

    Raises:
        ItemError: `unreadable` when the JSON or the item cannot be found again.
    """
    json_uri, _, item_id = uri.rpartition("#")
    try:
        fs, path = filesystem(json_uri, storage_options)
        doc = _read_json(json_uri, _options_key(storage_options))
        item = next((i for i in _items(doc) if str(i.get("id")) == item_id), None)
        if item is None:
            raise KeyError(f"no item '{item_id}'")
        folder = posixpath.dirname(path)
        return [(key, _resolve(str(asset["href"]), fs, folder)) for key, asset in _pick(item, keys)]
    except (OSError, ValueError, KeyError) as e:
        raise ItemError("unreadable", f"{uri}: cannot read the STAC item's assets: {type(e).__name__}: {e}") from None


def band_names(asset: dict[str, Any]) -> list[str]:
    """Band names of an asset: STAC 1.1 `bands[].name`, else `eo:bands[].name` (or common_name)."""
    bands = asset.get("bands") or asset.get("eo:bands") or []
    return [str(b.get("name") or b.get("common_name") or i + 1) for i, b in enumerate(bands)]


def stac_objects(spec: InputSpec) -> tuple[str, Iterator[list[ListedObject]], dict[str, str]]:
    """(base "", one page of scene objects, {asset URI: output key}) for a STAC JSON input."""
    fs, path = filesystem(spec.uri, spec.storage_options)
    with fs.open(path, "rb") as f:  # fresh on every listing: the catalogue may have changed since a cached read
        doc = json.load(f)
    folder = posixpath.dirname(path)
    objects: list[ListedObject] = []
    keys: dict[str, str] = {}
    for item in _items(doc):
        picked = _pick(item, spec.assets)
        hrefs = [_resolve(str(asset["href"]), fs, folder) for _, asset in picked]
        versions = [_version(href, spec.storage_options) for href in hrefs]
        version = f"{item.get('id')}:" + "+".join(v for v, _ in versions)
        size = sum(n for _, n in versions)
        if len(picked) == 1:
            uri, key = hrefs[0], f"{item.get('id')}/{picked[0][0]}"
        else:  # one asset per band: the scene is the item
            uri, key = f"{unstrip(fs, path)}#{item.get('id')}", str(item.get("id"))
        objects.append(ListedObject(uri=uri, size=size, version=version))
        keys[uri] = key
    return "", iter([objects]), keys
