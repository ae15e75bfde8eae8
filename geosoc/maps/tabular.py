"""Tree models as map models: when `geosoc evaluate` finds that a random forest, quantile forest or gradient
boosting beats the network, the map can be made with it.

`fit_region` fits the chosen model on every labelled sample of a region (features from `baselines`), with the
area-of-applicability reference in the space of those covariates (CAST's own choice), and writes it as a
checkpoint folder like the network's: `config.json` (the same manifest, `"kind": "tabular"`) naming
`aoa.safetensors` and `estimator.skops`. skops stores the estimators without pickle; loading accepts only the
tree types these models are made of and refuses a file holding anything else. `TabularPredictor` makes the map
from it with the same per-window interface as the network's predictor.

The `aef-*` models read the AlphaEarth embedding too: their SampleSet's `embedding` at fitting, and at every map
cell the 5 x 5 cells of the cube's `embeddings` group around it; their AOA is in that feature space as well.

A `<model>+rk` (e.g. `qrf+rk`) is the model plus ordinary kriging of its residuals (`maps.kriged`): its
folder holds the model and `kriging.safetensors`, and its map adds the kriged residual at every cell.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from geosoc.catalog import Catalog
from geosoc.data.sampling import EMBEDDING_PATCH, cut_patches, open_sampleset
from geosoc.errors import DamagedError, IncompatibleError, InputError, first_line
from geosoc.io.locks import exclusive
from geosoc.io.storage import join
from geosoc.learn import baselines, checkpoint
from geosoc.learn.checkpoint import is_tabular
from geosoc.learn.device import resolve_device
from geosoc.learn.models import NetworkConfig
from geosoc.maps.kriged import META, ResidualField, base_model, fit_residuals
from geosoc.maps.outputs import model_outputs
from geosoc.stats import aoa

ESTIMATOR_FILE = "estimator.skops"
BATCH = 65536  # map cells per scikit-learn call: it is fastest on large batches
MAP_MODELS = ("rf", "gbm", "qrf", "aef-rf", "aef-qrf", "aef+cov-qrf", "aef-hybrid")
ESTIMATOR_KINDS = ("rf", "gbm", "qrf")  # config.json's 'estimator' (`baselines.ESTIMATOR`)
# Types skops does not trust by default, and that these models legitimately contain.
TRUSTED = frozenset({
    "numpy.dtype",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "quantile_forest._quantile_forest.RandomForestQuantileRegressor",
    "quantile_forest._quantile_forest_fast.QuantileForest",
})


def fits(name: str) -> bool:
    """Whether `fit-tabular` makes model `name`: a tree model of MAP_MODELS, or one with `+rk`."""
    return base_model(name) in MAP_MODELS


def fit_region(catalog: Catalog, root: str, name: str, *, out: str | None = None, threads: int = 1) -> str:
    """`geosoc fit-tabular`: the model `name` fitted on all labelled samples of the region -> models/<name>."""
    from geosoc.learn.training import stage_urls

    if not fits(name):
        raise InputError(f"--model {name!r}: maps can be made with {', '.join(MAP_MODELS)}, each also with "
                         "+rk (its residuals kriged, e.g. qrf+rk) (the network is "
                         "`geosoc finetune`; hybrid needs the encoders' embeddings at every cell, not supported yet; "
                         "aef-hybrid maps)")
    out = out or join(root, "models", name)
    with exclusive(out, "fit-tabular"):  # one writer; also the check, before any work, that the folder takes writes
        return _fit_and_save(catalog, stage_urls(root)["labelled"], name, out, threads)


def _fit_and_save(catalog: Catalog, url: str, model: str, out: str, threads: int) -> str:
    from geosoc.data.streaming import SampleData

    data = SampleData(url)
    labelled = np.flatnonzero(np.isfinite(data.target))
    if len(labelled) < 10:
        raise InputError(f"{url}: only {len(labelled)} labelled samples; a tree model needs at least 10")
    name = base_model(model)  # the tree model; `model` may add +rk
    samples = open_sampleset(url) if baselines.uses_aef(name) else None  # the embedding is read from it, once
    features = _training_features(url, name, data, labelled, samples)
    seed = catalog.training.seed
    fitted = baselines.fit(name, features.values, data.target[labelled], seed, threads, groups=data.fold[labelled])
    medians = _medians(features.values[:, fitted.usable])
    reference = aoa.fit(_filled(features.values[:, fitted.usable], medians), data.fold[labelled], seed)
    files: dict[str, bytes] = {}
    kriging: dict[str, Any] = {}
    if model != name:
        xy = np.stack([data.x[labelled], data.y[labelled]], axis=1)
        files, entry = fit_residuals(name, features.values, data.target[labelled], data.fold[labelled], xy,
                                     seed, threads)
        kriging = {META: entry}
    config = NetworkConfig(bands=data.bands, variables=data.variables, patch_size=baselines.WINDOW,
                           months=data.months, quantiles=list(baselines.QUANTILES))
    months = [str(m) for m in data.time.astype("datetime64[M]")] if data.time is not None else None
    meta = {"stage": "fit-tabular", "kind": "tabular", "estimator": baselines.ESTIMATOR[name], "tabular_model": name,
            "samples": url, "seed": seed, **_embedding_meta(samples),
            "units": data.attrs.get("units", ""), "features": features.names, "usable": fitted.usable.tolist(),
            "medians": medians.tolist(), "months": months,
            "calibration": {"method": "cqr", "offset": fitted.offset, "space": "log1p"} if fitted.offset else {},
            **kriging}
    import skops.io

    checkpoint.save_files(out, {ESTIMATOR_FILE: skops.io.dumps({"estimators": fitted.estimators}),
                                checkpoint.AOA_FILE: reference.to_bytes(), **files}, config, meta)
    return out


def _training_features(url: str, name: str, data: Any, labelled: np.ndarray, samples: Any) -> baselines.Features:
    """The model's features of the labelled samples: covariates and/or AlphaEarth embedding features."""
    parts = []
    if "covariates" in baselines.INPUTS[name]:
        parts.append(baselines.covariate_features(data.rows(labelled), data.bands, data.variables, data.time))
    if samples is not None:
        baselines.require_embeddings(samples, url, (name,))
        parts.append(baselines.aef_features(samples, labelled))
    return baselines.Features(np.concatenate([p.values for p in parts], axis=1),
                              [n for p in parts for n in p.names])


