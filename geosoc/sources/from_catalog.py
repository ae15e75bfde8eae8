"""The layers a catalog names: its imagery source and, when it has them, its embeddings (both masked by the
region's mask, if any) and its climate source. Each source module is imported only when a catalog uses it
(Earth Engine's client is heavy)."""

from __future__ import annotations

from geosoc.catalog import LoadedCatalog, RasterSource, SyntheticSource
from geosoc.sources.layers import Layer


def open_layers(catalog: LoadedCatalog, root: str | None = None, stacked: bool = False) -> list[Layer]:
    """The catalog's imagery layer, its climate layer when it has climate, its embeddings when it has them
    (`root`: the region's root, where synthetic embeddings write their COGs). `stacked`: Earth Engine imagery
    with every band of a window in one request (sampling at points) instead of one band a request (a cube)."""
    config = catalog.config
    layers = [_in_mask(catalog, _imagery_layer(catalog, stacked))]
    if config.climate is not None:
        layers.append(_climate_layer(catalog))
    if config.embeddings is not None:
        layers.append(_in_mask(catalog, _embeddings_layer(catalog, root)))
    return layers


def _in_mask(catalog: LoadedCatalog, layer: Layer) -> Layer:
    """The layer with no data outside the region's mask, if the catalog has one."""
    if catalog.config.region.mask is None:
        return layer
    from geosoc.sources.raster import masked

    return masked(layer, catalog.resolve(catalog.config.region.mask))


def _imagery_layer(catalog: LoadedCatalog, stacked: bool) -> Layer:
    config = catalog.config
    source = config.imagery.source
    if isinstance(source, SyntheticSource):
        from geosoc.sources.synthetic import synthetic_imagery

        return synthetic_imagery(config.imagery_grid, source.seed, config.imagery.bands)
    if isinstance(source, RasterSource):
        from geosoc.sources.raster import raster_imagery

        return raster_imagery(catalog, config.imagery_grid)
    from geosoc.sources.earthengine import earthengine_imagery

    return earthengine_imagery(catalog, stacked=stacked)


def _climate_layer(catalog: LoadedCatalog) -> Layer:
    config = catalog.config
    assert config.climate is not None and config.climate_grid is not None
    source = config.climate.source
    if isinstance(source, SyntheticSource):
        from geosoc.sources.synthetic import synthetic_climate

        return synthetic_climate(config.climate_grid, source.seed, config.climate.months, config.climate.variables)
    from geosoc.sources.earthengine import earthengine_climate

    return earthengine_climate(catalog)


def _embeddings_layer(catalog: LoadedCatalog, root: str | None) -> Layer:
    """The catalog's embedding layer from the source it names (`synthetic` writes its COGs under `root`)."""
    config = catalog.config.embeddings
    assert config is not None
    if config.source == "synthetic":
        from geosoc.sources.aef_synthetic import synthetic_embeddings

        return synthetic_embeddings(catalog, root)
    if config.source == "cog":
        from geosoc.sources.aef_cog import cog_embeddings

        return cog_embeddings(catalog)
    from geosoc.sources.earthengine import earthengine_embeddings

    return earthengine_embeddings(catalog)
