"""The layers a catalog names: its imagery source (masked by the region's mask, if any) and its climate source.
Each source module is imported only when a catalog uses it (Earth Engine's client is heavy)."""

from __future__ import annotations

from geosoc.catalog import LoadedCatalog, RasterSource, SyntheticSource
from geosoc.sources.layers import Layer


def open_layers(catalog: LoadedCatalog) -> list[Layer]:
    """The catalog's imagery layer and, when it has climate, its climate layer."""
    config = catalog.config
    imagery = _imagery_layer(catalog)
    if config.region.mask is not None:
        from geosoc.sources.raster import masked

        imagery = masked(imagery, catalog.resolve(config.region.mask))
    layers = [imagery]
    if config.climate is not None:
        layers.append(_climate_layer(catalog))
    return layers


def _imagery_layer(catalog: LoadedCatalog) -> Layer:
    config = catalog.config
    source = config.imagery.source
    if isinstance(source, SyntheticSource):
        from geosoc.sources.synthetic import synthetic_imagery

        return synthetic_imagery(config.imagery_grid, source.seed, config.imagery.bands)
    if isinstance(source, RasterSource):
        from geosoc.sources.raster import raster_imagery

        return raster_imagery(catalog, config.imagery_grid)
    from geosoc.sources.earthengine import earthengine_imagery

    return earthengine_imagery(catalog)


def _climate_layer(catalog: LoadedCatalog) -> Layer:
    config = catalog.config
    assert config.climate is not None and config.climate_grid is not None
    source = config.climate.source
    if isinstance(source, SyntheticSource):
        from geosoc.sources.synthetic import synthetic_climate

        return synthetic_climate(config.climate_grid, source.seed, config.climate.months, config.climate.variables)
    from geosoc.sources.earthengine import earthengine_climate

    return earthengine_climate(catalog)