def _embedding_meta(samples: Any) -> dict[str, Any]:
    """What a map of an aef model must find in the cube: the embedding's axes and window, and where it came from
    (nothing for a model without embeddings: `samples` is None)."""
    if samples is None:
        return {}
    return {"embedding_bands": [str(b) for b in samples["embedding_band"].values], "embedding_patch": EMBEDDING_PATCH,
            "embeddings": samples.attrs.get("embeddings", {})}


def _medians(values: np.ndarray) -> np.ndarray:
    """Per-feature training medians: what a missing covariate is taken to be in the AOA's distances."""
    return np.nan_to_num(np.nanmedian(values, axis=0)) if len(values) else np.zeros(values.shape[1])


def _filled(values: np.ndarray, medians: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(values), medians[None, :], values)


def load(url: str) -> baselines.Fitted:
    """The fitted estimators of a tree model's checkpoint, after checking every entry of its config.json that
    mapping reads and that its estimator file holds what `fit_region` writes and nothing else (see `_stored`):
    a damaged or hostile checkpoint is one DamagedError naming the file, before any work."""
    config, meta = checkpoint.load_config(url)
    where = join(url, ESTIMATOR_FILE)
    data = checkpoint.read_file(url, ESTIMATOR_FILE)
    _audit(where, data)  # foreign content is refused as such, whatever else is wrong
    problem = _meta_problem(config, meta)
    if problem is not None:
        raise DamagedError(f"{join(url, checkpoint.CONFIG_FILE)}: {problem}; {checkpoint.FRESH_HINT}")
    estimators = _stored(where, data)
    fitted = baselines.Fitted(meta["estimator"], estimators, np.asarray(meta["usable"], dtype=bool),
                              checkpoint.offset_of(meta))
    try:  # inspecting what the file built: a hostile file's objects may fail in any way
        problem = _estimators_problem(fitted)
    except Exception as err:
        problem = f"its estimators cannot be used ({type(err).__name__}: {first_line(err)})"
    if problem is not None:
        raise DamagedError(f"{where}: {problem}; {checkpoint.FRESH_HINT}")
    return fitted


# The entries of a tree model's config.json that mapping reads, each written by `fit_region` since the first
# version (`tabular_model` later: older ones name their estimator only); `months` is null for series without dates.
REQUIRED_ENTRIES = ("kind", "estimator", "units", "features", "usable", "medians", "months")


