"""A synthetic AlphaEarth embedding for the demo, made the way the real one is published: 64-axis unit vectors,
quantised to int8 (the dataset's quantisation, -128 no data), written as COGs in the bucket's layout
(`<folder>/<year>/<UTM zone>N/<id>-<y offset>-<x offset>.tiff`, the zone's UTM CRS) and read back through the
COG source (`aef_cog.CogEmbeddingReader`: de-quantised, area-weighted onto the region grid, re-normalised).

What a vector holds: a fixed (seeded) random projection of the landscape's surface-observable latents (terrain,
climate normals, land cover, vegetation mosaic, the density of wet hollows, soil colour factors), each
standardised and box-averaged over 5 x 5 written pixels (300 m in the demo: an embedding summarises a
neighbourhood, not one pixel), passed through tanh (a model's output is not linear in its inputs), plus
per-pixel noise (seeded: the same raster gets the same noise), normalised to unit length.
It never sees the true SOC, nor drainage except through the hollows it makes. The files are written at the
catalog's embedding resolution (60 m for the demo), not 10 m: far smaller, and the demo must stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import uniform_filter

from geosoc.catalog import EMBEDDING_BANDS, LoadedCatalog
from geosoc.fingerprints import fingerprint
from geosoc.grid import Grid
from geosoc.io.storage import default_root, exists, join, published, put_bytes
from geosoc.sources.aef_cog import CogEmbeddingReader, utm_zones
from geosoc.sources.embeddings import GROUP, quantise, unit_vectors
from geosoc.sources.layers import Layer
from geosoc.sources.raster import transformer
from geosoc.sources.synthetic import Landscape

# (latent, centre, scale): standardised before the projection
LATENTS = (("elevation", 600.0, 400.0), ("wet", 0.5, 0.2), ("tmean", 8.0, 6.0), ("seasonality", 0.45, 0.25),
           ("clay", 0.28, 0.12), ("carbonate", 0.3, 0.35), ("iron", 0.5, 0.25), ("mosaic", 0.5, 0.3),
           ("hollow", 0.25, 0.25), ("texture", 0.3, 0.3))
LAND_COVERS = 6  # one-hot columns (water ... bare) beside the latents
CONTEXT_PX = 5  # box average over 5 x 5 written px (300 m at the demo's 60 m): what a vector summarises
NOISE = 0.35  # sd of the per-pixel noise added to each axis before normalising (the projection's sd is ~1)
MARGIN_PX = 8  # written beyond the region on every side, so that the warp onto its grid has data at the edges
DONE = "_SUCCESS"  # written last in the folder: the COGs are complete


def vectors(landscape: Landscape, x: np.ndarray, y: np.ndarray, crs: str, seed: int) -> np.ndarray:
    """(64, h, w) unit vectors for a (h, w) raster of pixel centres (x, y in `crs`, rows and columns evenly
    spaced): the projection, context, non-linearity and noise of the module docstring."""
    f = landscape.fields(x, y, crs)
    columns = [(f[name].astype(np.float64) - centre) / scale for name, centre, scale in LATENTS[:-1]]
    columns.append((np.abs(f["texture"]) - LATENTS[-1][1]) / LATENTS[-1][2])  # stripe contrast, not phase
    columns += [(f["land_cover"] == code).astype(np.float64) * 2.0 for code in range(LAND_COVERS)]
    stack = uniform_filter(np.stack(columns), size=(1, CONTEXT_PX, CONTEXT_PX), mode="nearest")
    rng = np.random.default_rng([seed, 22])  # the projection: fixed per seed
    weights = rng.normal(0.0, 1.0 / np.sqrt(len(columns)), (len(EMBEDDING_BANDS), len(columns)))
    bias = rng.normal(0.0, 0.3, (len(EMBEDDING_BANDS), 1, 1))
    mixed = np.tanh(np.tensordot(weights.astype(np.float32), stack.astype(np.float32), axes=1) + bias)
    noise = rng.standard_normal(mixed.shape, dtype=np.float32)  # the same raster gets the same noise
    return unit_vectors(mixed + np.float32(NOISE) * noise)


def write_cogs(folder: str, grid: Grid, seed: int, year: int) -> list[str]:
    """The region's synthetic embedding as one int8 COG in the UTM zone of its centre (the real files overhang
    their zones, and the reader looks in every zone under the region), at the grid's resolution; `folder` is any
    fsspec URL. Each file is made locally and published in one step (no folder made on an object store: s3fs's
    makedirs creates buckets), `_SUCCESS` last. Skipped when the folder already holds a complete set."""
    if exists(join(folder, DONE)):
        return []
    zone = _centre_zone(grid)
    crs = f"EPSG:{32600 + zone}"
    res, pad = grid.resolution, MARGIN_PX * grid.resolution
    xmin, ymin, xmax, ymax = transformer(grid.crs, crs).transform_bounds(*grid.bounds, densify_pts=21)
    x0, y0 = np.floor((xmin - pad) / res) * res, np.ceil((ymax + pad) / res) * res
    width, height = int(np.ceil((xmax + pad - x0) / res)), int(np.ceil((y0 - ymin + pad) / res))
    ux, uy = np.meshgrid(x0 + res / 2 + res * np.arange(width), y0 - res / 2 - res * np.arange(height))
    rx, ry = transformer(crs, grid.crs).transform(ux, uy)  # the landscape is a function of the region's CRS
    raw = quantise(vectors(Landscape(seed), rx, ry, grid.crs, seed))
    target = join(folder, str(year), f"{zone}N", f"synthetic{zone}-{0:010d}-{0:010d}.tiff")
    with published(target) as local:
        _write_cog(local, raw, (x0, y0, res), crs)
    put_bytes(join(folder, DONE), f"seed {seed}, year {year}, zone {zone}N\n".encode())
    return [target]


def _centre_zone(grid: Grid) -> int:
    lon, _ = transformer(grid.crs, "EPSG:4326").transform((grid.bounds[0] + grid.bounds[2]) / 2,
                                                          (grid.bounds[1] + grid.bounds[3]) / 2)
    zone = min(60, max(1, int(np.floor((lon + 180) / 6)) + 1))
    assert f"{zone}N" in utm_zones(grid)
    return zone


def _write_cog(path: Path, raw: np.ndarray, origin: tuple[float, float, float], crs: str) -> None:
    """A 64-band int8 COG, -128 no data, bands named A00..A63, as the bucket's files are."""
    import rasterio
    import rasterio.shutil
    from affine import Affine

    x0, y0, res = origin
    profile = {"driver": "GTiff", "height": raw.shape[1], "width": raw.shape[2], "count": raw.shape[0],
               "dtype": "int8", "crs": crs, "transform": Affine(res, 0, x0, 0, -res, y0), "nodata": -128,
               "tiled": True, "blockxsize": 256, "blockysize": 256}
    plain = path.with_suffix(".plain.tif")
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(raw)
        for i, band in enumerate(EMBEDDING_BANDS):
            dst.set_band_description(i + 1, band)
    rasterio.shutil.copy(plain, path, driver="COG", BLOCKSIZE=256, COMPRESS="DEFLATE", OVERVIEWS="NONE")
    plain.unlink()


