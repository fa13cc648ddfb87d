"""The scene write stage (CPU tasks): each window's core labels stored as a part; pixels dropped.

Core-ownership stitching (`tiling.blend: core`, the default): every output pixel comes from the
one window whose core owns it (:func:`segbatch.geo.windows.core_of`), so a window's part is its label
map cropped to its core, with nodata pixels set to :data:`NODATA_LABEL`. Parts never overlap and need
no accumulator: the scene is assembled later by copying each part into place
(:mod:`segbatch.geo.cog`). With `tiling.blend: weighted` a window's part is instead its whole
class-probability array and nodata mask (`.npz`, :func:`segbatch.geo.blend.encode_probs`), blended
after the stream (:func:`segbatch.geo.blend.assemble_blended`).

Instance jobs write, per window, the objects it owns (:func:`segbatch.geo.instances.owned`) as a JSON
part (`parts/<rel_key>/<window key>.json`: the window and the objects' RLE masks in window pixels).

Parts (`core`) are PNG label maps (8 or 16 bit) at `parts/<rel_key>/<window key>.png` under the output;
a window's row is committed (its `mask_uri` the part) only after its part exists, so the ledger's
windows are exactly the parts a scene can be assembled from.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from segbatch.geo.windows import Window, core_of, window_key
from segbatch.masks import encode_png_label_map
from segbatch.retry import Retries, call_with_retries
from segbatch.rows import RowStatus
from segbatch.spec import OutputSpec, SceneSettings
from segbatch.storage import filesystem, join_uri, write_bytes_atomic

__all__ = ["NODATA_LABEL", "PARTS", "CoreWriter", "nodata_label", "part_uri", "write_cores"]

#: Label of nodata pixels in uint8 label rasters (no class uses it: 8-bit rasters hold at most 255 classes).
NODATA_LABEL = 255
#: The output folder of window parts.
PARTS = "parts"


def nodata_label(dtype: np.dtype | str) -> int:
    """255 for uint8 label rasters, 65535 for uint16 ones (more than 255 classes)."""
    return NODATA_LABEL if np.dtype(dtype) == np.uint8 else 65535


def part_uri(output_uri: str, rel_key: str, window: Window, ext: str = "png") -> str:
    """`<output>/parts/<rel_key>/<window key>.png` (semantic) or `.json` (instance: the owned objects)."""
    return join_uri(output_uri, PARTS, rel_key, f"{window_key(window)}.{ext}")


def crop_core(labels: np.ndarray, nodata: np.ndarray, window: Window, width: int, height: int, overlap: int) -> np.ndarray:
    """A window's labels cropped to the core it owns, nodata pixels set to :func:`nodata_label`."""
    core = core_of(window, width, height, overlap)
    y0, x0 = core.row_off - window.row_off, core.col_off - window.col_off
    out = labels[y0 : y0 + core.height, x0 : x0 + core.width].copy()
    if nodata.size:
        out[nodata[y0 : y0 + core.height, x0 : x0 + core.width]] = nodata_label(out.dtype)
    return out


class CoreWriter:
    """Ray Data stage: store each window's core as a part; replace pixels with `mask_uri`.

    `class_pixels` is recomputed over the core (nodata left out), so a scene's counts are the sum of its
    windows'. Retries as :class:`segbatch.sinks.MaskWriter`; a failed write is a `write_failed` row.
    """

    def __init__(self, output: OutputSpec, settings: SceneSettings, task: str = "semantic", threads: int = 8) -> None:
        self.output_uri = output.uri
        self.storage_options = output.storage_options
        self.overlap = settings.overlap
        self.task = task
        self.blend = settings.blend
        self.threads = threads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        fs, _ = filesystem(self.output_uri, self.storage_options)
        n = len(batch["item_id"])
        rows = RowStatus.of(batch)
        mask_uri = [""] * n
        counts = [np.zeros(0, np.int64)] * n
        retries = [int(r) for r in batch["retries"]] if "retries" in batch else [0] * n

        def write(i: int) -> tuple[int, str, Exception | None, int, np.ndarray]:
            w = Window(int(batch["col_off"][i]), int(batch["row_off"][i]), int(batch["win_width"][i]), int(batch["win_height"][i]))
            ext = "json" if self.task == "instance" else "npz" if self.blend == "weighted" else "png"
            uri = part_uri(self.output_uri, str(batch["rel_key"][i]), w, ext)
            counter = Retries()
            try:
                if self.task == "instance":
                    from segbatch.geo.instances import owned

                    found = json.loads(str(batch["instances"][i]) or "[]")
                    mine = owned(found, w, int(batch["scene_width"][i]), int(batch["scene_height"][i]), self.overlap)
                    window = {"col_off": w.col_off, "row_off": w.row_off, "width": w.width, "height": w.height}
                    payload = json.dumps({"window": window, "instances": mine}, separators=(",", ":")).encode()
                    _, path = filesystem(uri, self.storage_options)
                    call_with_retries(lambda: write_bytes_atomic(fs, path, payload), counter=counter, what=f"writing {uri}")
                    kept[i] = json.dumps([{k: v for k, v in m.items() if k != "cut"} for m in mine], separators=(",", ":"))
                    return i, uri, None, counter.count, np.zeros(0, np.int64)
                core = crop_core(
                    batch["label_map"][i], batch["nodata"][i], w, int(batch["scene_width"][i]), int(batch["scene_height"][i]), self.overlap
                )
                minlength = len(batch["class_pixels"][i])
                pixels = np.bincount(core.ravel(), minlength=minlength)[:minlength].astype(np.int64)
                if self.blend == "weighted":  # the whole window's probabilities, blended after the stream
                    from segbatch.geo.blend import encode_probs

                    data = encode_probs(batch["probs"][i], batch["nodata"][i])
                else:
                    data = encode_png_label_map(core)
                _, path = filesystem(uri, self.storage_options)
                call_with_retries(lambda: write_bytes_atomic(fs, path, data), counter=counter, what=f"writing {uri}")
                return i, uri, None, counter.count, pixels
            except Exception as e:  # noqa: BLE001 - a failed write is that window's error
                return i, uri, e, counter.count, np.zeros(0, np.int64)

        kept: dict[int, str] = {}
        if self.task == "instance":
            todo = [i for i in range(n) if rows.ok(i)]
        else:
            todo = [i for i in range(n) if rows.ok(i) and batch["label_map"][i].size]
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.threads, len(todo))) as pool:
                for i, uri, exc, spent, pixels in pool.map(write, todo):
                    retries[i] += spent
                    if exc is None:
                        mask_uri[i], counts[i] = uri, pixels
                    else:
                        rows.fail(i, "write_failed", f"{batch['uri'][i]}: cannot write part {uri}: {type(exc).__name__}: {exc}")
        out = {k: v for k, v in batch.items() if k not in ("label_map", "image", "nodata", "probs")}
        out["retries"] = np.asarray(retries, dtype=np.int32)
        if self.task == "instance":  # the rows keep the objects their window owns (window pixels)
            out["instances"] = np.asarray([kept.get(i, "") for i in range(n)], dtype=object)
        else:
            out["class_pixels"] = np.asarray(counts + [None], dtype=object)[:-1]
        rows.into(out)
        out["mask_uri"] = np.asarray(mask_uri, dtype=object)
        return out


def write_cores(batch: dict[str, np.ndarray], output: OutputSpec, settings: SceneSettings, task: str = "semantic") -> dict[str, Any]:
    """The scene write stage as a plain function for Ray Data tasks (never imports torch)."""
    return CoreWriter(output, settings, task)(batch)