def _meta_problem(config: NetworkConfig, meta: dict[str, Any]) -> str | None:
    """What in a tree model's config.json does not describe one (None when nothing does): the entries the map
    reads, each present and against the others."""
    missing = [name for name in REQUIRED_ENTRIES if name not in meta]
    if missing:
        return (f"{', '.join(repr(name) for name in missing)} {'is' if len(missing) == 1 else 'are'} missing (a tree "
                f"model's map reads {', '.join(REQUIRED_ENTRIES)})")
    if not is_tabular(meta) or meta.get("estimator") not in ESTIMATOR_KINDS:
        return f"not a tree model's ('kind' must be 'tabular' and 'estimator' one of {', '.join(ESTIMATOR_KINDS)})"
    model = model_name(meta)
    if model not in MAP_MODELS or baselines.ESTIMATOR[model] != meta["estimator"]:
        return f"'tabular_model' must be one of {', '.join(MAP_MODELS)} whose estimator is 'estimator', got {model!r}"
    bands = meta.get("embedding_bands")
    if baselines.uses_aef(model) and (not isinstance(bands, list) or not bands or meta.get("embedding_patch")
                                      not in (1, 3, 5, 7) or not all(isinstance(b, str) for b in bands)):
        return "an aef model needs 'embedding_bands' (names) and 'embedding_patch' (an odd window of cells)"
    if config.patch_size != baselines.WINDOW or config.quantiles != list(baselines.QUANTILES):
        return (f"a tree model reads the {baselines.WINDOW} px window around a cell ('patch_size') and predicts the "
                f"quantiles {list(baselines.QUANTILES)}; this one says {config.patch_size} and {config.quantiles}")
    if not isinstance(meta["units"], str):
        return f"'units' must be the target's units as text, got {meta['units']!r}"
    try:
        months = _months(meta["months"], config.months)
    except ValueError as err:
        return f"'months': {err}"
    usable, medians = meta.get("usable"), meta.get("medians")
    if meta.get("features") != _feature_names(config, months, meta):
        return "'features' are not those of the bands, variables and months in 'model'"
    if (not isinstance(usable, list) or len(usable) != len(meta["features"]) or not any(usable)
            or not all(isinstance(u, bool) for u in usable)):
        return "'usable' must say true or false for each of 'features', true for at least one"
    if not isinstance(medians, list) or len(medians) != sum(usable) or not all(map(checkpoint.is_number, medians)):
        return "'medians' must hold a number for each usable feature"
    return None


