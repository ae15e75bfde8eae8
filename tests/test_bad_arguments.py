"""Bad arguments, as a table: every numeric option out of its range, a device this machine does not have, an output
place taken by the other kind (a file where a folder goes, or the reverse), a model list that names no model, a
tree model's config.json without an entry the map reads. Each ends in one `error:` line and a non-zero exit, with
nothing new or changed under the region's folder; the Ray job entry points (geosoc/jobs.py) likewise."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from geosoc.catalog import load_catalog
from geosoc.cli import main
from geosoc.errors import DamagedError
from geosoc.learn import baselines
from geosoc.learn.device import cuda_devices
from geosoc.maps import tabular
from geosoc.maps.tabular import fit_region
from tests.helpers import _rewrite_config, copy_region, files_state

HUGE = str(10**30)


@pytest.fixture(scope="module")
def region(trained_region: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The trained tiny region with a small random forest beside its network (models/rf), made once."""
    catalog, root = copy_region(trained_region, tmp_path_factory.mktemp("bad-arguments"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(baselines, "TREES", 5)
        fit_region(load_catalog(path=catalog).config, root, "rf")
    return catalog, root


def _file(*parts: str) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        root.joinpath(*parts).parent.mkdir(parents=True, exist_ok=True)
        root.joinpath(*parts).write_text("")

    return make


def _folder(*parts: str) -> Callable[[Path], None]:
    return lambda root: root.joinpath(*parts).mkdir(parents=True)


def _without(entry: str) -> Callable[[Path], None]:
    return lambda root: _rewrite_config(str(root / "models" / "rf"), lambda document: document.pop(entry))


R = ["--catalog", "{catalog}", "--root", "{root}"]
PREDICT = ["predict", *R, "-q"]
DRY_RUN = [*PREDICT, "--dry-run"]
NO_CUDA = f"cuda:{cuda_devices()}"  # a CUDA device this machine does not have, with or without GPUs

# case: (arguments, exit status, what the error line says, what is done to the root first)
CASES: dict[str, tuple[list[str], int, str, Callable[[Path], None] | None]] = {
    # geosoc predict: the cases, then every other option with a range
    "predict --resolution 0": ([*PREDICT, "--resolution", "0"], 1, "--resolution must be a finite number > 0", None),
    "predict --resolution inf": ([*PREDICT, "--resolution", "inf"], 1, "--resolution must be a finite number > 0",
                                 None),
    "predict --resolution nan": ([*PREDICT, "--resolution", "nan"], 1, "got nan", None),
    "predict --resolution -60": ([*PREDICT, "--resolution", "-60"], 1, "--resolution must be a finite number > 0",
                                 None),
    "predict --chunk beyond memory": ([*PREDICT, "--chunk", "1000000000000"], 1,
                                      "--chunk 1000000000000: at most", None),
    "predict --chunk 0": ([*PREDICT, "--chunk", "0"], 2, "'--chunk'", None),
    "predict --batch-size beyond memory": ([*PREDICT, "--batch-size", HUGE], 1, f"--batch-size {HUGE}: at most",
                                           None),
    "predict --device bogus": ([*PREDICT, "--device", "bogus"], 1,
                               "--device 'bogus': not a device name torch knows; this machine has cpu", None),
    "predict --device of a CUDA device not here": ([*PREDICT, "--device", NO_CUDA], 1, "CUDA device", None),
    "predict --device meta": ([*PREDICT, "--device", "meta"], 1, "geosoc runs on cpu, cuda or mps", None),
    "predict --engine bogus": ([*PREDICT, "--engine", "bogus"], 1, "--engine must be 'local' or 'ray'", None),
    "predict --gpus-per-actor 1.5": ([*PREDICT, "--engine", "ray", "--gpus-per-actor", "1.5"], 1,
                                     "--gpus-per-actor must be a share of one GPU", None),
    "predict --gpus-per-actor inf": ([*PREDICT, "--engine", "ray", "--gpus-per-actor", "inf"], 2,
                                     "'--gpus-per-actor': must be a finite number", None),
    "predict --cpus-per-actor nan": ([*PREDICT, "--engine", "ray", "--cpus-per-actor", "nan"], 2,
                                     "'--cpus-per-actor'", None),
    "predict --max-actors 0": ([*PREDICT, "--engine", "ray", "--max-actors", "0"], 2, "'--max-actors'", None),
    "predict --bounds with inf": ([*PREDICT, "--bounds", "0", "0", "inf", "inf"], 2,
                                  "'--bounds': must be a finite number", None),
    "predict --threads beyond the CPUs": ([*PREDICT, "--threads", HUGE], 2, "'--threads'", None),
    "predict --dry-run --resolution 0": ([*DRY_RUN, "--resolution", "0"], 1,
                                         "--resolution must be a finite number > 0", None),
    "predict --dry-run --chunk beyond memory": ([*DRY_RUN, "--chunk", "1000000000000"], 1, "--chunk 1000000000000",
                                                None),
    "predict --dry-run --rate inf": ([*DRY_RUN, "--rate", "inf"], 2, "'--rate': must be a finite number", None),
    "predict --dry-run --read-mbps nan": ([*DRY_RUN, "--read-mbps", "nan"], 2, "'--read-mbps'", None),
    # output places
    "predict into a maps/soc.zarr that is a file": (PREDICT, 1, "soc.zarr: a file is in the way",
                                                    _file("maps", "soc.zarr")),
    "predict with a folder where a COG goes": (PREDICT, 1, "soc_median.tif: a folder is in the way",
                                               _folder("maps", "soc_median.tif")),
    "predict with a folder where item.json goes": (PREDICT, 1, "item.json: a folder is in the way",
                                                   _folder("maps", "item.json")),
    "predict into a maps that is a file": (PREDICT, 1, "maps: cannot write here", _file("maps")),
    "fit-tabular into a models/qrf that is a file": (["fit-tabular", *R, "--model", "qrf"], 1,
                                                     "qrf: a file is in the way", _file("models", "qrf")),
    "finetune into a models/finetune that is a file": (["finetune", *R, "-q", "--fresh"], 1,
                                                       "finetune: a file is in the way", None),
    "evaluate into an evaluation that is a file": (["evaluate", *R, "-q", "--models", "rf"], 1,
                                                   "evaluation: a file is in the way", _file("evaluation")),
    # geosoc evaluate
    "evaluate --models ''": (["evaluate", *R, "-q", "--models", ""], 1,
                             "--models names no model; give one or more of ssl, supervised, hybrid, rf", None),
    "evaluate --models ,": (["evaluate", *R, "-q", "--models", " , "], 1, "--models names no model", None),
    "evaluate --models nope": (["evaluate", *R, "-q", "--models", "nope"], 1, "unknown model(s) ['nope']", None),
    "evaluate --folds beyond": (["evaluate", *R, "-q", "--folds", "1000000"], 2, "'--folds'", None),
    "evaluate --repeats beyond": (["evaluate", *R, "-q", "--repeats", HUGE], 2, "'--repeats'", None),
    "evaluate --threads beyond the CPUs": (["evaluate", *R, "-q", "--threads", HUGE], 2, "'--threads'", None),
    # a tree model's config.json without an entry the map reads
    "predict with an rf without 'months'": ([*PREDICT, "--model", "rf"], 1, "config.json: 'months' is missing",
                                            _without("months")),
    "predict with an rf without 'units'": ([*PREDICT, "--model", "rf"], 1, "config.json: 'units' is missing",
                                           _without("units")),
    # the same options of the other steps
    "build-cube --workers 0": (["build-cube", *R, "-q", "--workers", "0"], 2, "'--workers'", None),
    "build-cube --bounds with nan": (["build-cube", *R, "-q", "--bounds", "nan", "0", "1", "1"], 2, "'--bounds'",
                                     None),
    "build-cube into a cube.zarr that is a file": (["build-cube", *R, "-q"], 1, "cube.zarr: a file is in the way",
                                                   None),
    "sample --seed -1": (["sample", *R, "-q", "--random", "5", "--seed", "-1"], 2, "'--seed'", None),
    "sample --min-spacing inf": (["sample", *R, "-q", "--random", "5", "--min-spacing", "inf"], 2,
                                 "'--min-spacing': must be a finite number", None),
    "sample --workers -3": (["sample", *R, "-q", "--random", "5", "--workers", "-3"], 2, "'--workers'", None),
    "pretrain --batch-size beyond": (["pretrain", *R, "-q", "--batch-size", HUGE], 1,
                                     "--batch-size must be from 2 (a contrastive batch needs negatives) to 1,048,576",
                                     None),
    "finetune --batch-size beyond": (["finetune", *R, "-q", "--batch-size", str(2**20 + 1)], 1,
                                     "--batch-size must be from 2", None),
    "finetune --threads beyond the CPUs": (["finetune", *R, "-q", "--threads", HUGE], 2, "'--threads'", None),
    "fit-tabular --threads 0": (["fit-tabular", *R, "--model", "rf", "--threads", "0"], 2, "'--threads'", None),
    "sample-table --fold-block-size inf": (["sample-table", "--table", "{root}/t.csv", "--out", "{root}/t.zarr",
                                            "--fold-block-size", "inf"], 2, "'--fold-block-size'", None),
    "sample-table --folds beyond": (["sample-table", "--table", "{root}/t.csv", "--out", "{root}/t.zarr",
                                     "--folds", "1000000"], 2, "'--folds'", None),
}
# Where the artefact itself is what the command replaces, the file goes in its place after the copy.
IN_PLACE = {"finetune into a models/finetune that is a file": ("models", "finetune"),
            "build-cube into a cube.zarr that is a file": ("cube.zarr",)}


def _main(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """`geosoc ARGS` as a user runs it (`geosoc.cli.main`, whose usage errors are one line too): exit status and
    what it wrote to stderr."""
    monkeypatch.setattr(sys, "argv", ["geosoc", *args])
    with pytest.raises(SystemExit) as ended:
        main()
    return int(ended.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_argument_is_one_error_line_and_writes_nothing(case: str, region: tuple[Path, str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    catalog, root = copy_region(region, tmp_path / "copy")
    args, status, says, prepare = CASES[case]
    if case in IN_PLACE:
        place = Path(root).joinpath(*IN_PLACE[case])
        import shutil

        shutil.rmtree(place)
        place.write_text("")
    if prepare is not None:
        prepare(Path(root))
    monkeypatch.chdir(tmp_path)
    before = files_state(tmp_path)
    code, err = _main([a.format(catalog=catalog, root=root) for a in args], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == status and lines and "Traceback" not in err, err[-3000:]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], err[-3000:]
    assert says in lines[-1], err[-3000:]
    assert files_state(tmp_path) == before


def test_a_tree_models_config_is_checked_entry_by_entry(region: tuple[Path, str], tmp_path: Path) -> None:
    """Every entry the map reads, missing or of the wrong kind, is one DamagedError naming config.json and it."""
    for entry in tabular.REQUIRED_ENTRIES:
        url = str(copy_region(region, tmp_path / entry)[1]) + "/models/rf"
        _rewrite_config(url, lambda document, entry=entry: document.pop(entry))
        with pytest.raises(DamagedError) as raised:
            tabular.load(url)
        assert str(raised.value).startswith(f"{url}/config.json: '{entry}' is missing"), raised.value
    url = str(copy_region(region, tmp_path / "units-as-a-number")[1]) + "/models/rf"
    _rewrite_config(url, lambda document: document.update(units=3))
    with pytest.raises(DamagedError, match="'units' must be the target's units as text"):
        tabular.load(url)
    assert json.loads(Path(region[1], "models", "rf", "config.json").read_text())["months"]  # the real one has them


JOB_CASES: dict[str, tuple[str, list[str], str, Callable[[Path], None] | None]] = {
    "predict --resolution 0": ("predict", ["--resolution", "0"], "--resolution must be a finite number > 0", None),
    "predict --resolution inf": ("predict", ["--resolution", "inf"], "argument --resolution: must be a finite", None),
    "predict --chunk beyond memory": ("predict", ["--chunk", "1000000000000"], "--chunk 1000000000000: at most",
                                      None),
    "predict --batch-size beyond memory": ("predict", ["--batch-size", HUGE], f"--batch-size {HUGE}: at most", None),
    "predict --gpus-per-actor 1.5": ("predict", ["--gpus-per-actor", "1.5"], "argument --gpus-per-actor: must be",
                                     None),
    "predict --cpus-per-actor nan": ("predict", ["--cpus-per-actor", "nan"], "argument --cpus-per-actor", None),
    "predict --max-retries beyond": ("predict", ["--max-retries", "5000"], "--max-retries must be a whole number",
                                     None),
    "predict into a maps/soc.zarr that is a file": ("predict", [], "soc.zarr: a file is in the way",
                                                    _file("maps", "soc.zarr")),
    "pretrain --batch-size beyond": ("pretrain", ["--batch-size", str(2**20 + 1)],
                                     "argument --batch-size: must be from 2 to 1,048,576", None),
    "finetune --gpus-per-worker -1": ("finetune", ["--gpus-per-worker", "-1"], "argument --gpus-per-worker", None),
    "finetune --epochs abc": ("finetune", ["--epochs", "abc"], "invalid whole number value: 'abc'", None),
}


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_a_bad_argument_of_a_ray_job_is_one_error_line_and_writes_nothing(
        case: str, region: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The jobs' own checks and the library's, in this process (no cluster needed: nothing reaches Ray)."""
    from geosoc.jobs import job_main

    catalog, root = copy_region(region, tmp_path / "copy")
    stage, args, says, prepare = JOB_CASES[case]
    if prepare is not None:
        prepare(Path(root))
    before = files_state(tmp_path)
    logger = logging.getLogger("geosoc")
    handlers, level = list(logger.handlers), logger.level
    try:
        with pytest.raises(SystemExit) as ended:
            job_main(stage, ["--catalog", str(catalog), "--root", root, *args])
    finally:
        logger.handlers[:], logger.level = handlers, level  # the job logs geosoc at INFO to its stderr
    code = ended.value.code
    err = capsys.readouterr().err if isinstance(code, int) else str(code)  # a string: what Python prints, exit 1
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    assert files_state(tmp_path) == before
