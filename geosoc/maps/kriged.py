"""A tree model's map plus ordinary kriging of its residuals (`geosoc fit-tabular --model qrf+rk`).

At fitting, every labelled sample gets the model's out-of-fold prediction (the model refitted without the
sample's spatial fold, once per fold), and its residual in log1p space. The variogram of those residuals
(`stats.kriging`), the residuals with their coordinates (`kriging.safetensors`) and the interval's CQR offset
(from the out-of-fold predictions plus residuals kriged without the sample's own fold) are stored beside the
model. At mapping, each window's cells get the residual kriged from their nearest samples (local
neighbourhoods: a window costs what its cells do, whatever the number of samples), added to the model's median
and interval in log1p space, as `geosoc evaluate` scores `<model>+rk`. The AOA is the model's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from geosoc.errors import DamagedError
from geosoc.learn import baselines, checkpoint
from geosoc.maps.outputs import KRIGED_RESIDUAL, RESIDUAL_KRIGING
from geosoc.stats.kriging import (
    NEIGHBOURS,
    SUFFIX,
    Variogram,
    cross_validated,
    fit_variogram,
    krige,
    kriged_offset,
    residuals,
    with_kriged,
)

KRIGING_FILE = "kriging.safetensors"
META = RESIDUAL_KRIGING  # config.json's entry: variogram, offset, neighbours


def base_model(name: str) -> str:
    """The tree model of a `<model>+rk` name (the name itself otherwise)."""
    return name.removesuffix(SUFFIX)


def fit_residuals(name: str, features: np.ndarray, target: np.ndarray, folds: np.ndarray, xy: np.ndarray, seed: int,
                  threads: int) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files and config.json entry of the residual kriging of tree model `name` (see the module docstring)."""
    from safetensors.numpy import save

    out_of_fold = np.full((len(target), 3), np.nan)
    for fold in np.unique(folds):
        held = folds == fold
        fitted = baselines.fit(name, features[~held], target[~held], seed, threads, groups=folds[~held])
        out_of_fold[held] = np.stack(fitted.predict(features[held]), axis=1)
    residual = residuals(target, out_of_fold[:, 1])
    variogram = fit_variogram(xy, residual, seed)
    offset = kriged_offset(out_of_fold[:, 0], out_of_fold[:, 1], out_of_fold[:, 2], target,
                           cross_validated(xy, residual, folds, variogram))
    arrays = {"x": xy[:, 0].astype(np.float64), "y": xy[:, 1].astype(np.float64), "residual": residual}
    meta = {"variogram": variogram.to_dict(), "offset": float(offset), "neighbours": NEIGHBOURS,
            "space": "log1p", "residual_sd": float(np.std(residual))}
    return {KRIGING_FILE: save(arrays)}, meta


class ResidualField:
    """The stored residuals of a `+rk` model, kriged at map cells and added to the model's outputs."""

    def __init__(self, url: str, meta: dict[str, Any]) -> None:
        from safetensors.numpy import load

        entry = meta[META]
        where = f"{url.rstrip('/')}/{KRIGING_FILE}"
        try:
            self.variogram = Variogram.from_dict(entry["variogram"])
            self.offset, self.neighbours = float(entry["offset"]), int(entry["neighbours"])
            arrays = load(checkpoint.read_file(url, KRIGING_FILE))
            self.xy = np.stack([arrays["x"], arrays["y"]], axis=1).astype(np.float64)
            self.residual = np.asarray(arrays["residual"], np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise DamagedError(f"{where}: not the residuals of a +rk model ({type(err).__name__}: {err}); "
                               f"{checkpoint.FRESH_HINT}") from err
        if not (len(self.residual) == len(self.xy) > 0 and np.isfinite(self.residual).all() and self.neighbours > 0
                and np.isfinite(self.offset)):
            raise DamagedError(f"{where}: expected finite residuals at as many places, at least one; "
                               f"{checkpoint.FRESH_HINT}")

    def apply(self, out: dict[str, np.ndarray], cells: np.ndarray) -> dict[str, np.ndarray]:
        """`out` (the model's outputs for cells at `cells` (n, 2) map coordinates) with the kriged residual added
        to the median and the interval, where the model predicted; the residual itself as KRIGED_RESIDUAL."""
        valid = np.isfinite(out["soc_median"])
        if not valid.any():
            return out
        kriged = krige(self.xy, self.residual, cells[valid], self.variogram, self.neighbours)[0]
        lower, median, upper = with_kriged(out["soc_q05"][valid], out["soc_median"][valid], out["soc_q95"][valid],
                                           kriged, self.offset)
        for name, values in (("soc_q05", lower), ("soc_median", median), ("soc_q95", upper)):
            out[name][valid] = values.astype(out[name].dtype)
        out[KRIGED_RESIDUAL][valid] = kriged.astype(out[KRIGED_RESIDUAL].dtype)
        return out