def _months(value: Any, count: int) -> np.ndarray | None:
    """The months of a tree model's climate series ("YYYY-MM", `count` of them), or None when it has none."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != count or not all(isinstance(m, str) for m in value):
        raise ValueError(f"expected the {count} months of 'model' as YYYY-MM, got {value!r}")
    try:
        return np.array(value, dtype="datetime64[M]")
    except ValueError as err:
        raise ValueError(f"expected months as YYYY-MM ({err})") from err


def model_name(meta: dict[str, Any]) -> str:
    """The model a tree checkpoint is (checkpoints before the aef models name their estimator only)."""
    return str(meta.get("tabular_model", meta.get("estimator")))


def _feature_names(config: NetworkConfig, months: np.ndarray | None, meta: dict[str, Any]) -> list[str]:
    """The features of a model of these bands, variables and months (and embedding axes), from one blank sample."""
    model = model_name(meta)
    names = []
    if "covariates" in baselines.INPUTS[model]:
        series = len(months) if months is not None else config.months
        blank = {"patch": np.zeros((1, len(config.bands), baselines.WINDOW, baselines.WINDOW), np.float32),
                 "climate": np.zeros((1, series, len(config.variables)), np.float32)}
        names += baselines.covariate_features(blank, config.bands, config.variables, months).names
    if baselines.uses_aef(model):
        size, bands = int(meta["embedding_patch"]), list(meta["embedding_bands"])
        names += baselines.embedding_features(np.zeros((1, len(bands), size, size), np.float32), bands).names
    return names


def _audit(where: str, data: bytes) -> None:
    """Refuse a skops file holding any type outside those a tree model is made of, from its schema alone (no
    object is made). Whatever the parse of the bytes raises is the file's damage: skops raises what a damaged
    zip or schema makes it meet (BadZipFile, KeyError, JSONDecodeError, ...)."""
    import skops.io

    if not data:
        raise DamagedError(f"{where}: empty; {checkpoint.FRESH_HINT}")
    try:
        unexpected = sorted(set(skops.io.get_untrusted_types(data=data)) - TRUSTED)
    except Exception as err:
        raise _unreadable(where, err) from err
    if unexpected:
        raise DamagedError(f"{where} holds types a geosoc tree model never contains: {unexpected}; refusing to load it")


def _stored(where: str, data: bytes) -> list[Any]:
    """The estimators in an audited skops file; skops audits it again, against the same types, before it makes
    any object (nothing is unpickled)."""
    import skops.io

    try:
        stored = skops.io.loads(data, trusted=sorted(TRUSTED))
    except Exception as err:
        raise _unreadable(where, err) from err
    estimators = stored.get("estimators") if isinstance(stored, dict) else None
    if not isinstance(estimators, list):
        raise DamagedError(f"{where}: expected {{'estimators': [...]}}, got a {type(stored).__name__}; "
                           f"{checkpoint.FRESH_HINT}")
    return estimators


def _unreadable(where: str, err: Exception) -> DamagedError:
    return DamagedError(f"{where}: not a skops file of tree models ({type(err).__name__}: {first_line(err)}); "
                        f"{checkpoint.FRESH_HINT}")


ESTIMATORS = {"rf": ("RandomForestRegressor", 1), "qrf": ("RandomForestQuantileRegressor", 1),
              "gbm": ("HistGradientBoostingRegressor", len(baselines.QUANTILES))}  # what `baselines.fit` makes


def _estimators_problem(fitted: baselines.Fitted) -> str | None:
    """What makes the stored estimators not those of `fitted.name` on its usable features (None when nothing
    does): their kind and number, their trees' structure, then one prediction, so that mapping cannot fail."""
    kind, count = ESTIMATORS[fitted.name]
    features = int(fitted.usable.sum())
    if len(fitted.estimators) != count:
        return f"{len(fitted.estimators)} estimators, a {fitted.name} model has {count}"
    for estimator in fitted.estimators:
        model = getattr(estimator, "_final_estimator", estimator)  # after a pipeline's imputer
        if type(model).__name__ != kind or getattr(estimator, "n_features_in_", None) != features:
            return (f"expected {kind} models of {features} features (config.json's 'usable'), found a "
                    f"{type(model).__name__} of {getattr(estimator, 'n_features_in_', None)}")
        problem = _trees_problem(model, features)
        if problem is not None:
            return problem
    fitted.predict(np.zeros((1, len(fitted.usable)), np.float32))
    return None


def _trees_problem(model: Any, features: int) -> str | None:
    """Every tree must lead from its root down to leaves and split on features the model has; a quantile forest's
    leaves must name training samples it holds. A damaged tree would make a prediction read outside its arrays
    or loop for ever."""
    trees = [(t.tree_.children_left, t.tree_.children_right, t.tree_.feature, t.tree_.children_left == -1)
             for t in getattr(model, "estimators_", [])]  # forests
    trees += [(p.nodes["left"], p.nodes["right"], p.nodes["feature_idx"], p.nodes["is_leaf"] != 0)
              for predictors in getattr(model, "_predictors", []) for p in predictors  # histogram boosting
              if not p.nodes["is_categorical"].any()]  # never fitted here: such a tree is left out, and refused
    expected = len(getattr(model, "estimators_", [])) + sum(map(len, getattr(model, "_predictors", [])))
    if len(trees) != expected or not all(_tree_ok(*tree, features) for tree in trees):
        return "a tree that does not lead from its root to leaves, or splits on a feature the model does not have"
    forest = getattr(model, "forest_", None)
    if forest is not None:
        leaves, samples = np.asarray(forest.y_train_leaves), np.asarray(forest.y_train).shape[-1]
        nodes = max((len(tree[0]) for tree in trees), default=0)
        if (leaves.ndim != 4 or leaves.shape[0] != len(trees) or leaves.shape[1] < nodes or leaves.min() < 0
                or leaves.max() > samples):  # indices from 1; 0 pads
            return "a quantile forest whose leaves do not name its training samples"
    return None


