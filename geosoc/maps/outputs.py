"""The variables a map holds, named once for the network's and the tree models' predictors."""


def quantile_name(q: float) -> str:
    return f"soc_q{round(q * 100):02d}"


def output_names(quantiles: list[float]) -> list[str]:
    """A map's variables: soc_median (the median), one soc_qXX per other quantile, then aoa and di."""
    return ["soc_median"] + [quantile_name(q) for q in quantiles if q != 0.5] + ["aoa", "di"]


def long_name(output: str) -> str:
    """What a map variable holds, in words (its CF long_name, the COG band description, the STAC asset title)."""
    if output == "soc_median":
        return "soil organic carbon, median prediction"
    if output == "aoa":
        return "inside the area of applicability (1) or not (0)"
    if output == "di":
        return "dissimilarity index (Meyer & Pebesma 2021)"
    return f"soil organic carbon, quantile {output.removeprefix('soc_q')} %"
