"""Map exports beside `soc.zarr`: Cloud-Optimized GeoTIFFs, a quicklook PNG and a STAC item.

Each file is made in a local temporary folder (a GeoTIFF is written window by window from the Zarr map, so
memory stays at one chunk whatever the map's size), then published to its final URL in one step: a rename on
a local disk, a single object upload on an object store. A reader sees the old file or the new, never a part.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import posixpath
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from geosoc.io.storage import join, published

COG_NODATA = {"float32": float("nan"), "uint8": 255}
QUICKLOOK_PIXELS = 1000  # longest side of the quicklook
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"


def cog_variables(ds: xr.Dataset | Iterable[str]) -> list[str]:
    """The map's variables exported as COGs: every SOC layer and the AOA (DI stays in the Zarr)."""
    names = [str(name) for name in (ds.data_vars if isinstance(ds, xr.Dataset) else ds)
             if str(name).startswith("soc_") or name == "aoa"]
    return sorted(names, key=lambda name: (name != "soc_median", name == "aoa", name))  # median, bounds, AOA


def exported_files(variables: Iterable[str]) -> list[str]:
    """The names of the files `export_maps` writes beside the Zarr, for a map of these variables."""
    return [f"{name}.tif" for name in cog_variables(variables)] + ["quicklook.png", "item.json"]


def write_cog(da: xr.DataArray, url: str, crs: str, transform: Any, tags: dict[str, str] | None = None) -> str:
    """A COG (deflate, 512 px tiles, overviews) of a 2-D map variable, with its description, unit and nodata as
    band metadata (what QGIS and `gdalinfo` show) and `tags` as dataset metadata (e.g. ATTRIBUTION); AOA as
    uint8 (1 in, 0 out, 255 none). GDAL's COG driver lays it out and carries the metadata over."""
    import rasterio
    import rasterio.shutil

    is_aoa = da.name == "aoa"
    dtype = "uint8" if is_aoa else "float32"
    height, width = da.shape
    with tempfile.TemporaryDirectory(prefix="geosoc-cog-") as folder, published(url) as cog:
        plain = Path(folder) / "plain.tif"
        profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": dtype, "crs": crs,
                   "transform": transform, "nodata": COG_NODATA[dtype], "tiled": True, "blockxsize": 512,
                   "blockysize": 512, "compress": "deflate"}
        rows = da.chunksizes.get("y", (height,)) if da.chunks else (height,)
        with rasterio.open(plain, "w", **profile) as dst:
            start = 0
            for size in rows:  # one row of chunks at a time
                values = np.asarray(da.isel(y=slice(start, start + size)).values)
                if is_aoa:
                    values = np.where(np.isnan(values), 255, values).astype(np.uint8)
                dst.write(values.astype(dtype), 1, window=rasterio.windows.Window(0, start, width, size))
                start += size
            dst.update_tags(**(tags or {}))
            dst.set_band_description(1, str(da.attrs.get("long_name", da.name)))
            if da.attrs.get("units"):
                dst.set_band_unit(1, str(da.attrs["units"]))
        rasterio.shutil.copy(plain, cog, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512,
                             OVERVIEW_RESAMPLING="NEAREST" if is_aoa else "AVERAGE")
    return url


NO_DATA_COLOUR = "#cfe3f5"  # pale blue: no palette colour (its lightest is a sand yellow) is mistaken for it
CLIP_PERCENTILES = (2, 98)


