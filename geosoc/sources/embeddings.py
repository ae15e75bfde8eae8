"""The AlphaEarth Foundations annual Satellite Embedding as a cube group, from either of its two sources.

Group `embeddings(band, y, x)`, bands A00..A63, float32, NaN where no data. Each cell holds the mean of the
10 m embedding vectors under it, re-normalised to unit length: how the dataset's own overviews are made
(the dataset's GCS readme, "File structure"), so a cell's vector is comparable to any 10 m pixel's.
Sources: Earth Engine through xee (`earthengine.earthengine_embeddings`) or the public int8 COGs
(`aef_cog.cog_embeddings`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geosoc.catalog import LoadedCatalog

GROUP = "embeddings"
# The licence (CC-BY 4.0) requires this text with the data and what is made from it: the wording of the
# dataset's GCS readme ("License") and Earth Engine catalog page.
ATTRIBUTION = "The AlphaEarth Foundations Satellite Embedding dataset is produced by Google and Google DeepMind."
LICENSE = "CC-BY-4.0"
DATASET_URL = "https://developers.google.com/earth-engine/datasets/catalog/GOOGLE_SATELLITE_EMBEDDING_V1_ANNUAL"
# De-quantisation of the COGs' int8 values, from the dataset's GCS readme ("AlphaEarth Foundations GCS data",
# https://developers.google.com/earth-engine/guides/aef_on_gcs_readme, section "De-quantization"): divide by
# 127.5, square, multiply by the sign of the original value; -128 is reserved as "no data" (the COGs' NoData
# value), so stored values run from -127 to 127.
QUANTISATION_SCALE = 127.5
NODATA = -128


def dequantise(raw: np.ndarray) -> np.ndarray:
    """int8 COG values -> float32 embedding values in [-1, 1]; NaN for the no-data value -128."""
    values = raw.astype(np.float32)
    out = np.square(values / QUANTISATION_SCALE) * np.sign(values)
    return np.where(raw == NODATA, np.float32(np.nan), out).astype(np.float32)


def quantise(values: np.ndarray) -> np.ndarray:
    """Embedding values in [-1, 1] -> the COGs' int8 (the inverse of `dequantise`): sign(v) sqrt(|v|) 127.5,
    rounded, in -127..127 (-128 stays the no-data value); NaN -> -128."""
    values = np.asarray(values, dtype=np.float64)
    raw = np.clip(np.round(np.sign(values) * np.sqrt(np.abs(values)) * QUANTISATION_SCALE), -127, 127)
    return np.where(np.isnan(values), NODATA, np.nan_to_num(raw)).astype(np.int8)


def unit_vectors(total: np.ndarray) -> np.ndarray:
    """(band, h, w) sums (or means) of embedding vectors -> their directions as float32; NaN where nothing was
    summed (a zero vector)."""
    norm = np.sqrt(np.square(total, dtype=np.float64).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(norm > 0, total / norm, np.nan)
    return out.astype(np.float32)


def embeddings_attrs(catalog: LoadedCatalog, **extra: Any) -> dict[str, Any]:
    """The group's attributes: where the vectors came from, which year, and the attribution the licence asks."""
    config = catalog.config.embeddings
    assert config is not None
    return {"source": config.source, "year": config.year, "attribution": ATTRIBUTION, "license": LICENSE,
            "dataset": DATASET_URL, "aggregation": "mean of the 10 m vectors in each cell, re-normalised to unit "
            "length", **extra}
