"""Several single-band files read as one scene: a STAC item whose bands are separate assets.

`input.assets: [red, green, blue]` names one asset per band (Sentinel-2 and Landsat items on STAC publish
each band as its own COG). :class:`BandStack` holds the opened files and answers the few dataset calls
the scene stages make (size, georeferencing, blocks, `read` by window or decimated, overviews), so a
window is read from each file by range requests and stacked; nothing is resampled or written. The files
must share one pixel grid (size, transform, CRS) and dtype; bands of another resolution (Sentinel-2's
20 m bands beside its 10 m ones) are refused with the asset named: resample them to one grid first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segbatch.errors import ItemError

__all__ = ["BandStack"]


class BandStack:
    """Opened rasterio datasets (one per asset, in band order) seen as one multi-band dataset."""

    def __init__(self, name: str, keys: Sequence[str], datasets: Sequence[Any]) -> None:
        first = datasets[0]
        for key, ds in zip(keys, datasets):
            grid = (ds.width, ds.height, tuple(ds.transform)[:6], ds.crs)
            if grid != (first.width, first.height, tuple(first.transform)[:6], first.crs):
                raise ItemError(
                    "unsupported",
                    f"{name}: asset '{key}' is {ds.width}x{ds.height} px on another grid than asset '{keys[0]}' "
                    f"({first.width}x{first.height}); stacked assets must share one grid: resample them first",
                )
            if ds.dtypes[0] != first.dtypes[0]:
                raise ItemError(
                    "unsupported", f"{name}: asset '{key}' holds {ds.dtypes[0]}, asset '{keys[0]}' {first.dtypes[0]}"
                )
        self.name = name
        self._datasets = list(datasets)
        #: 1-based band of the stack → (dataset, its own 1-based band)
        self._bands = [(ds, b) for ds in datasets for b in range(1, ds.count + 1)]
        self.width, self.height = int(first.width), int(first.height)
        self.count = len(self._bands)
        self.dtypes = [first.dtypes[0]] * self.count
        self.nodata = first.nodata
        self.crs = first.crs
        self.transform = first.transform
        self.block_shapes = [first.block_shapes[0]] * self.count
        self.profile = first.profile

    def read(self, indexes: Sequence[int], window: Any = None, out_shape: tuple[int, int, int] | None = None) -> np.ndarray:
        """(bands, H, W) of the stack's 1-based `indexes`, each from its own file."""
        planes = []
        for index in indexes:
            ds, band = self._bands[index - 1]
            shape = None if out_shape is None else (out_shape[-2], out_shape[-1])
            planes.append(ds.read(band, window=window, out_shape=shape))
        return np.stack(planes)

    def overviews(self, index: int) -> list[int]:
        ds, band = self._bands[index - 1]
        return list(ds.overviews(band))

    def close(self) -> None:
        for ds in self._datasets:
            ds.close()
