"""The variables a map holds, named once for the network's and the tree models' predictors."""


def quantile_name(q: float) -> str:
    return f"soc_q{round(q * 100):02d}"


def output_names(quantiles: list[float]) -> list[str]:
    """A map's variables: soc_median (the median), one soc_qXX per other quantile, then aoa and di."""
    return ["soc_median"] + [quantile_name(q) for q in quantiles if q != 0.5] + ["aoa", "di"]
