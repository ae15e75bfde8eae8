"""The package's shape: imports point down the stack of stages, no circle, no private name across folders, no
import of the package root from inside it, and `import geosoc` loads none of the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "geosoc"
# Top to bottom; a unit (a folder, or a module at the package's top) imports only from units below its own.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("demo", "jobs"),
    ("evaluation", "maps"),
    ("learn",),
    ("data",),
    ("sources",),
    ("io",),
    ("catalog",),
    ("grid", "threads", "stopwatch", "version", "fingerprints", "stats"),
    ("errors",),
]
RANK = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    return module.split(".")[1]


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every geosoc import in a file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "geosoc":
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "geosoc"]
    return found


def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}


def test_every_unit_has_a_place_in_the_stack() -> None:
    units = {unit(m) for m in graph()}
    assert units <= set(RANK), f"not in LAYERS: {sorted(units - set(RANK))}"


def test_imports_point_down_the_stack() -> None:
    wrong = []
    for module, found in graph().items():
        for target, names, line in found:
            if target == "geosoc":
                wrong.append(f"{module}:{line} imports the package root ({', '.join(names)})")
                continue
            if unit(target) != unit(module) and RANK[unit(target)] <= RANK[unit(module)]:
                wrong.append(f"{module}:{line} imports {target}, which is not below it")
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            if private and unit(target) != unit(module):
                wrong.append(f"{module}:{line} uses private {private} of {target}")
    assert not wrong, "\n".join(wrong)


def test_no_circle_between_modules() -> None:
    edges = {m: {t for t, names, _ in found} | {f"{t}.{n}" for t, names, _ in found for n in names}
             for m, found in graph().items()}
    edges = {m: {t for t in targets if t in edges and t != m} for m, targets in edges.items()}
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            assert state.get(target) != 1, "circle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_package_face_is_light() -> None:
    heavy = ("xarray", "dask", "zarr", "rasterio", "torch", "ray", "pandas", "sklearn")
    code = f"import sys, geosoc, geosoc.cli; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_public_names_resolve_lazily() -> None:
    import geosoc

    assert set(geosoc.__all__) == {"GeosocError", "__version__", *geosoc._LAZY}
    for name in geosoc.__all__:
        assert callable(getattr(geosoc, name)) or name == "__version__"
