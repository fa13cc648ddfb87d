"""Scenes → tile-window work items: the planning side of a job with `tiling` (driver).

Each listed scene's header is read (a few range requests; never its pixels) and the scene becomes one
row per window of :func:`segbatch.geo.windows.grid`, with `item_id = sha256(uri, version#window)`: a
kill mid-scene leaves the committed windows in the ledger and a rerun plans only the others. A scene
whose header cannot be read, or that cannot be read as asked (dtype, bands), becomes one row with
`plan_error` and `plan_error_class` set: an error row like a bad image's, keyed `version#scene`.

Every listed scene is also recorded (:class:`PlannedScene`, in `Plan.scenes`) so the after-stream step
can finish scenes whose windows were all committed earlier (a run killed before assembling them).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from segbatch.errors import ItemError
from segbatch.geo.read import SceneHeader, read_header
from segbatch.geo.stac import is_stac, stac_objects
from segbatch.geo.windows import grid, window_key
from segbatch.outputs import Ledger, hash64
from segbatch.plan import PAGE_ROWS, SCENE_PLAN_SCHEMA, PlanCounts, item_id_for, listed_pages
from segbatch.spec import InputSpec, TilingSpec
from segbatch.storage import UnsafeKeyError, safe_relative_key

__all__ = ["PlannedScene", "scene_item_id", "scene_plan_pages", "window_item_id"]

#: Scene headers read at once while planning.
HEADER_THREADS = 8


@dataclass(frozen=True, slots=True)
class PlannedScene:
    """A listed scene: where it is, its output key, its header (None when refused) and its window count."""

    uri: str
    version: str
    rel_key: str
    header: SceneHeader | None
    windows: int


def window_item_id(uri: str, version: str, key: str) -> str:
    """The id of one window of a scene version (`key` from :func:`segbatch.geo.windows.window_key`)."""
    return item_id_for(uri, f"{version}#{key}")


def scene_item_id(uri: str, version: str) -> str:
    """The id of a scene refused as a whole (its one error row)."""
    return item_id_for(uri, f"{version}#scene")


def scene_plan_pages(
    spec: InputSpec,
    tiling: TilingSpec,
    ledger: Ledger | None = None,
    counts: PlanCounts | None = None,
    scenes: list[PlannedScene] | None = None,
    page_rows: int = PAGE_ROWS,
    exclude_prefix: str | None = None,
) -> Iterator[pa.Table]:
    """List the scenes and yield the windows still to do, a page of scenes at a time (:data:`SCENE_PLAN_SCHEMA`).

    `counts` counts windows (the work items); `scenes` receives every listed scene; objects under
    `exclude_prefix` (the job's output: its label COGs are GeoTIFFs too) are never scenes.
    """
    ledger = ledger if ledger is not None else Ledger.empty()
    counts = counts if counts is not None else PlanCounts()
    scenes = scenes if scenes is not None else []
    seen: set[str] = set()
    stac_keys: dict[str, str] = {}
    if is_stac(spec.uri):
        base, pages, stac_keys = stac_objects(spec)
    else:
        base, pages = listed_pages(spec, page_rows, exclude_prefix, counts)

    percentile = spec.scale is not None and spec.scale.percentile is not None
    stats: dict[str, tuple[list[float], list[float]]] = {}

    def header(uri: str) -> SceneHeader | ItemError:
        try:
            head = read_header(uri, spec.storage_options, spec.bands, spec.assets)
            if percentile:  # the scene's own scale, once, here: every window of it then scales alike
                from segbatch.geo.read import open_scene, percentile_scale
                from segbatch.spec import SceneSettings

                settings = SceneSettings(storage_options=spec.storage_options, bands=spec.bands, scale=spec.scale, nodata=spec.nodata)
                with open_scene(uri, spec.storage_options, spec.assets) as ds:
                    found = percentile_scale(ds, settings)
                stats[uri] = (list(found.min), list(found.max))  # type: ignore[arg-type]
            return head
        except ItemError as e:
            return e
        except Exception as e:  # noqa: BLE001 - stats that cannot be read make the scene an error row
            return ItemError("truncated", f"{uri}: cannot read values for input.scale.percentile: {type(e).__name__}: {e}")

    for page in pages:
        page = [o for o in page if not (o.uri in seen or seen.add(o.uri))]  # type: ignore[func-returns-value]
        if not page:
            continue
        with ThreadPoolExecutor(max_workers=min(HEADER_THREADS, len(page))) as pool:
            headers = list(pool.map(header, [o.uri for o in page]))
        cols: dict[str, list[object]] = {name: [] for name in SCENE_PLAN_SCHEMA.names}
        for obj, head in zip(page, headers):
            try:
                rel_key = safe_relative_key(stac_keys[obj.uri], "") if obj.uri in stac_keys else safe_relative_key(obj.uri, base)
                key_error = ""
            except UnsafeKeyError as e:
                rel_key, key_error = "", f"{obj.uri}: {e}"
            if key_error or isinstance(head, ItemError):
                ids = [scene_item_id(obj.uri, obj.version)]
                wins = [None]
                error, error_class = (key_error, "unsafe_key") if key_error else (head.message, head.error_class)  # type: ignore[union-attr]
                scenes.append(PlannedScene(obj.uri, obj.version, rel_key, None, 0))
                width = height = 0
            else:
                wins = grid(head.width, head.height, tiling.size, tiling.overlap, head.block)  # type: ignore[assignment]
                ids = [window_item_id(obj.uri, obj.version, window_key(w)) for w in wins]  # type: ignore[arg-type]
                error, error_class = "", ""
                scenes.append(PlannedScene(obj.uri, obj.version, rel_key, head, len(wins)))
                width, height = head.width, head.height
            hashes = hash64(ids)
            done = ledger.has_items(hashes)
            counts.listed += len(ids)
            counts.skipped += int(done.sum())
            todo = np.flatnonzero(~done)
            if not todo.size:
                continue
            # a version seen before is resumed, not changed; a URI known in another version is changed
            changed = bool(ledger.had_uris(hash64([obj.uri]))[0]) and not done.any()
            counts.changed += int(todo.size) if changed else 0
            counts.new += 0 if changed else int(todo.size)
            for i in todo:
                w = wins[i]
                row = {
                    "item_id": ids[i], "uri": obj.uri, "version": obj.version, "size": obj.size, "rel_key": rel_key,
                    "plan_error": error, "plan_error_class": error_class, "scene_width": width, "scene_height": height,
                    "col_off": w.col_off if w else 0, "row_off": w.row_off if w else 0,
                    "win_width": w.width if w else 0, "win_height": w.height if w else 0,
                    "scale_min": stats.get(obj.uri, ([], []))[0], "scale_max": stats.get(obj.uri, ([], []))[1],
                }
                for name, value in row.items():
                    cols[name].append(value)
        if cols["item_id"]:
            yield pa.table(cols, schema=SCENE_PLAN_SCHEMA)
