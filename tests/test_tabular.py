"""Tree models as map models: `geosoc fit-tabular` then `geosoc predict --model qrf`, the same features at a map
cell as at a sample on it, no pickle, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from geosoc.cli import app
from geosoc.data.sampling import open_sampleset
from geosoc.data.streaming import SampleData
from geosoc.errors import GeosocError
from geosoc.learn import baselines, checkpoint
from geosoc.maps.inference import predict
from geosoc.maps.tabular import ESTIMATOR_FILE, load
from tests.helpers import copy_region


@pytest.fixture(autouse=True)
def _small(small_forests: None) -> None:
    """Every tree model here is small: what is tested is how it is fitted, saved, loaded and mapped."""


@pytest.fixture(scope="module")
def region(trained_region: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return copy_region(trained_region, tmp_path_factory.mktemp("tabular"))


def _cli(*args: str) -> tuple[int, str]:
    """Exit code and output (words joined by one space: paths wrap at 80 columns) of the command, run in this
    process: the command's own code path, without an interpreter start per command."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_fit_tabular_then_map_with_it(region: tuple[Path, str]) -> None:
    catalog, root = region
    code, out = _cli("fit-tabular", "--catalog", str(catalog), "--root", root, "--model", "qrf", "--threads", "1")
    assert code == 0, out
    assert f"fitted qrf -> {root}/models/qrf" in out
    url = f"{root}/models/qrf"
    assert set(json.loads(Path(url, "config.json").read_text())["files"]) == {"aoa.safetensors", ESTIMATOR_FILE}
    assert len(list(Path(url).iterdir())) == 3  # config.json and the two files it names
    code, out = _cli("predict", "--catalog", str(catalog), "--root", root, "--model", "qrf", "--resolution", "30", "-q")
    assert code == 0, out
    ds = predict(f"{root}/cube.zarr", model="qrf", resolution=30).compute()  # lazily, the same model
    # At the cell of each labelled sample the map is the model applied to that sample's own features.
    samples = open_sampleset(f"{root}/samples/labelled.zarr")
    data = SampleData(f"{root}/samples/labelled.zarr")
    features = baselines.covariate_features(data.rows(np.arange(data.size)), data.bands, data.variables, data.time)
    lower, median, upper = load(url).predict(features.values)
    rows = np.searchsorted(-ds.y.values, -samples.y.values)
    cols = np.searchsorted(ds.x.values, samples.x.values)
    np.testing.assert_allclose(ds["soc_median"].values[rows, cols], median, rtol=1e-5)
    np.testing.assert_allclose(ds["soc_q05"].values[rows, cols], lower, rtol=1e-5)
    assert (ds["soc_q05"].values <= ds["soc_q95"].values)[np.isfinite(ds["soc_median"].values)].all()
    assert np.nanmin(ds["aoa"].values[rows, cols]) == 1  # training points are inside the AOA
    written = Path(root) / "maps"
    assert {"soc_median.tif", "soc_q05.tif", "aoa.tif", "item.json"} <= {p.name for p in written.iterdir()}


def test_catalog_predict_model_chooses_the_map_model(region: tuple[Path, str], tmp_path: Path) -> None:
    catalog, root = region
    data = yaml.safe_load(catalog.read_text())
    data["predict"]["model"] = "gbm"
    chosen = tmp_path / "gbm.yaml"
    chosen.write_text(yaml.safe_dump(data))
    code, out = _cli("predict", "--catalog", str(chosen), "--root", root, "--dry-run")
    assert code == 0 and f"{root}/models/gbm" in out and "fit-tabular --model gbm" in out  # not fitted yet: says how
    assert _cli("fit-tabular", "--catalog", str(chosen), "--root", root, "--model", "gbm")[0] == 0
    code, out = _cli("predict", "--catalog", str(chosen), "--root", root, "--dry-run")
    assert code == 0 and f"{root}/models/gbm" in out and "not made yet" not in out


def test_an_estimator_file_with_foreign_types_is_refused(region: tuple[Path, str], tmp_path: Path) -> None:
    import skops.io

    _, root = region
    url = f"{root}/models/rf-tampered"
    config, meta = checkpoint.load_config(f"{root}/models/finetune")
    meta.update(kind="tabular", estimator="rf", usable=[True], medians=[0.0])
    checkpoint.save_files(url, {ESTIMATOR_FILE: skops.io.dumps({"estimators": [np.sum]})}, config, meta)
    with pytest.raises(GeosocError, match="refusing to load it"):
        load(url)
    code, out = _cli("fit-tabular", "--catalog", str(region[0]), "--root", root, "--model", "hybrid")
    assert code == 1 and "maps can be made with rf, gbm, qrf" in out
