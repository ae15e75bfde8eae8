"""The `geosoc` command line: parses arguments, calls the library, prints. No logic of its own."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from geosoc.errors import GeosocError

app = typer.Typer(
    help="Continental soil organic carbon maps with SSL-SoilNet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

RegionOpt = typer.Option(None, "--region", "-r", help="Region name: a catalog in catalogs/ (demo, edgeroi, europe, conus).")
CatalogOpt = typer.Option(None, "--catalog", help="Catalog YAML file (instead of, or to check against, --region).")
RootOpt = typer.Option(
    None, "--root", envvar="GEOSOC_ROOT", help="Root URL of the region's artefacts (default ./geosoc-data/<region>)."
)


def user_errors(command: F) -> F:
    """Print a GeosocError as one clear line and exit 1, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GeosocError as err:
            errors.print(f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("build-cube")
@user_errors
def build_cube_command(
    region: Optional[str] = RegionOpt,
    catalog: Optional[Path] = CatalogOpt,
    root: Optional[str] = RootOpt,
    bounds: Optional[tuple[float, float, float, float]] = typer.Option(
        None, "--bounds", help="xmin ymin xmax ymax in the region's CRS: build only this part."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (size, chunks); write nothing."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Threads (default: one per core)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="dask.distributed scheduler address."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build (or resume building) the region's covariate cube as Zarr v3 under --root."""
    from geosoc.catalog import load_catalog
    from geosoc.cube import build_cube, describe, open_cube, plan_cube

    loaded = load_catalog(region, catalog, bounds)
    if dry_run:
        print_plan(plan_cube(loaded, root))
        return
    client = _client(scheduler)
    url = build_cube(loaded, root, client=client, workers=workers, progress=not quiet)
    console.print(f"cube complete: {url}")
    console.print(describe(open_cube(url)), highlight=False)


@app.command()
@user_errors
def demo(
    root: Optional[str] = RootOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run the pipeline on the embedded demo region (synthetic, offline) and print a summary."""
    from geosoc.catalog import load_catalog
    from geosoc.cube import build_cube, cube_summary, describe, open_cube

    loaded = load_catalog("demo")
    url = build_cube(loaded, root, progress=not quiet)
    tree = open_cube(url)
    console.print(f"demo cube: {url}")
    console.print(describe(tree), highlight=False)
    table = Table(title="imagery bands")
    for column in ("band", "min", "mean", "max", "nodata"):
        table.add_column(column, justify="right")
    for band, stats in cube_summary(tree).items():
        table.add_row(band, *(f"{stats[k]:.4g}" for k in ("min", "mean", "max")), f"{stats['nodata']:.1%}")
    console.print(table)


def print_plan(plan: Any) -> None:
    remote = [layer for layer in plan.layers if layer.requests is not None]
    table = Table(title=f"plan for {plan.url} ({plan.crs}); nothing written")
    columns = ["group", "shape", "chunk", "chunks", "resolution", "size"]
    if remote:
        columns += ["requests", "per request"]
    for column in columns:
        table.add_column(column, justify="right")
    for layer in plan.layers:
        row = [
            layer.group,
            " x ".join(map(str, layer.shape)),
            " x ".join(map(str, layer.chunk_shape)),
            f"{layer.chunks:,}",
            f"{layer.resolution:g}",
            _size(layer.nbytes),
        ]
        if remote:
            row += [f"{layer.requests:,}", _size(layer.request_bytes)] if layer.requests is not None else ["", ""]
        table.add_row(*row)
    total = ["total", "", "", f"{plan.chunks:,}", "", _size(plan.nbytes)]
    if remote:
        total += [f"{sum(layer.requests for layer in remote):,}", ""]
    table.add_row(*total)
    console.print(table)
    for layer in remote:
        console.print(
            f"{layer.group}: {layer.requests:,} Earth Engine requests, {layer.concurrency} at a time, at an assumed "
            f"{layer.seconds_per_request:g} s each (catalog: seconds_per_request): about "
            f"{_duration(layer.estimated_seconds)}"
        )


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:,.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    raise AssertionError


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"


def _client(address: str | None) -> Any:
    if address is None:
        return None
    from distributed import Client

    try:
        return Client(address, timeout="10s")
    except OSError as err:
        raise GeosocError(f"cannot reach the Dask scheduler at {address}: {err}") from None


def main() -> None:
    app(prog_name="geosoc")


if __name__ == "__main__":
    sys.exit(main())
