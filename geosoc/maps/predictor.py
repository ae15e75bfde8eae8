"""A map's model on a device: the fine-tuned network (normalisation, calibrated interval and area-of-applicability
reference loaded with it), or a tree model through `TabularPredictor`; both predict a window's cells at once."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from geosoc.errors import IncompatibleError
from geosoc.learn import checkpoint
from geosoc.learn.checkpoint import is_tabular
from geosoc.learn.device import precision, resolve_device
from geosoc.learn.ensemble import Member, load_members
from geosoc.maps.outputs import output_names, quantile_name
from geosoc.stats import aoa
from geosoc.stats.calibration import interval

if TYPE_CHECKING:  # a tree model's predictor is imported when one is loaded: Ray's map actors of the network
    # then start without the SampleSet and cube readers it needs (xarray, pandas, dask: ~1 s of each start)
    from geosoc.maps.tabular import TabularPredictor

log = logging.getLogger(__name__)

DEFAULT_BATCH = 1024


def load_predictor(model_url: str, device: torch.device | str | None = None,
                   batch_size: int = DEFAULT_BATCH) -> Predictor | TabularPredictor:
    """The predictor of a checkpoint: the network's, or a tree model's (`geosoc fit-tabular`)."""
    if is_tabular(checkpoint.load_config(model_url)[1]):
        from geosoc.maps.tabular import TabularPredictor

        return TabularPredictor(model_url, device)
    return Predictor(model_url, device, batch_size)


def require_map_model(url: str, meta: dict[str, Any]) -> None:
    """A map needs a fine-tuned network or a tree model (whose checkpoints before 0.1 said "finetune" too)."""
    if meta.get("stage") != "finetune" and not is_tabular(meta):
        raise IncompatibleError(f"{url}: a {meta.get('stage')!r} checkpoint has no regression head; "
                                "predict needs a fine-tuned model (`geosoc finetune`)")



class Predictor:
    """A fine-tuned checkpoint loaded once on a device (every member of an ensemble): normalisation, calibration
    and, from member 0, the AOA reference with it."""

    def __init__(self, model_url: str, device: torch.device | str | None = None,
                 batch_size: int = DEFAULT_BATCH) -> None:
        self.device = resolve_device(device)
        self.members, self.meta = load_members(model_url, self.device)
        require_map_model(model_url, self.meta)
        self.model = self.members[0].model
        self.config = self.model.config
        self.batch_size = batch_size
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
                climate_of: np.ndarray | None = None, embedding: Any = None) -> dict[str, np.ndarray]:
        """Outputs for cells whose patches start at (top, left) of the imagery `block` (band, h, w).

        Cells whose centre pixel has no data get NaN. `climate` (series, time, variable), when the model uses it,
        holds a series per cell, or per row of it that `climate_of` (cells,) names: the climate branch runs once
        per series that a cell with data reads. An ensemble's quantiles are its members' averaged; di and aoa are
        member 0's."""
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
        which = torch.from_numpy(climate_of).to(self.device) if climate_of is not None else None
        totals: dict[str, torch.Tensor] = {}
        for k, member in enumerate(self.members):
            results = self._member(member, raw, cells, top_t[cells], left_t[cells], which, scored=k == 0)
            for name, values in results.items():
                totals[name] = values if name not in totals else totals[name] + values
        for name, values in totals.items():
            averaged = values if name in ("di", "aoa") else values / len(self.members)
            out[name][valid.cpu().numpy()] = averaged.cpu().numpy()
        return out

    def _member(self, member: Member, raw: dict[str, torch.Tensor], cells: torch.Tensor, tops: torch.Tensor,
                lefts: torch.Tensor, climate_of: torch.Tensor | None, scored: bool) -> dict[str, torch.Tensor]:
        """One member's outputs for `cells` (di and aoa too when `scored`)."""
        normalised = member.norm.apply(raw)  # the whole window at once, on the device
        if self.uses_patches:  # every cell's patch as a view of the window: (rows, cols, band, p, p), so that
            # the patches a batch gathers come out as (cells, band, p, p) in memory order: no copy to reorder them
            patches = normalised["patch"].unfold(1, self.patch, 1).unfold(2, self.patch, 1).permute(1, 2, 0, 3, 4)
        results: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad(), self._autocast:
            series = None
            if "climate" in normalised:  # once per climate series that a cell with data reads: a coastal
                assert member.model.climate is not None  # window's sea cells have series but no patches
                rows = climate_of[cells] if climate_of is not None else cells
                used, series_of = torch.unique(rows, return_inverse=True)
                series = torch.cat([member.model.climate(part)
                                    for part in normalised["climate"][used].split(self.batch_size)])[series_of]
            for start in range(0, len(cells), self.batch_size):
                part = slice(start, start + self.batch_size)
                inputs = {}
                if self.uses_patches:
                    inputs["patch"] = patches[tops[part], lefts[part]]
                if series is not None:
                    inputs["climate_embedding"] = series[part]
                features = member.model.features(inputs).float()
                self._collect(results, member, member.model.quantiles_of(features).float(), features, scored)
        return {name: torch.cat(parts) for name, parts in results.items()}

    def _collect(self, results: dict[str, list[torch.Tensor]], member: Member, z: torch.Tensor,
                 features: torch.Tensor, scored: bool) -> None:
        quantiles = self.config.quantiles
        lower, median, upper = interval(z, quantiles, member.offset)
        z = torch.cat([lower[:, None], z[:, 1:-1], upper[:, None]], dim=1) if z.shape[1] > 1 else z
        decoded = member.norm.decode_target(z)
        results.setdefault("soc_median", []).append(member.norm.decode_target(median))
        for i, q in enumerate(quantiles):
            if q != 0.5:
                results.setdefault(quantile_name(q), []).append(decoded[:, i])
        if not scored:
            return
        if self.scorer is not None:
            di = self.scorer.di(features)
            results.setdefault("di", []).append(di)
            results.setdefault("aoa", []).append(self.scorer.inside(di).float())
        else:
            nan = torch.full((len(z),), float("nan"), device=z.device)
            results.setdefault("di", []).append(nan)
            results.setdefault("aoa", []).append(nan)
