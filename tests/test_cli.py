"""The `geosoc` command as users run it: exit codes, messages without tracebacks, dry runs that write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geosoc.cli import app
from tests.helpers import TINY_MODEL, tiny_catalog_dict

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
    words = " ".join(result.output.split())  # the table's title wraps where the path's length puts it
    assert "nothing written" in words and "21,440" in words and "TiB" in words
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


def test_demo_command_on_a_shrunken_region(tmp_path: Path, write_catalog, small_forests: None) -> None:
    """`geosoc demo` end to end on a tiny synthetic catalog (the full-size demo is `make demo`): every output is
    there and readable, and the summary says what it made and how long each step took."""
    import json

    import pandas as pd
    import rasterio

    from geosoc.evaluation.campaign import MODELS
    from geosoc.maps.inference import open_map

    data = tiny_catalog_dict(size_px=96, chunk=32)
    data.update(sampling={"patch_size": 8, "unlabelled": 150, "fold_block_size": 600, "folds": 3}, model=TINY_MODEL,
                training={"pretrain": {"epochs": 1, "batch_size": 32}, "finetune": {"epochs": 2, "batch_size": 16}},
                predict={"resolution": 60})
    root = tmp_path / "demo"
    result = run("demo", "--catalog", str(write_catalog(data)), "--labelled", "90", "--root", str(root), "-q")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    squeezed = "".join(result.output.split())  # long paths wrap at the terminal's width
    assert f"democube:{root}/cube.zarr" in squeezed and "ndvi" in out
    assert "samples: 150 unlabelled, " in out and "labelled (simulated lab values; fold 0 held out)" in out
    assert "pretraining: best validation NT-Xent" in out and "fine-tuned, validation" in out
    for step in ("cube", "samples", "pretrain", "finetune", "map", "evaluate"):
        assert f"{step} " in out.split("time: ")[1]
    assert {"config.json"} <= {p.name for p in (root / "models" / "pretrain").iterdir()}
    maps = root / "maps"
    ds = open_map(str(maps / "soc.zarr"))
    assert ds.attrs["geosoc_status"] == "complete" and ds["soc_median"].notnull().any()
    assert f"map: {ds.sizes['y']} x {ds.sizes['x']} cells of 60 m, median SOC" in out
    for name in ("soc_median", "soc_q05", "soc_q95", "aoa"):
        with rasterio.open(maps / f"{name}.tif") as src:
            assert src.shape == (ds.sizes['y'], ds.sizes['x']) and src.crs.to_epsg() == 3035
        assert f"{maps / name}.tif" in squeezed
    item = json.loads((maps / "item.json").read_text())
    assert set(item["assets"]) == {"soc_median", "soc_q05", "soc_q95", "aoa", "quicklook", "zarr"}
    assert (maps / "quicklook.png").read_bytes()[:4] == b"\x89PNG"
    evaluation = root / "evaluation"
    metrics = pd.read_csv(evaluation / "metrics.csv")
    assert set(metrics["model"]) == set(MODELS) and set(metrics["fold"]) == {0, 1, 2}
    summary = json.loads((evaluation / "summary.json").read_text())
    assert all(model in out for model in summary["models"])  # the evaluation table


def test_unreachable_scheduler(tmp_path: Path, write_catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("geosoc.cli.SCHEDULER_TIMEOUT_S", 1)  # nothing listens there: no need to wait 10 s
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
                        ("pretrain", ["--workers", "0"]), ("predict", ["--max-actors", "0"])):
        with pytest.raises(SystemExit) as exit_info:
            job_parser(stage).parse_args(["--region", "demo", *args])
        assert exit_info.value.code == 2


@pytest.mark.parametrize("args,status,message", [
    (("predict", "--resolution", "abc"), 2, "Invalid value for '--resolution'"),
    (("predict", "--no-such-option"), 2, "No such option: --no-such-option"),
    (("no-such-command",), 2, "No such command 'no-such-command'"),
    (("predict", "--region", "no-such-region"), 1, "unknown region 'no-such-region'"),
])
def test_every_mistake_is_one_error_line(args: tuple[str, ...], status: int, message: str) -> None:
    """Usage mistakes, which click reports itself, end like geosoc's own errors: one line that starts `error:`."""
    done = subprocess.run([sys.executable, "-m", "geosoc.cli", *args], capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and message in lines[0] and not done.stdout


def test_every_command_takes_quiet() -> None:
    """Scripts and CI pass -q to every step: no command refuses it."""
    import typer

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    refusing = [name for name, command in commands.items()
                if not any("-q" in param.opts for param in command.params)]
    assert commands and not refusing


def test_long_lines_are_not_wrapped_off_a_terminal(tmp_path: Path) -> None:
    """Written to a pipe or a file (CliRunner's output is neither a terminal), rich would wrap at 80 columns."""
    result = run("predict", "--region", "demo", "--dry-run", "--root", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    long = [line for line in result.output.splitlines() if line.startswith("network (the catalog's model section")]
    assert len(long) == 1 and len(long[0]) > 120 and long[0].endswith("climate variables"), result.output
    assert not (tmp_path / "r").exists()
