"""Tree models as map models: when `geosoc evaluate` finds that a random forest, quantile forest or gradient
boosting beats the network, the map can be made with it.

`fit_region` fits the chosen model on every labelled sample of a region (features from `baselines`), with the
area-of-applicability reference in the space of those covariates (CAST's own choice), and writes it as a
checkpoint folder like the network's: `config.json` (the same manifest, `"kind": "tabular"`) naming
`aoa.safetensors` and `estimator.skops`. skops stores the estimators without pickle; loading accepts only the
tree types these models are made of and refuses a file holding anything else. `TabularPredictor` makes the map
from it with the same per-window interface as the network's predictor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from geosoc.catalog import Catalog
from geosoc.data.sampling import cut_patches
from geosoc.errors import DamagedError, InputError
from geosoc.io.storage import join
from geosoc.learn import baselines, checkpoint
from geosoc.learn.device import resolve_device
from geosoc.learn.models import NetworkConfig
from geosoc.maps.outputs import output_names
from geosoc.stats import aoa

ESTIMATOR_FILE = "estimator.skops"
BATCH = 65536  # map cells per scikit-learn call: it is fastest on large batches
MAP_MODELS = ("rf", "gbm", "qrf")
# Types skops does not trust by default, and that these models legitimately contain.
TRUSTED = frozenset({
    "numpy.dtype",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "quantile_forest._quantile_forest.RandomForestQuantileRegressor",
    "quantile_forest._quantile_forest_fast.QuantileForest",
})


def is_tabular(meta: dict[str, Any]) -> bool:
    return meta.get("kind") == "tabular"


def fit_region(catalog: Catalog, root: str, name: str, *, out: str | None = None, threads: int = 1) -> str:
    """`geosoc fit-tabular`: the model `name` fitted on all labelled samples of the region -> models/<name>."""
    from geosoc.data.streaming import SampleData
    from geosoc.learn.training import stage_urls

    if name not in MAP_MODELS:
        raise InputError(f"--model {name!r}: maps can be made with {', '.join(MAP_MODELS)} (the network is "
                         "`geosoc finetune`; hybrid needs the encoders' embeddings at every cell, not supported yet)")
    url = stage_urls(root)["labelled"]
    data = SampleData(url)
    labelled = np.flatnonzero(np.isfinite(data.target))
    if len(labelled) < 10:
        raise InputError(f"{url}: only {len(labelled)} labelled samples; a tree model needs at least 10")
    features = baselines.covariate_features(data.rows(labelled), data.bands, data.variables, data.time)
    seed = catalog.training.seed
    fitted = baselines.fit(name, features.values, data.target[labelled], seed, threads, groups=data.fold[labelled])
    medians = _medians(features.values[:, fitted.usable])
    reference = aoa.fit(_filled(features.values[:, fitted.usable], medians), data.fold[labelled], seed)
    config = NetworkConfig(bands=data.bands, variables=data.variables, patch_size=baselines.WINDOW,
                           months=data.months, quantiles=list(baselines.QUANTILES))
    months = [str(m) for m in data.time.astype("datetime64[M]")] if data.time is not None else None
    meta = {"stage": "fit-tabular", "kind": "tabular", "estimator": name, "samples": url, "seed": seed,
            "units": data.attrs.get("units", ""), "features": features.names, "usable": fitted.usable.tolist(),
            "medians": medians.tolist(), "months": months,
            "calibration": {"method": "cqr", "offset": fitted.offset, "space": "log1p"} if fitted.offset else {}}
    out = out or join(root, "models", name)
    import skops.io

    checkpoint.save_files(out, {ESTIMATOR_FILE: skops.io.dumps({"estimators": fitted.estimators}),
                                checkpoint.AOA_FILE: reference.to_bytes()}, config, meta)
    return out


def _medians(values: np.ndarray) -> np.ndarray:
    """Per-feature training medians: what a missing covariate is taken to be in the AOA's distances."""
    return np.nan_to_num(np.nanmedian(values, axis=0)) if len(values) else np.zeros(values.shape[1])


def _filled(values: np.ndarray, medians: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), medians[None, :], values)


def load(url: str) -> baselines.Fitted:
    """The fitted estimators of a tabular checkpoint, refusing any type outside the trees it should hold."""
    import skops.io

    meta = checkpoint.load_config(url)[1]
    data = checkpoint.read_file(url, ESTIMATOR_FILE)
    unexpected = sorted(set(skops.io.get_untrusted_types(data=data)) - TRUSTED)
    if unexpected:
        raise DamagedError(f"{url}/{ESTIMATOR_FILE} holds types a geosoc tree model never contains: {unexpected}; "
                           "refusing to load it")
    try:
        stored = skops.io.loads(data, trusted=sorted(TRUSTED))
    except Exception as err:  # a damaged file: skops raises several kinds
        raise DamagedError(f"{url}/{ESTIMATOR_FILE} cannot be read ({type(err).__name__}: {err})") from err
    return baselines.Fitted(meta["estimator"], list(stored["estimators"]), np.asarray(meta["usable"], dtype=bool),
                            float(checkpoint.offset_of(meta)))


class TabularPredictor:
    """A tree model applied to map cells: per cell the same covariate features as its training samples (the
    5 x 5 px window around the cell's pixel and the climate series), then the model, then the AOA distance in
    covariate space. Runs on the host (scikit-learn); `device` only places the AOA distances."""

    def __init__(self, model_url: str, device: torch.device | str | None = None) -> None:
        self.device = resolve_device(device)
        self.config, self.meta = checkpoint.load_config(model_url)
        self.fitted = load(model_url)
        reference = checkpoint.load_aoa(model_url)
        self.scorer = aoa.Scorer(reference, self.device) if reference is not None else None
        self.medians = np.asarray(self.meta["medians"], dtype=np.float64)
        self.months = np.array(self.meta["months"], dtype="datetime64[M]") if self.meta.get("months") else None
        self.uses_patches = bool(self.config.bands)
        self.uses_climate = bool(self.config.variables)
        self.patch = baselines.WINDOW
        self.outputs = output_names(self.config.quantiles)

    def predict(self, block: np.ndarray, top: np.ndarray, left: np.ndarray, climate: np.ndarray | None,
                climate_of: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Outputs for cells whose 5 x 5 windows start at (top, left) of `block` (band, h, w); NaN where the
        cell's pixel has no data. `climate` holds a series per cell, or per row of it that `climate_of` names."""
        out = {name: np.full(len(top), np.nan, dtype=np.float32) for name in self.outputs}
        half = self.patch // 2
        valid = ~np.isnan(block[:, top + half, left + half]).any(axis=0)
        cells = np.flatnonzero(valid)
        for start in range(0, len(cells), BATCH):
            chosen = cells[start : start + BATCH]
            batch = {"patch": cut_patches(block, top[chosen], left[chosen], self.patch)}  # (n, band, 5, 5)
            if climate is not None:
                batch["climate"] = climate[chosen if climate_of is None else climate_of[chosen]]
            values = baselines.covariate_features(batch, self.config.bands, self.config.variables, self.months).values
            lower, median, upper = self.fitted.predict(values)
            out["soc_median"][chosen] = median
            out["soc_q05"][chosen], out["soc_q95"][chosen] = lower, upper
            if self.scorer is not None:
                usable = _filled(values[:, self.fitted.usable], self.medians)
                di = self.scorer.di(torch.from_numpy(usable).to(self.device))
                out["di"][chosen] = di.cpu().numpy()
                out["aoa"][chosen] = self.scorer.inside(di).float().cpu().numpy()
        return out
