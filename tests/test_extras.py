"""The optional parts (pyproject's extras): the core install builds cubes, samples, fits and maps the trees
without Ray, Earth Engine, the cloud filesystems or dask.distributed; a step that needs one names the extra."""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

from geosoc.errors import EXTRAS, MissingExtraError, missing_extra
from tests.helpers import REPO, copy_region, entries_under, run_guarded

# Runs geosoc's CLI commands (one per argv line of stdin) with the optional parts' modules unimportable, as in an
# environment that installed geosoc without its extras; prints each command's exit status.
WITHOUT_EXTRAS = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ModuleNotFoundError, as when it is not installed
from geosoc.cli import app
for line in open(sys.argv[1]).read().split("\\n"):
    if line:
        try:
            code = app(line.split("\\t"), prog_name="geosoc", standalone_mode=False) or 0
        except SystemExit as end:
            code = end.code
        print(f"exit {{code}}", flush=True)
"""
BLOCKED = ("ray", "ee", "xee", "s3fs", "gcsfs", "distributed")


def without_extras(folder: Path, *commands: list[str]) -> tuple[list[str], str]:
    """The exit statuses of `commands` run in one interpreter without the optional parts, and its stderr (a
    progress guard watches its output and the files under `folder`)."""
    orders = folder / "commands.tsv"
    orders.write_text("\n".join("\t".join(c) for c in commands))
    done = run_guarded([sys.executable, "-c", WITHOUT_EXTRAS.format(blocked=BLOCKED), str(orders)],
                       progress=lambda: entries_under(folder), cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.startswith("exit ")], done.stderr


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=! ]", requirement, maxsplit=1)[0].lower()


def test_every_optional_module_belongs_to_an_extra_that_the_core_does_not_install() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert extra in extras, f"{module}: no extra {extra!r} in pyproject.toml"
    for extra in set(EXTRAS.values()):
        for requirement in extras[extra]:
            name = requirement_name(requirement)
            assert name not in core, f"{name} of the {extra!r} extra is also a core dependency"
    assert all(not r.startswith(("torch=", "torch ==")) and "==" not in r for r in project["dependencies"]), \
        "library requirements are ranges; exact pins belong in requirements.lock"


def test_a_missing_filesystem_names_its_extra_through_fsspecs_own_error() -> None:
    try:
        try:
            raise ModuleNotFoundError("No module named 's3fs'", name="s3fs")
        except ImportError as inner:
            raise ImportError("Install s3fs to access S3") from inner
    except ImportError as outer:
        found = missing_extra(outer)
    assert isinstance(found, MissingExtraError) and "pip install 'geosoc[cloud]'" in str(found)
    assert missing_extra(ModuleNotFoundError("No module named 'numpy'", name="numpy")) is None


def test_trees_map_without_the_extras_and_a_step_that_needs_one_names_it(trained_region: tuple[Path, str],
                                                                           tmp_path: Path) -> None:
    catalog, root = copy_region(trained_region, tmp_path, leave_out=("maps",))
    region = ["--catalog", str(catalog), "--root", root]
    codes, stderr = without_extras(tmp_path,
        ["build-cube", *region, "-q"],  # complete already: checked and described
        ["sample", *region, "--random", "20", "--seed", "3", "-q"],
        ["fit-tabular", *region, "--model", "rf", "--threads", "1"],
        ["predict", *region, "--model", "rf", "--no-export", "-q"],
        ["evaluate", *region, "--models", "rf", "--threads", "1", "-q"],
        ["predict", *region, "--model", "rf", "--engine", "ray", "--fresh", "-q"],
        ["build-cube", *region, "--scheduler", "tcp://127.0.0.1:1"],
        ["build-cube", "--catalog", str(catalog), "--root", "s3://soil/nowhere", "-q"],
    )
    assert codes == ["exit 0"] * 5 + ["exit 1"] * 3, stderr[-3000:]
    assert Path(root, "maps", "soc.zarr", "zarr.json").exists() and Path(root, "evaluation", "metrics.csv").exists()
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: this step needs 'ray', which is not installed: pip install 'geosoc[ray]'",
        "error: this step needs 'distributed', which is not installed: pip install 'geosoc[distributed]'",
        "error: this step needs 's3fs', which is not installed: pip install 'geosoc[cloud]'",
    ], stderr[-3000:]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("job", ["predict", "pretrain"])
def test_a_ray_job_without_ray_says_which_extra(job: str, tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None\n"
            f"from geosoc.jobs import job_main; job_main({job!r}, ['--region', 'demo', '--root', {str(tmp_path)!r}])")
    done = run_guarded([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == \
        "error: this step needs 'ray', which is not installed: pip install 'geosoc[ray]'"
