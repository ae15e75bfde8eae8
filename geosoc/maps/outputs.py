"""The variables a map holds, named once for the network's and the tree models' predictors."""

from __future__ import annotations

from typing import Any


def quantile_name(q: float) -> str:
    return f"soc_q{round(q * 100):02d}"


KRIGED_RESIDUAL = "soc_rk_residual"  # a `+rk` model's kriged residual, exported as a COG of its own
RESIDUAL_KRIGING = "residual_kriging"  # the config.json entry of a `+rk` model (its variogram, offset, neighbours)


def output_names(quantiles: list[float], kriged: bool = False) -> list[str]:
    """A map's variables: soc_median (the median), one soc_qXX per other quantile, the kriged residual of a `+rk`
    model (`kriged`), then aoa and di."""
    return (["soc_median"] + [quantile_name(q) for q in quantiles if q != 0.5] + ([KRIGED_RESIDUAL] if kriged else [])
            + ["aoa", "di"])


def model_outputs(quantiles: list[float], meta: dict[str, Any]) -> list[str]:
    """The variables of a map made with the model whose config.json entries are `meta`."""
    return output_names(quantiles, kriged=RESIDUAL_KRIGING in meta)


def long_name(output: str) -> str:
    """What a map variable holds, in words (its CF long_name, the COG band description, the STAC asset title)."""
    if output == "soc_median":
        return "soil organic carbon, median prediction"
    if output == "aoa":
        return "inside the area of applicability (1) or not (0)"
    if output == "di":
        return "dissimilarity index (Meyer & Pebesma 2021)"
    if output == KRIGED_RESIDUAL:
        return "residual kriging: the model's log1p SOC residual kriged at the cell, added to its log1p median"
    return f"soil organic carbon, quantile {output.removeprefix('soc_q')} %"
