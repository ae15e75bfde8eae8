"""The AlphaEarth embedding as covariates: the synthetic embedding's COGs, SampleSets that carry the vectors,
the aef models in `evaluate`, and `fit-tabular` / `predict --model` with them, on one tiny synthetic region."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import yaml

from geosoc.catalog import load_catalog
from geosoc.data.cube import build_cube, embeddings_part, open_cube
from geosoc.data.sampling import open_sampleset
from geosoc.errors import IncompatibleError, InputError
from geosoc.evaluation import campaign
from geosoc.sources.embeddings import dequantise, quantise
from geosoc.sources.synthetic import Landscape
from tests.helpers import labelled_samples, tiny_catalog_dict, tiny_sampleset


@pytest.fixture(scope="module")
def aef_region(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 64 x 64 px region (30 m) with a synthetic embedding at 60 m and 90 labelled samples in 3 folds."""
    folder = tmp_path_factory.mktemp("aef")
    data = tiny_catalog_dict(size_px=64, chunk=32, climate=False)
    data.update(embeddings={"source": "synthetic", "year": 2017, "seed": 7, "resolution": 60, "chunk": 16},
                sampling={"patch_size": 8, "fold_block_size": 600, "folds": 3}, predict={"resolution": 120})
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    catalog = load_catalog(path=path)
    root = str(folder / "root")
    cube = build_cube(catalog, root, progress=False)
    lab = labelled_samples(cube, root, 90)
    return {"catalog": catalog, "root": root, "cube": cube, "points": lab}


def test_quantise_inverts_dequantise() -> None:
    raw = np.arange(-127, 128, dtype=np.int8)
    assert (quantise(dequantise(raw)) == raw).all()
    assert quantise(np.array([np.nan]))[0] == -128


def test_synthetic_cogs_and_cube(aef_region: dict[str, Any]) -> None:
    """The demo's embedding is written as the dataset's files are (int8, 64 bands, -128 no data, year/zone
    folders) and read back into the cube as unit vectors."""
    files = sorted(Path(aef_region["root"], "sources", "aef-synthetic").glob("*/2017/32N/*.tiff"))
    assert len(files) == 1
    with rasterio.open(files[0]) as src:
        assert (src.count, src.dtypes[0], src.nodata, src.crs.to_epsg()) == (64, "int8", -128, 32632)
        assert src.descriptions[0] == "A00"
    ds, grid = embeddings_part(aef_region["cube"]) or (None, None)
    assert ds is not None and grid is not None and grid.resolution == 60
    vectors = ds["data"].values.reshape(64, -1)
    assert np.allclose(np.sqrt((vectors**2).sum(axis=0)), 1, atol=1e-4)
    assert open_cube(aef_region["cube"])["embeddings"].to_dataset()["data"].attrs["source"] == "synthetic"


def test_synthetic_vectors_carry_the_latents() -> None:
    """Over the demo's 30 km (150 m spacing), a linear read-out of the vectors recovers the latents they are made
    from (through the noise: the smooth ones, which vary little there, in part), and SOC, which they never see,
    only in part."""
    from geosoc.sources.aef_synthetic import vectors

    x, y = np.meshgrid(4419990 + 150 * np.arange(200), 2840700 - 150 * np.arange(200))
    fields = Landscape(0).fields(x, y, "EPSG:3035")
    design = np.column_stack([vectors(Landscape(0), x, y, "EPSG:3035", 0).reshape(64, -1).T, np.ones(x.size)])

    def r2(target: np.ndarray) -> float:
        keep = np.isfinite(target.ravel())
        fitted = design[keep] @ np.linalg.lstsq(design[keep], target.ravel()[keep], rcond=None)[0]
        return float(1 - np.var(target.ravel()[keep] - fitted) / np.var(target.ravel()[keep]))

    assert r2(fields["mosaic"]) > 0.85 and r2(fields["clay"]) > 0.5
    assert r2(fields["elevation"]) > 0.35 and r2(fields["wet"]) > 0.35
    assert 0.3 < r2(np.log(fields["soc"])) < 0.9