def _tree_ok(left: np.ndarray, right: np.ndarray, feature: np.ndarray, leaf: np.ndarray, features: int) -> bool:
    """Each inner node's children come after it (so every path ends at a leaf) and it splits on a feature."""
    index = np.arange(len(left))
    inner = ~np.asarray(leaf, dtype=bool)
    left, right, feature = (np.asarray(a, dtype=np.int64)[inner] for a in (left, right, feature))
    return len(index) > 0 and bool(((left > index[inner]) & (left < len(index)) & (right > index[inner])
                                    & (right < len(index)) & (feature >= 0) & (feature < features)).all())


EmbeddingWindow = tuple[np.ndarray, np.ndarray, np.ndarray]  # (band, h, w) embedding block, each cell's top, left


class TabularPredictor:
    """A tree model applied to map cells: per cell the same features as its training samples (the 5 x 5 px
    window around the cell's pixel and the climate series; for aef models the 5 x 5 embedding cells around it),
    then the model, then the AOA distance in that feature space. Runs on the host (scikit-learn); `device` only
    places the AOA distances."""

    def __init__(self, model_url: str, device: torch.device | str | None = None) -> None:
        self.device = resolve_device(device)
        self.config, self.meta = checkpoint.load_config(model_url)
        self.fitted = load(model_url)
        reference = checkpoint.load_aoa(model_url, features=int(self.fitted.usable.sum()))
        self.scorer = aoa.Scorer(reference, self.device) if reference is not None else None
        self.residuals = ResidualField(model_url, self.meta) if META in self.meta else None  # +rk
        self.medians = np.asarray(self.meta["medians"], dtype=np.float64)
        self.months = np.array(self.meta["months"], dtype="datetime64[M]") if self.meta.get("months") else None
        self.model = model_name(self.meta)
        self.uses_covariates = "covariates" in baselines.INPUTS[self.model]
        self.uses_patches = bool(self.config.bands)
        self.uses_climate = bool(self.config.variables) and self.uses_covariates
        self.embedding_bands: list[str] = list(self.meta.get("embedding_bands") or [])
        self.embedding_patch = int(self.meta.get("embedding_patch") or 0)  # 0: no embedding
        self.patch = baselines.WINDOW
        self.outputs = model_outputs(self.config.quantiles, self.meta)

    def predict(self, block: np.ndarray, top: np.ndarray, left: np.ndarray, climate: np.ndarray | None,
                climate_of: np.ndarray | None = None,
                embedding: EmbeddingWindow | None = None) -> dict[str, np.ndarray]:
        """Outputs for cells whose 5 x 5 windows start at (top, left) of `block` (band, h, w); NaN where the
        cell's pixel has no data. `climate` holds a series per cell, or per row of it that `climate_of` names;
        `embedding` the embedding block and where each cell's window starts in it (aef models)."""
        if self.embedding_patch and embedding is None:
            raise IncompatibleError(f"{self.model} reads the AlphaEarth embedding at every cell, and none was given")
        out = {name: np.full(len(top), np.nan, dtype=np.float32) for name in self.outputs}
        half = self.patch // 2
        valid = ~np.isnan(block[:, top + half, left + half]).any(axis=0)
        cells = np.flatnonzero(valid)
        for start in range(0, len(cells), BATCH):
            chosen = cells[start : start + BATCH]
            parts = []
            if self.uses_covariates:
                batch = {"patch": cut_patches(block, top[chosen], left[chosen], self.patch)}  # (n, band, 5, 5)
                if climate is not None:
                    batch["climate"] = climate[chosen if climate_of is None else climate_of[chosen]]
                parts.append(baselines.covariate_features(batch, self.config.bands, self.config.variables,
                                                          self.months).values)
            if embedding is not None and self.embedding_patch:
                vectors, e_top, e_left = embedding
                cut = cut_patches(vectors, e_top[chosen], e_left[chosen], self.embedding_patch)
                parts.append(baselines.embedding_features(cut, self.embedding_bands).values)
            values = np.concatenate(parts, axis=1)
            lower, median, upper = self.fitted.predict(values)
            out["soc_median"][chosen] = median
            out["soc_q05"][chosen], out["soc_q95"][chosen] = lower, upper
            if self.scorer is not None:
                usable = _filled(values[:, self.fitted.usable], self.medians)
                di = self.scorer.di(torch.from_numpy(usable).to(self.device))
                out["di"][chosen] = di.cpu().numpy()
                out["aoa"][chosen] = self.scorer.inside(di).float().cpu().numpy()
        return out