@dataclass
class SyntheticCogReader(CogEmbeddingReader):
    """The COG reader, after writing the synthetic COGs it reads: once, when a build has checked its root, taken
    its lock and found its cube compatible (`data.cube.build_cube`), so a refused build writes none of them."""

    seed: int = 0

    def prepare(self) -> None:
        if self.files is None:
            write_cogs(self.url, self.grid, self.seed, self.year)
        super().prepare()


def _set_name(grid: Grid, seed: int) -> str:
    """The folder of one set of files: its seed, resolution and extent (the noise is drawn per raster, so files
    of another extent differ where they overlap; and a set made for a small part must not serve a larger one)."""
    return f"seed{seed}-{grid.resolution:g}m-{fingerprint(grid.crs, repr(grid.bounds), length=8)}"


def synthetic_embeddings(catalog: LoadedCatalog, root: str | None = None) -> Layer:
    """The catalog's synthetic embedding layer; its COGs live under `<root>/sources/aef-synthetic`."""
    config = catalog.config.embeddings
    grid = catalog.config.embeddings_grid
    assert config is not None and grid is not None
    folder = join(root or default_root(catalog.config.region.name), "sources", "aef-synthetic",
                  _set_name(grid, config.seed))
    reader = SyntheticCogReader(grid, folder, config.year, seed=config.seed)
    attrs: dict[str, Any] = {
        "source": "synthetic", "year": config.year, "seed": config.seed, "url": folder,
        "description": "a synthetic stand-in for the AlphaEarth embedding (not Google's data): a random "
                       "projection of the synthetic landscape's latents plus noise, int8 COGs",
        "aggregation": "area-weighted mean of the COGs' vectors in each cell, re-normalised to unit length"}
    return Layer(GROUP, grid, {"band": list(EMBEDDING_BANDS)}, reader, attrs)