def test_sampleset_carries_the_embedding_window(aef_region: dict[str, Any]) -> None:
    samples = open_sampleset(f"{aef_region['root']}/samples/labelled.zarr")
    assert samples["embedding"].dims == ("sample", "embedding_band", "ey", "ex")
    assert samples["embedding"].shape[1:] == (64, 5, 5) and samples.attrs["has_embeddings"]
    assert samples.attrs["embeddings"]["source"] == "synthetic" and samples.attrs["embeddings"]["resolution"] == 60
    ds, grid = embeddings_part(aef_region["cube"]) or (None, None)
    assert ds is not None and grid is not None
    rows, cols = grid.rowcol(samples["x"].values, samples["y"].values)
    centre = ds["data"].values[:, rows, cols].T
    assert np.array_equal(samples["embedding"].values[:, :, 2, 2], centre)
    assert campaign.default_models(samples) == (*campaign.MODELS, *campaign.AEF_MODELS)


def test_evaluate_the_aef_models(aef_region: dict[str, Any], small_forests: None) -> None:
    """The forests here; aef-hybrid is the hybrid's boosting (tested with it) on covariates + embedding (its
    OpenMP boosting takes a minute on a busy 2-core machine instead of seconds, so it is left out)."""
    from geosoc.learn import baselines

    assert baselines.INPUTS["aef-hybrid"] == ("covariates", "aef") and baselines.ESTIMATOR["aef-hybrid"] == "gbm"
    models = ("qrf", "aef-rf", "aef-qrf", "aef+cov-qrf")
    result = campaign.evaluate_region(aef_region["catalog"].config, aef_region["root"], models=models,
                                      progress=False)
    assert list(result.summary["models"]) == list(models)
    for model in models:
        pooled = result.summary["models"][model]["pooled"]
        assert pooled["rmse"] is not None and (pooled["picp"] is None) == (model == "aef-rf")
    assert set(result.metrics["fold"]) == {0, 1, 2} and (result.predictions["q50"] > 0).all()
    again = campaign.evaluate_region(aef_region["catalog"].config, aef_region["root"], models=("aef-qrf",),
                                     progress=False)
    assert again.summary["models"]["aef-qrf"]["reused_runs"] == 3


def test_aef_models_need_a_sampleset_with_embeddings(tmp_path: Path, write_catalog) -> None:
    root = tmp_path / "root"
    tiny_sampleset(str(root / "samples" / "labelled.zarr"))
    catalog = load_catalog(path=write_catalog(tiny_catalog_dict())).config
    with pytest.raises(InputError, match=r"labelled.zarr has no AlphaEarth embeddings, which aef-qrf read: add an "
                                         r"`embeddings:` section to the catalog"):
        campaign.evaluate_region(catalog, str(root), models=("qrf", "aef-qrf"), progress=False)
    assert campaign.default_models(open_sampleset(str(root / "samples" / "labelled.zarr"))) == campaign.MODELS
    with pytest.raises(InputError, match="unknown model"):
        campaign.evaluate_region(catalog, str(root), models=("aef-gbm",), progress=False)


def test_fit_tabular_and_map_with_aef_qrf(aef_region: dict[str, Any], small_forests: None, tmp_path: Path) -> None:
    """`fit-tabular --model aef-qrf` then a map: the cells' features come from the cube's embeddings group,
    the AOA is in the same feature space, and a cube without embeddings is refused before any work."""
    from geosoc.maps import tabular
    from geosoc.maps.inference import predict

    url = tabular.fit_region(aef_region["catalog"].config, aef_region["root"], "aef-qrf",
                             out=str(tmp_path / "aef-qrf"))
    fitted = tabular.load(url)
    assert fitted.name == "qrf" and len(fitted.usable) == 128
    soc = predict(aef_region["cube"], url, resolution=120, progress=False).compute()
    median = soc["soc_median"].values
    assert np.isfinite(median).mean() > 0.5 and np.nanmin(median) > 0
    assert np.isfinite(soc["di"].values).sum() == np.isfinite(median).sum()
    plain = str(tmp_path / "plain")
    data = tiny_catalog_dict(size_px=64, chunk=32, climate=False)
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(data))
    cube = build_cube(load_catalog(path=tmp_path / "plain.yaml"), plain, progress=False)
    with pytest.raises(IncompatibleError, match="reads the AlphaEarth embedding, but .* has no embeddings group"):
        predict(cube, url, resolution=120, progress=False)
