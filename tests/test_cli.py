"""The `geosoc` command as users run it: exit codes, messages without tracebacks, dry runs that write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geosoc.cli import app
from tests.conftest import tiny_catalog_dict

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "build-cube" in result.output and "demo" in result.output


def test_unknown_region_is_a_clear_error(tmp_path: Path) -> None:
    result = run("build-cube", "--region", "atlantis", "--root", str(tmp_path / "x"))
    assert result.exit_code == 1
    assert "unknown region 'atlantis'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_malformed_catalog_exits_non_zero_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("region: {name: x, crs: EPSG:3035, bounds: [1, 2, 3]}\nimagery: {resolution: 30}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "geosoc.cli", "build-cube", "--catalog", str(bad), "--root", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert f"{bad}: region.bounds" in proc.stderr and "imagery.source: required key is missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_plan_and_writes_nothing(tmp_path: Path) -> None:
    result = run("build-cube", "--region", "europe", "--dry-run", "--root", str(tmp_path / "eu"))
    assert result.exit_code == 0, result.output
    assert "nothing written" in result.output and "21,440" in result.output and "TiB" in result.output
    assert not (tmp_path / "eu").exists()


def test_bounds_outside_crs_area(tmp_path: Path) -> None:
    result = run("build-cube", "--region", "demo", "--bounds", "5", "45", "10", "50", "--root", str(tmp_path))
    assert result.exit_code == 1
    assert "outside the area of use of EPSG:3035" in result.output


def test_build_cube_command(tmp_path: Path, write_catalog) -> None:
    path = write_catalog(tiny_catalog_dict(climate=False))
    result = run("build-cube", "--catalog", str(path), "--root", str(tmp_path / "r"), "-q")
    assert result.exit_code == 0, result.output
    assert "cube complete" in result.output and "imagery: data(band=14, y=96, x=96)" in result.output


def test_demo_command(tmp_path: Path) -> None:
    result = run("demo", "--root", str(tmp_path / "demo"), "-q")
    assert result.exit_code == 0, result.output
    assert "demo cube" in result.output and "ndvi" in result.output
    assert (tmp_path / "demo" / "cube.zarr" / "zarr.json").exists()


def test_unreachable_scheduler(tmp_path: Path, write_catalog) -> None:
    result = run("build-cube", "--catalog", str(write_catalog()), "--root", str(tmp_path), "--scheduler",
                 "tcp://127.0.0.1:9")
    assert result.exit_code == 1 and "cannot reach the Dask scheduler" in result.output


@pytest.mark.parametrize("args,message", [
    (("pretrain", "--region", "demo", "--epochs", "0"), "--epochs"),
    (("finetune", "--region", "demo", "--batch-size", "1"), "--batch-size"),
    (("sample", "--region", "demo", "--random", "-5"), "--random"),
    (("sample-table", "--table", "t.csv", "--out", "o.zarr", "--crs", "EPSG:3035", "--folds", "1"), "--folds"),
    (("evaluate", "--region", "demo", "--folds", "1"), "--folds"),
    (("predict", "--region", "demo", "--batch-size", "0"), "--batch-size"),
])
def test_out_of_range_options_are_usage_errors(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    result = run(*args, "--root", str(tmp_path / "r")) if args[0] != "sample-table" else run(*args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_error_messages_keep_their_brackets(tmp_path: Path) -> None:
    """rich markup must not swallow "[xmin, ymin, xmax, ymax]" from a message."""
    data = tiny_catalog_dict()
    x0, y0, x1, y1 = data["region"]["bounds"]
    data["region"]["bounds"] = [x1, y0, x0, y1]
    path = tmp_path / "flipped.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    result = run("build-cube", "--catalog", str(path), "--root", str(tmp_path / "r"))
    assert result.exit_code == 1 and "[xmin, ymin, xmax, ymax]" in result.output


def test_a_job_refuses_out_of_range_flags_before_starting() -> None:
    from geosoc.jobs import job_parser

    for stage, args in (("pretrain", ["--epochs", "0"]), ("finetune", ["--batch-size", "1"]),
                        ("pretrain", ["--workers", "0"]), ("predict", ["--actors", "0"])):
        with pytest.raises(SystemExit) as exit_info:
            job_parser(stage).parse_args(["--region", "demo", *args])
        assert exit_info.value.code == 2
