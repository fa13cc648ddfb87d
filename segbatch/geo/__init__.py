"""Scenes: raster inputs (GeoTIFF / COG) cut into tile windows, stitched into one label COG and polygons.

The maths of the tile grid (`windows`) needs nothing beyond the standard library; every other module
here imports rasterio (and shapely / geopandas for polygons), which come with `pip install 'segbatch[geo]'`.
Image-only jobs never import this package's rasterio modules.
"""

from segbatch.geo.windows import Window, core_of, grid, window_key

__all__ = ["Window", "core_of", "grid", "window_key"]
