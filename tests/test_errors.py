"""Errors by kind: each is a GeosocError (one `error:` line on the CLI) and the built-in a Python user would
catch, with its cause chained; every error geosoc raises is one of the kinds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from geosoc import errors
from geosoc.catalog import load_catalog
from geosoc.data.cube import open_cube
from geosoc.data.sampling import open_sampleset
from geosoc.learn import checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "geosoc"
KINDS = {name for name, value in vars(errors).items()
         if isinstance(value, type) and issubclass(value, errors.GeosocError) and value is not errors.GeosocError}


def test_every_kind_is_a_builtin_too() -> None:
    for name in KINDS:
        kind = getattr(errors, name)
        assert kind.__mro__[2] is not Exception and issubclass(kind, Exception), name


def test_missing_artefacts_are_file_not_found_with_their_cause(tmp_path: Path) -> None:
    for opener in (open_cube, open_sampleset, checkpoint.load_config):
        with pytest.raises(FileNotFoundError) as caught:
            opener(str(tmp_path / "nothing-here"))
        assert isinstance(caught.value, errors.NotFoundError) and "nothing-here" in str(caught.value)
    with pytest.raises(errors.NotFoundError) as caught:
        open_cube(str(tmp_path / "nothing-here"))
    assert caught.value.__cause__ is not None  # the backend's own error, for whoever debugs it


def test_a_malformed_catalog_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("region: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML at line") as caught:
        load_catalog(path=path)
    assert isinstance(caught.value, errors.CatalogError) and caught.value.__cause__ is not None


def test_a_key_given_twice_is_refused_with_its_line(write_catalog) -> None:
    path = write_catalog()
    text = path.read_text()
    path.write_text(text + "sampling: {patch_size: 8}\nsampling: {patch_size: 16}\n")
    line = len(text.splitlines()) + 2
    with pytest.raises(errors.CatalogError, match=rf"line {line}.*'sampling' appears twice"):
        load_catalog(path=path)


def _raised_names(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            found.append((node.lineno, node.exc.func.id))
    return found


def test_geosoc_raises_kinds_not_the_base() -> None:
    plain = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in PACKAGE.rglob("*.py")
             for line, name in _raised_names(p) if name == "GeosocError"]
    assert plain == []


def test_causes_are_kept() -> None:
    """`raise ... from None` drops what went wrong underneath; only the CLI's and the jobs' exits may."""
    dropped = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None:
                if not ast.unparse(node.exc).startswith(("typer.Exit", "SystemExit")):
                    dropped.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert dropped == []