def quicklook(ds: xr.Dataset, url: str, title: str) -> str:
    """PNG of the median SOC: colour bar in its units, with arrows where the scale is clipped (it spans the 2nd to
    98th percentile, said under it); no data in its own colour and legend entry; cells outside the AOA greyed and
    hatched; a scale bar. The title is the caller's (region, depth, period)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    factor = max(1, math.ceil(max(ds.sizes["y"], ds.sizes["x"]) / QUICKLOOK_PIXELS))
    small = ds[["soc_median", "aoa"]]
    if factor > 1:
        small = small.coarsen(y=factor, x=factor, boundary="pad").mean()
    small = small.compute()
    soc, inside = small["soc_median"].values, small["aoa"].values
    crs = ds.rio.crs
    metres = crs is not None and crs.is_projected and crs.linear_units in ("metre", "meter")
    scale = 1000.0 if metres else 1.0  # axes in km
    x, y = small["x"].values / scale, small["y"].values / scale
    half = float(ds["x"].values[1] - ds["x"].values[0]) * factor / 2 / scale if ds.sizes["x"] > 1 else 0.5
    extent = (x.min() - half, x.max() + half, y.min() - half, y.max() + half)
    finite = soc[np.isfinite(soc)]
    vmin, vmax = (np.percentile(finite, CLIP_PERCENTILES) if len(finite) else (0.0, 1.0))
    below, above = bool((finite < vmin).any()), bool((finite > vmax).any())
    extend = "both" if below and above else "min" if below else "max" if above else "neither"
    palette = ListedColormap(plt.get_cmap("YlOrBr")(np.linspace(0.15, 1.0, 256)), name="soc").with_extremes(
        bad=NO_DATA_COLOUR)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=120)
    image = ax.imshow(np.ma.masked_invalid(soc), extent=extent, cmap=palette, vmin=vmin, vmax=vmax,
                      interpolation="nearest")
    outside = np.where(np.isfinite(inside) & (inside < 0.5), 1.0, np.nan)
    legend = []
    if not np.isfinite(soc).all():
        legend.append(Patch(facecolor=NO_DATA_COLOUR, edgecolor="0.5", label="no data"))
    if np.isfinite(outside).any():
        ax.imshow(outside, extent=extent, cmap="Greys", vmin=0, vmax=1.6, alpha=0.75, interpolation="nearest")
        ax.contourf(x, y, np.nan_to_num(outside), levels=[0.5, 1.5], colors="none", hatches=["////"])
        legend.append(Patch(facecolor="0.6", hatch="////", label="outside the area of applicability"))
    bar = fig.colorbar(image, ax=ax, shrink=0.8, extend=extend)
    low, high = CLIP_PERCENTILES
    clipped = "" if extend == "neither" else f"; scale clipped to the {low}-{high}th percentile"
    bar.set_label(f"SOC ({ds['soc_median'].attrs.get('units', '')}), median{clipped}")
    ax.set_title(title)
    unit = "km" if metres else (crs.linear_units if crs is not None else "")
    ax.set_xlabel(f"x, {unit} ({crs.to_string() if crs is not None else 'no CRS'})")
    ax.set_ylabel(f"y, {unit}")
    ax.ticklabel_format(useOffset=False, style="plain")
    length = _round_length((extent[1] - extent[0]) / 5)
    ax.add_artist(AnchoredSizeBar(ax.transData, length, f"{length:g} {unit}", "lower right", pad=0.5,
                                  frameon=True, size_vertical=(extent[3] - extent[2]) / 150))
    if legend:
        ax.legend(handles=legend, loc="lower left", fontsize=8)
    with published(url) as path:
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return url


def _round_length(length: float) -> float:
    """A scale bar's length: 1, 2 or 5 times a power of ten, at most `length` (> 0)."""
    power = 10.0 ** math.floor(math.log10(length))
    return max(step * power for step in (1, 2, 5) if step * power <= length)


def relative_to(target: str, folder: str) -> str:
    """`target` as the STAC item in `folder` should name it: relative where both are in the same place (a local
    disk, or one bucket), else the URL itself; never a path that only this machine knows."""
    from fsspec.core import split_protocol

    if not target:
        return target
    (scheme, path), (folder_scheme, folder_path) = split_protocol(target), split_protocol(folder)
    if scheme != folder_scheme or (scheme and path.split("/", 1)[0] != folder_path.split("/", 1)[0]):
        return target  # another store (or bucket): its URL
    if scheme is None:
        path, folder_path = os.path.abspath(path), os.path.abspath(folder_path)
    return posixpath.relpath(path, folder_path)


def attribution(ds: xr.Dataset) -> list[str]:
    """The attribution texts the licences of the map's sources require (from its cube), [] when none do."""
    texts = ds.attrs.get("attribution") or []
    return [texts] if isinstance(texts, str) else [str(text) for text in texts]


def imagery_period(ds: xr.Dataset) -> tuple[str | None, str | None]:
    """The first and last day of the imagery the map was made from (None, None when the cube did not say)."""
    start, end = ds.attrs.get("period") or (None, None)
    return start, end


