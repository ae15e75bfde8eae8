"""Write the land masks the Europe and CONUS catalogs name as `region.mask` (geosoc/catalogs/masks/).

Source: the GLOBE land/sea mask at 30 arc-seconds (NOAA NGDC, GLOBE Task Team 1999; public domain) as packaged by
global-land-mask 1.0.0 (MIT). Each mask covers its region's bounds in EPSG:4326 at 1 arc-minute; a cell is land
(1) when any of its four 30" cells is land, so coastal land is kept and the coast carries at most ~1.8 km of sea.

    pip install global-land-mask==1.0.0 && python tools/make_land_masks.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from global_land_mask import globe
from rasterio.transform import from_origin

OUT = Path(__file__).resolve().parents[1] / "geosoc" / "catalogs" / "masks"
EXTENTS = {"europe-land.tif": (-36.0, 29.0, 74.0, 73.0), "conus-land.tif": (-129.0, 22.0, -64.0, 52.0)}  # W S E N
STEP = 1 / 60  # 1 arc-minute: two 30" GLOBE cells a side


def main() -> None:
    ocean, lat, lon = globe._mask, globe._lat, globe._lon  # (21600, 43200), lat from +90 down, lon from -180
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (west, south, east, north) in EXTENTS.items():
        rows = np.flatnonzero((lat <= north) & (lat > south))
        cols = np.flatnonzero((lon >= west) & (lon < east))
        block = ~ocean[rows[0] : rows[0] + len(rows) // 2 * 2, cols[0] : cols[0] + len(cols) // 2 * 2]
        land = block.reshape(block.shape[0] // 2, 2, block.shape[1] // 2, 2).any(axis=(1, 3)).astype(np.uint8)
        profile = dict(driver="GTiff", height=land.shape[0], width=land.shape[1], count=1, dtype="uint8",
                       crs="EPSG:4326", transform=from_origin(west, north, STEP, STEP), compress="deflate",
                       nbits=1, tiled=True, blockxsize=512, blockysize=512)
        with rasterio.open(OUT / name, "w", **profile) as dst:
            dst.write(land, 1)
            dst.update_tags(source="GLOBE 30 arc-second land/sea mask (NOAA NGDC), via global-land-mask 1.0.0",
                            meaning="1 land, 0 sea")
        print(f"{name}: {land.shape[1]} x {land.shape[0]}, land {land.mean():.1%}, {(OUT / name).stat().st_size:,} B")


if __name__ == "__main__":
    main()
