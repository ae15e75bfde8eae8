"""A map's model on a device: the fine-tuned network (normalisation, calibrated interval and area-of-applicability
reference loaded with it), or a tree model through `TabularPredictor`; both predict a window's cells at once."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from geosoc.errors import IncompatibleError
from geosoc.learn import checkpoint
from geosoc.learn.device import precision, resolve_device
from geosoc.maps.outputs import output_names, quantile_name
from geosoc.maps.tabular import TabularPredictor, is_tabular
from geosoc.stats import aoa
from geosoc.stats.calibration import interval

log = logging.getLogger(__name__)

DEFAULT_BATCH = 1024


def load_predictor(model_url: str, device: torch.device | str | None = None,
                   batch_size: int = DEFAULT_BATCH) -> Predictor | TabularPredictor:
    """The predictor of a checkpoint: the network's, or a tree model's (`geosoc fit-tabular`)."""
    if is_tabular(checkpoint.load_config(model_url)[1]):
        return TabularPredictor(model_url, device)
    return Predictor(model_url, device, batch_size)


def require_map_model(url: str, meta: dict[str, Any]) -> None:
    """A map needs a fine-tuned network or a tree model (whose checkpoints before 0.1 said "finetune" too)."""
    if meta.get("stage") != "finetune" and not is_tabular(meta):
        raise IncompatibleError(f"{url}: a {meta.get('stage')!r} checkpoint has no regression head; "
                                "predict needs a fine-tuned model (`geosoc finetune`)")



class Predictor:
    """A fine-tuned checkpoint loaded once on a device: normalisation, calibration and AOA reference with it."""

    def __init__(self, model_url: str, device: torch.device | str | None = None,
                 batch_size: int = DEFAULT_BATCH) -> None:
        self.device = resolve_device(device)
        self.model, meta = checkpoint.load_model(model_url, self.device)
        require_map_model(model_url, meta)
        self.meta = meta
        self.norm = checkpoint.normalisation(model_url, meta)
        self.config = self.model.config
        self.batch_size = batch_size
        self.offset = checkpoint.offset_of(meta)
        reference = checkpoint.load_aoa(model_url)
        if reference is None:
            log.warning("%s has no area-of-applicability reference (fine-tuned before geosoc had one): aoa and di "
                        "are NaN; fine-tune again to get them", model_url)
        self.scorer = aoa.Scorer(reference, self.device) if reference is not None else None
        self.uses_patches = bool(self.config.bands)
        self.uses_climate = bool(self.config.variables)
        self.patch = self.config.patch_size if self.uses_patches else 1
        self.outputs = output_names(self.config.quantiles)
        self._autocast = precision(self.device)

    def predict(self, block: np.ndarray, top: np.ndarray, left: np.ndarray, climate: np.ndarray | None,
                climate_of: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Outputs for cells whose patches start at (top, left) of the imagery `block` (band, h, w).

        Cells whose centre pixel has no data get NaN. `climate` (series, time, variable), when the model uses it,
        holds a series per cell, or per row of it that `climate_of` (cells,) names: the climate branch runs once
        per series."""
        n = len(top)
        out = {name: np.full(n, np.nan, dtype=np.float32) for name in self.outputs}
        if n == 0:
            return out
        half = self.patch // 2
        window = torch.from_numpy(block).to(self.device)
        has_data = ~torch.isnan(window).any(dim=0)
        top_t = torch.from_numpy(top).to(self.device)
        left_t = torch.from_numpy(left).to(self.device)
        valid = has_data[top_t + half, left_t + half]
        cells = torch.nonzero(valid).flatten()
        if len(cells) == 0:
            return out
        raw = {"patch": window} if self.uses_patches else {}
        if self.uses_climate and climate is not None:
            raw["climate"] = torch.from_numpy(climate).to(self.device)
        normalised = self.norm.apply(raw)  # the whole window at once, on the device
        if self.uses_patches:  # every cell's patch as a view of the window: (band, rows, cols, p, p)
            patches = normalised["patch"].unfold(1, self.patch, 1).unfold(2, self.patch, 1)
        results: dict[str, list[torch.Tensor]] = {name: [] for name in self.outputs}
        with torch.no_grad(), self._autocast:
            series = None
            if "climate" in normalised:
                assert self.model.climate is not None
                series = torch.cat([self.model.climate(part) for part in normalised["climate"].split(self.batch_size)])
                if climate_of is not None:
                    series = series[torch.from_numpy(climate_of).to(self.device)]
            for start in range(0, len(cells), self.batch_size):
                chosen = cells[start : start + self.batch_size]
                inputs = {}
                if self.uses_patches:
                    inputs["patch"] = patches[:, top_t[chosen], left_t[chosen]].permute(1, 0, 2, 3)
                if series is not None:
                    inputs["climate_embedding"] = series[chosen]
                features = self.model.features(inputs).float()
                self._collect(results, self.model.quantiles_of(features).float(), features)
        for name, parts in results.items():
            out[name][valid.cpu().numpy()] = torch.cat(parts).cpu().numpy()
        return out

    def _collect(self, results: dict[str, list[torch.Tensor]], z: torch.Tensor, features: torch.Tensor) -> None:
        quantiles = self.config.quantiles
        lower, median, upper = interval(z, quantiles, self.offset)
        z = torch.cat([lower[:, None], z[:, 1:-1], upper[:, None]], dim=1) if z.shape[1] > 1 else z
        decoded = self.norm.decode_target(z)
        results["soc_median"].append(self.norm.decode_target(median))
        for i, q in enumerate(quantiles):
            if q != 0.5:
                results[quantile_name(q)].append(decoded[:, i])
        if self.scorer is not None:
            di = self.scorer.di(features)
            results["di"].append(di)
            results["aoa"].append(self.scorer.inside(di).float())
        else:
            nan = torch.full((len(z),), float("nan"), device=z.device)
            results["di"].append(nan)
            results["aoa"].append(nan)