def stac_item(ds: xr.Dataset, folder: str, assets: dict[str, str], item_id: str) -> dict[str, Any]:
    """A STAC item (projection and raster extensions, a self link) describing the map's assets, which it names
    relative to itself; written as `item.json` in `folder`."""
    import pystac
    import shapely
    import shapely.geometry
    from pyproj import Transformer
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, NoDataStrings, RasterBand, RasterExtension
    from rasterio.warp import transform_bounds

    crs = ds.rio.crs
    transform = ds.rio.transform()
    height, width = ds.sizes["y"], ds.sizes["x"]
    xmin, ymin, xmax, ymax = ds.rio.bounds()
    # Edges densified before reprojection: a projected edge is curved in lon/lat (Europe's LAEA top edge
    # reaches ~6 degrees further north between the corners than at them).
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    edges = shapely.segmentize(shapely.box(xmin, ymin, xmax, ymax), max(xmax - xmin, ymax - ymin) / 20)
    footprint = shapely.transform(edges, lambda x, y: to_lonlat.transform(x, y), interleaved=False)
    bbox = list(transform_bounds(crs, "EPSG:4326", xmin, ymin, xmax, ymax, densify_pts=21))
    start, end = imagery_period(ds)
    created = ds.attrs.get("created") or dt.datetime.now(dt.UTC).isoformat()
    item = pystac.Item(
        id=item_id, geometry=shapely.geometry.mapping(footprint), bbox=bbox,
        datetime=None if start else dt.datetime.fromisoformat(created),
        start_datetime=dt.datetime.fromisoformat(f"{start}T00:00:00+00:00") if start else None,
        end_datetime=dt.datetime.fromisoformat(f"{end}T23:59:59+00:00") if end else None,
        properties={"title": f"Soil organic carbon, {ds.attrs.get('region', '')}",
                    "description": "SSL-SoilNet predictions: median and interval bounds of SOC, area of "
                                   "applicability (Meyer & Pebesma 2021).",
                    "created": created, "geosoc:model": relative_to(ds.attrs.get("model", ""), folder),
                    "geosoc:cube": relative_to(ds.attrs.get("cube", ""), folder),
                    **({"geosoc:depth": ds.attrs["depth"]} if ds.attrs.get("depth") else {}),
                    **({"geosoc:attribution": attribution(ds)} if attribution(ds) else {})},
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.code = crs.to_string()
    proj.shape = [height, width]
    proj.transform = list(transform)[:6]
    proj.bbox = [xmin, ymin, xmax, ymax]
    for key, href in assets.items():
        roles, media, title = ["data"], COG_MEDIA_TYPE, key
        if href.endswith(".zarr"):
            media, title = "application/vnd+zarr", "all layers (Zarr)"
        elif href.endswith(".png"):
            roles, media, title = ["overview"], pystac.MediaType.PNG, "quicklook"
        elif key in ds.data_vars:
            title = ds[key].attrs.get("long_name", key)
        asset = pystac.Asset(href=href, media_type=media, roles=roles, title=title)
        item.add_asset(key, asset)
        if media == COG_MEDIA_TYPE:
            aoa = key == "aoa"
            band = RasterBand.create(nodata=COG_NODATA["uint8"] if aoa else NoDataStrings.NAN,
                                     data_type=DataType.UINT8 if aoa else DataType.FLOAT32,
                                     unit=None if aoa else ds[key].attrs.get("units") or None,
                                     spatial_resolution=abs(transform.a))
            RasterExtension.ext(asset, add_if_missing=True).bands = [band]
    item.set_self_href(join(folder, "item.json"))
    data = item.to_dict(include_self_link=True, transform_hrefs=False)
    with published(join(folder, "item.json")) as path:
        path.write_text(json.dumps(data, indent=2))
    return data


def export_maps(ds: xr.Dataset, folder: str, zarr_name: str = "soc.zarr") -> dict[str, str]:
    """COGs of every SOC layer and the AOA, `quicklook.png` and `item.json` in `folder` (beside the Zarr)."""
    crs, transform = ds.rio.crs.to_string(), ds.rio.transform()
    assets = {}
    tags = {"ATTRIBUTION": " ".join(attribution(ds))} if attribution(ds) else {}
    for name in cog_variables(ds):
        assets[name] = write_cog(ds[name], join(folder, f"{name}.tif"), crs, transform, tags)
    region = ds.attrs.get("region") or "map"
    start, end = imagery_period(ds)
    when = f", imagery {start} to {end}" if start else ""
    depth = f" at {ds.attrs['depth']}" if ds.attrs.get("depth") else ""
    assets["quicklook"] = quicklook(ds, join(folder, "quicklook.png"), f"{region}: soil organic carbon{depth}{when}")
    assets["zarr"] = join(folder, zarr_name)
    relative = {key: href.rsplit("/", 1)[1] for key, href in assets.items()}  # hrefs relative to item.json
    stac_item(ds, folder, relative, f"geosoc-{region}-soc")
    return {**assets, "stac": join(folder, "item.json")}
