"""The model `geosoc evaluate` recommends to map with, chosen by a rule that never reads a held-out fold's targets.

Picking the best pooled R² over the held-out folds selects on the test set: its score flatters the choice. Here
each held-out fold gets its own choice, made on the other folds' scores only (a leave-one-fold-out selection,
as `tests/benchmarks/skill.py` scores it); the recommendation is the model chosen for the most folds, and the
honest score of the rule is that of the per-fold choices on their own held-out folds, pooled. Only models that
can make a map are candidates (`mappable`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from geosoc.evaluation.nested import STACK, base_of, is_kriged
from geosoc.learn import baselines
from geosoc.stats.metrics import regression_metrics

RULE = ("for each held-out fold, the mappable model with the best mean R² over the other folds (that fold's "
        "targets never decide); the model chosen for the most folds, ties to the best mean over the other folds")
NETWORK_MODELS = ("ssl", "supervised")
TREE_MAPS = tuple(name for name in baselines.NAMES if name != "hybrid")  # hybrid needs embeddings at every cell


def mappable(model: str) -> bool:
    """Whether the map commands can make a map with `model` (`geosoc finetune` or `fit-tabular`, then `predict`)."""
    if model == STACK:
        return False
    if is_kriged(model):
        return base_of(model) in TREE_MAPS
    return model in NETWORK_MODELS or model in TREE_MAPS


def per_fold_choices(metrics: pd.DataFrame, candidates: tuple[str, ...]) -> pd.DataFrame:
    """Per (repeat, fold): the candidate with the best mean R² over the *other* folds of that repeat (`model`),
    that mean (`score_elsewhere`) and the candidate's R² on this fold (`r2`)."""
    rows = []
    for (repeat, fold), _ in metrics.groupby(["repeat", "fold"], sort=True):
        others = metrics[(metrics["repeat"] == repeat) & (metrics["fold"] != fold) & metrics["model"].isin(candidates)]
        scores = others.groupby("model")["r2"].mean().dropna()
        if scores.empty:
            continue
        choice = str(scores.idxmax())
        here = metrics[(metrics["repeat"] == repeat) & (metrics["fold"] == fold) & (metrics["model"] == choice)]
        rows.append({"repeat": int(repeat), "fold": int(fold), "model": choice,
                     "score_elsewhere": float(scores[choice]), "r2": float(here["r2"].iloc[0])})
    return pd.DataFrame(rows, columns=["repeat", "fold", "model", "score_elsewhere", "r2"])


def recommend(metrics: pd.DataFrame, predictions: pd.DataFrame) -> dict[str, Any] | None:
    """The recommendation (None when no evaluated model can map): the model, the rule, the per-fold choices and
    the pooled R² of those choices on their held-out folds (the rule's honest score)."""
    candidates = tuple(m for m in metrics["model"].unique() if mappable(str(m)))
    choices = per_fold_choices(metrics, candidates)
    if choices.empty:
        return None
    counts = choices.groupby("model").agg(folds=("fold", "size"), elsewhere=("score_elsewhere", "mean"))
    model = str(counts.sort_values(["folds", "elsewhere"], ascending=False).index[0])
    chosen = pd.concat([predictions[(predictions["model"] == row.model) & (predictions["repeat"] == row.repeat)
                                    & (predictions["fold"] == row.fold)] for row in choices.itertuples()])
    pooled = regression_metrics(chosen["observed"].to_numpy(), chosen["q50"].to_numpy())["r2"]
    return {"model": model, "rule": RULE, "candidates": list(candidates),
            "chosen_for": int(counts.loc[model, "folds"]), "of": len(choices),
            "per_fold": choices.to_dict(orient="records"),
            "choices_pooled_r2": float(pooled) if np.isfinite(pooled) else None,
            "choices_mean_r2": float(choices["r2"].mean())}
