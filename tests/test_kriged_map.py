"""A tree model with kriged residuals as a map model: `geosoc fit-tabular --model rf+rk`, then `geosoc predict
--model rf+rk`: every cell is the forest's map plus the stored residuals kriged at the cell."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from safetensors.numpy import load as load_arrays
from typer.testing import CliRunner

from geosoc.cli import app
from geosoc.errors import GeosocError
from geosoc.learn import checkpoint
from geosoc.maps.inference import predict
from geosoc.stats.kriging import Variogram, krige
from tests.helpers import copy_region


@pytest.fixture(scope="module")
def region(trained_region: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return copy_region(trained_region, tmp_path_factory.mktemp("kriged"), leave_out=("unlabelled.zarr",))


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_fit_tabular_rf_rk_then_map_it(region: tuple[Path, str], small_forests: None) -> None:
    catalog, root = region
    for model in ("rf", "rf+rk"):
        code, out = _cli("fit-tabular", "--catalog", str(catalog), "--root", root, "--model", model, "--threads", "1")
        assert code == 0 and f"fitted {model} -> {root}/models/{model}" in out, out
    url = Path(root, "models", "rf+rk")
    meta = json.loads((url / "config.json").read_text())
    assert set(meta["files"]) == {"aoa.safetensors", "estimator.skops", "kriging.safetensors"}
    entry = meta["residual_kriging"]
    variogram = Variogram.from_dict(entry["variogram"])
    stored = load_arrays(checkpoint.read_file(str(url), "kriging.safetensors"))
    assert len(stored["residual"]) == len(stored["x"]) > 10 and entry["offset"] > 0
    code, out = _cli("predict", "--catalog", str(catalog), "--root", root, "--model", "rf+rk", "--resolution", "30",
                     "-q")
    assert code == 0, out
    kriged = predict(f"{root}/cube.zarr", model="rf+rk", resolution=30).compute()
    plain = predict(f"{root}/cube.zarr", model="rf", resolution=30).compute()
    valid = np.isfinite(plain["soc_median"].values)
    assert valid.sum() > 100 and np.array_equal(valid, np.isfinite(kriged["soc_median"].values))
    x, y = np.meshgrid(kriged.x.values, kriged.y.values)
    cells = np.stack([x[valid], y[valid]], axis=1)
    expected = krige(np.stack([stored["x"], stored["y"]], axis=1), stored["residual"], cells, variogram,
                     entry["neighbours"])[0]
    added = np.log1p(kriged["soc_median"].values[valid]) - np.log1p(plain["soc_median"].values[valid])
    np.testing.assert_allclose(added, expected, atol=2e-5)  # float32 maps
    np.testing.assert_allclose(kriged["soc_rk_residual"].values[valid], expected, atol=1e-6)  # a layer of its own
    assert "soc_rk_residual" not in plain
    with rasterio.open(Path(root, "maps", "soc_rk_residual.tif")) as cog:  # and a COG of its own
        assert cog.descriptions[0].startswith("residual kriging") and cog.units[0] == "1"
        np.testing.assert_allclose(cog.read(1)[valid], expected, atol=1e-6)
    assert np.isnan(plain["soc_q05"].values[valid]).all()  # the forest has no interval; with kriging it has one
    lower, median, upper = (kriged[n].values[valid] for n in ("soc_q05", "soc_median", "soc_q95"))
    assert (lower <= median).all() and (median <= upper).all() and (upper > lower).any()
    np.testing.assert_array_equal(kriged["aoa"].values, plain["aoa"].values)  # the model's AOA
    written = Path(root, "maps", "soc.zarr")
    assert written.exists()


def test_damaged_residuals_are_refused(region: tuple[Path, str], small_forests: None, tmp_path: Path) -> None:
    import shutil

    catalog, root = region
    source = Path(root, "models", "rf+rk")
    if not source.exists():
        assert _cli("fit-tabular", "--catalog", str(catalog), "--root", root, "--model", "rf+rk")[0] == 0
    damaged = tmp_path / "rf+rk"
    shutil.copytree(source, damaged)
    meta = json.loads((damaged / "config.json").read_text())
    meta["residual_kriging"]["variogram"]["length_scale"] = -1
    (damaged / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GeosocError, match=r"kriging.safetensors: not the residuals of a \+rk model"):
        predict(f"{root}/cube.zarr", model=str(damaged), resolution=30)
    code, out = _cli("fit-tabular", "--catalog", str(catalog), "--root", root, "--model", "hybrid+rk")
    assert code == 1 and "each also with +rk" in out
