"""The `geosoc` command line: parses arguments, calls the library, prints tables and one-line errors."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from geosoc.errors import GeosocError, InputError, ServiceError, missing_extra

app = typer.Typer(
    help="Continental soil organic carbon maps with SSL-SoilNet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Off a terminal (a file, a pipe, a job's log) rich would wrap every long line at 80 columns: lines stay whole.
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

RegionOpt = typer.Option(None, "--region", "-r", help="Region name: a catalog in catalogs/ (demo, edgeroi, europe, conus).")
CatalogOpt = typer.Option(None, "--catalog", help="Catalog YAML file (instead of, or to check against, --region).")
RootOpt = typer.Option(
    None, "--root", envvar="GEOSOC_ROOT", help="Root URL of the region's artefacts (default ./geosoc-data/<region>)."
)


QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")


def finite(value: float | tuple[float, ...] | None) -> float | tuple[float, ...] | None:
    """A float option's check: Python reads 'inf' and 'nan' as numbers, and no option of geosoc means either."""
    for number in value if isinstance(value, tuple) else (value,):
        if number is not None and not math.isfinite(number):
            raise typer.BadParameter(f"must be a finite number, got {number}")
    return value


MAX_FOLDS = 100  # cross-validation folds: beyond, a fold holds a handful of samples and the networks train 100 times
MAX_REPEATS = 100  # repeats of a whole cross-validation (every model on every fold each time)
BoundsOpt = typer.Option(None, "--bounds", callback=finite, help="xmin ymin xmax ymax in the region's CRS: only this part.")
WorkersOpt = typer.Option(None, "--workers", min=1, help="Threads (default: one per core).")
SeedsOpt = typer.Option(None, "--seeds", min=1, max=20, help="Networks as an ensemble of this many members, each with its own seed (default: the catalog's training.finetune.seeds).")
ThreadsOpt = typer.Option(None, "--threads", min=1, max=os.cpu_count() or 1, help="CPU threads for torch and the trees, at most the machine's CPUs (default: the cores this process is given).")


def _region(region: str | None, catalog: Path | None, root: str | None, writes: bool = True) -> tuple[Any, str]:
    """The loaded catalog and the region root (--root, $GEOSOC_ROOT or ./geosoc-data/<region>), checked first
    when the command `writes` there (io.storage.check_writable: one line on what is wrong, before any work)."""
    from geosoc.catalog import load_catalog
    from geosoc.io.storage import check_writable, default_root

    loaded = load_catalog(region, catalog)
    root = root or default_root(loaded.config.region.name)
    if writes:
        check_writable(root)
    return loaded, root


def user_errors(command: F) -> F:
    """Print a GeosocError as one clear line and exit 1, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except GeosocError as err:
            fail(err)
        except ImportError as err:  # an optional part (pyproject's extras) that is not installed
            fail(missing_extra(err) or err)
        except Exception as err:  # a storage endpoint that cannot be reached, wherever it failed
            from geosoc.io.storage import storage_failure

            fail(storage_failure(err) or err)

    return wrapper  # type: ignore[return-value]


def fail(err: BaseException) -> NoReturn:
    """One `error:` line and exit status 1; an error that is not the user's to fix goes on as a traceback."""
    if not isinstance(err, GeosocError):
        raise err
    # The message is text, not markup: "[xmin, ymin, xmax, ymax]" must not vanish as a style tag.
    errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(1) from None


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command("build-cube")
@user_errors
def build_cube_command(
    region: str | None = RegionOpt,
    catalog: Path | None = CatalogOpt,
    root: str | None = RootOpt,
    bounds: tuple[float, float, float, float] | None = BoundsOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (size, chunks); write nothing."),
    workers: int | None = WorkersOpt,
    scheduler: str | None = typer.Option(None, "--scheduler", help="dask.distributed scheduler address."),
    quiet: bool = QuietOpt,
) -> None:
    """Build (or resume building) the region's covariate cube as Zarr v3 under --root."""
    from geosoc.catalog import load_catalog
    from geosoc.data.cube import build_cube, describe, open_cube, plan_cube

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
    root: str | None = RootOpt,
    catalog: Path | None = typer.Option(None, "--catalog", help="A synthetic catalog to run on instead of the demo region's."),
    labelled: int | None = typer.Option(None, "--labelled", min=10, max=100_000, help="Simulated lab samples, true SOC with a 10 % lab error (default 400)."),
    quiet: bool = QuietOpt,
) -> None:
    """The whole pipeline on the embedded demo region (synthetic, offline): cube, samples, pretraining,
    fine-tuning, the map and its exports, and every model in spatial cross-validation; prints the cube, the
    validation accuracy, where the map is, the evaluation table and how long each step took."""
    from geosoc.catalog import load_catalog
    from geosoc.data.cube import cube_summary, describe, open_cube
    from geosoc.demo import LABELLED_POINTS, TEST_FOLD, run_demo
    from geosoc.threads import use_threads

    use_threads()
    report = None if quiet else (lambda line: console.print(f"[dim]{line}[/]"))
    result = run_demo(load_catalog("demo" if catalog is None else None, catalog), root, progress=not quiet,
                      labelled=labelled or LABELLED_POINTS, report=report)
    tree = open_cube(result.cube)
    console.print(f"demo cube: {result.cube}")
    console.print(describe(tree), highlight=False)
    table = Table(title="imagery bands")
    for column in ("band", "min", "mean", "max", "nodata"):
        table.add_column(column, justify="right")
    for band, stats in cube_summary(tree).items():
        table.add_row(band, *(f"{stats[k]:.4g}" for k in ("min", "mean", "max")), f"{stats['nodata']:.1%}")
    print_table(table)
    console.print(f"samples: {result.unlabelled:,} unlabelled, {result.labelled:,} labelled "
                  f"(simulated lab values; fold {TEST_FOLD} held out)")
    console.print(f"pretraining: best validation NT-Xent {result.pretrain['best_val_loss']:.4f}")
    best = min(result.finetune["history"], key=lambda m: m["val_loss"])
    console.print(_metrics_line("fine-tuned, validation", best))
    console.print(map_summary(result.maps["zarr"]), highlight=False)
    for name, url in result.maps.items():
        console.print(f"{name:>10}: {url}", highlight=False)
    print_evaluation(result.evaluation.summary)
    for name, url in result.evaluation.outputs.items():
        console.print(f"{name:>20}: {url}", highlight=False)
    steps = ", ".join(f"{step} {seconds:.0f} s" for step, seconds in result.seconds.items())
    console.print(f"time: {steps}; {sum(result.seconds.values()) / 60:.1f} min in all", highlight=False)


def map_summary(url: str) -> str:
    """One line on a written map: size, median SOC, share inside the area of applicability."""
    from geosoc.maps.inference import open_map

    ds = open_map(url)
    soc = ds["soc_median"]
    stats = {k: float(v) for k, v in (("median", soc.quantile(0.5, dim=("y", "x"), skipna=True)), ("aoa", ds["aoa"].mean()),
                                      ("data", soc.notnull().mean()))}
    return (f"map: {ds.sizes['y']} x {ds.sizes['x']} cells of {float(ds.x[1] - ds.x[0]):g} m, median SOC "
            f"{stats['median']:.1f} {soc.attrs.get('units', '')}, {stats['data']:.0%} of cells with data, "
            f"{stats['aoa']:.0%} of those inside the area of applicability")


EpochsOpt = typer.Option(None, "--epochs", min=1, help="Override the catalog's epochs.")
BatchOpt = typer.Option(None, "--batch-size", min=2, help="Override the catalog's batch size (per worker; at least 2).")
FreshOpt = typer.Option(False, "--fresh", help="Start over instead of resuming from the last checkpoint.")


@app.command()
@user_errors
def pretrain(
    region: str | None = RegionOpt,
    catalog: Path | None = CatalogOpt,
    root: str | None = RootOpt,
    epochs: int | None = EpochsOpt,
    batch_size: int | None = BatchOpt,
    samples: str | None = typer.Option(None, "--samples", help="SampleSet URL (default samples/unlabelled.zarr)."),
    fresh: bool = FreshOpt,
    threads: int | None = ThreadsOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Contrastive pretraining of both encoders on unlabelled samples (-> models/pretrain)."""
    from geosoc.learn.training import Context, pretrain_region
    from geosoc.threads import use_threads

    use_threads(threads)
    loaded, root = _region(region, catalog, root)
    result = pretrain_region(loaded.config, root, epochs=epochs, batch_size=batch_size, samples=samples, resume=not fresh,
                             ctx=Context(progress=not quiet))
    console.print(f"pretrained: best validation loss {result['best_val_loss']:.4f} -> {result['checkpoint']}")


@app.command()
@user_errors
def finetune(
    region: str | None = RegionOpt,
    catalog: Path | None = CatalogOpt,
    root: str | None = RootOpt,
    epochs: int | None = EpochsOpt,
    batch_size: int | None = BatchOpt,
    samples: str | None = typer.Option(None, "--samples", help="SampleSet URL (default samples/labelled.zarr)."),
    test_fold: int | None = typer.Option(None, "--test-fold", help="Fold held out entirely (for evaluation)."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Ignore models/pretrain (supervised only)."),
    fresh: bool = FreshOpt,
    seeds: int | None = SeedsOpt,
    threads: int | None = ThreadsOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Fine-tune encoders and head on labelled samples, quantile outputs (-> models/finetune)."""
    from geosoc.learn.training import Context, finetune_region
    from geosoc.threads import use_threads

    use_threads(threads)
    loaded, root = _region(region, catalog, root)
    result = finetune_region(loaded.config, root, epochs=epochs, batch_size=batch_size, samples=samples,
                             test_fold=test_fold, pretrained=not from_scratch, resume=not fresh, seeds=seeds,
                             ctx=Context(progress=not quiet))
    best = min(result["history"], key=lambda m: m["val_loss"])
    console.print(_metrics_line("best validation", best))
    members = f" (an ensemble of {result['members']}: -m1 ... beside it)" if result["members"] > 1 else ""
    console.print(f"fine-tuned -> {result['checkpoint']}{members}")


@app.command("fit-tabular")
@user_errors
def fit_tabular(
    region: str | None = RegionOpt,
    catalog: Path | None = CatalogOpt,
    root: str | None = RootOpt,
    model: str = typer.Option(..., "--model", help="rf, gbm or qrf, or (with AlphaEarth embeddings) aef-rf, aef-qrf, aef+cov-qrf or aef-hybrid, any of them with +rk (residual kriging, e.g. qrf+rk): the tree model to map with (see `geosoc evaluate`)."),
    threads: int | None = ThreadsOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Accepted as by every command (fitting shows no progress bars)."),
) -> None:
    """Fit a tree model on all labelled samples, for maps (-> models/<model>; then `geosoc predict --model <model>`)."""
    from geosoc.maps.tabular import fit_region
    from geosoc.threads import use_threads

    loaded, root = _region(region, catalog, root)
    out = fit_region(loaded.config, root, model, threads=use_threads(threads))
    console.print(f"fitted {model} -> {out}", highlight=False)


@app.command()
@user_errors
def predict(
    region: str | None = RegionOpt,
    catalog: Path | None = CatalogOpt,
    root: str | None = RootOpt,
    model: str | None = typer.Option(None, "--model", help="A model under <root>/models/ (finetune, rf, gbm, qrf, aef-qrf, ...) or a URL (default: the catalog's predict.model, finetune)."),
    resolution: float | None = typer.Option(None, "--resolution", help="Output cell size, > 0, in the units of the region's CRS (default: catalog predict.resolution)."),
    bounds: tuple[float, float, float, float] | None = BoundsOpt,
    engine: str = typer.Option("local", "--engine", help="local: this process; ray: Ray actors."),
    max_actors: int | None = typer.Option(None, "--max-actors", min=1, help="ray: actors to ask for; an autoscaling cluster grows to hold them (default: the catalog's predict.max_actors, else what the cluster holds now)."),
    gpus_per_actor: float | None = typer.Option(None, "--gpus-per-actor", min=0, callback=finite, help="ray: GPUs per actor (default 1 if the cluster has GPUs)."),
    cpus_per_actor: float | None = typer.Option(None, "--cpus-per-actor", min=1, callback=finite, help="ray: CPUs per actor, its torch threads on a CPU cluster (default 1)."),
    batch_size: int = typer.Option(1024, "--batch-size", min=1, help="Cells per forward pass."),
    chunk: int | None = typer.Option(None, "--chunk", min=1, help="Output cells per window side (default: ~256 MiB of imagery per window)."),
    device: str | None = typer.Option(None, "--device", help="local: cpu or cuda (default: cuda when present)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan from the catalog alone (no cube or model needed): cells, windows, bytes read, time; write nothing."),
    gpu: str | None = typer.Option(None, "--gpu", help="--dry-run: the device whose measured rate to use (a name in the rates file, e.g. 'NVIDIA H200', or cpu; default: its first GPU)."),
    rate: float | None = typer.Option(None, "--rate", min=1, callback=finite, help="--dry-run: cells/s per actor, instead of a measured rate."),
    read_mbps: float = typer.Option(500, "--read-mbps", min=1, callback=finite, help="--dry-run: object-store reads per actor, MB/s (an assumption: measure yours)."),
    fresh: bool = typer.Option(False, "--fresh", help="Replace an existing map instead of resuming it."),
    no_export: bool = typer.Option(False, "--no-export", help="Only maps/soc.zarr (no COG, PNG, STAC)."),
    threads: int | None = ThreadsOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Map SOC over the region with the fine-tuned network or a tree model (-> maps/soc.zarr, COGs, quicklook.png,
    item.json)."""
    from geosoc.maps.inference import check_engine, map_region
    from geosoc.threads import use_threads

    use_threads(threads)
    check_engine(engine)
    loaded, root = _region(region, catalog, root, writes=not dry_run)
    model = model or loaded.config.predict.model
    if dry_run:
        print_map_plan(loaded, root, model, resolution, chunk, bounds, gpu, rate, read_mbps,
                       max_actors or loaded.config.predict.max_actors or 8)
        return
    assets = map_region(loaded.config, root, model=model, resolution=resolution, bounds=bounds, engine=engine,  # type: ignore[arg-type]
                        batch_size=batch_size, chunk=chunk, device=device, max_actors=max_actors,
                        gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, fresh=fresh,
                        export=not no_export, progress=not quiet)
    for name, url in assets.items():
        console.print(f"{name:>10}: {url}", highlight=False)


def print_map_plan(loaded: Any, root: str, model: str, resolution: float | None, chunk: int | None,
                   bounds: tuple[float, float, float, float] | None, gpu: str | None, rate: float | None,
                   read_mbps: float, actors: int) -> None:
    """The map's size, a Ray job's start-up and its two time bounds (compute, reading) on one actor and on
    `actors`."""
    from geosoc.learn import checkpoint
    from geosoc.maps.inference import how_to_make, model_url
    from geosoc.maps.plan import choose_rate, choose_startup, load_rates, plan_from_catalog, rates_file

    plan = plan_from_catalog(loaded, resolution=resolution, chunk=chunk, bounds=bounds)
    grid = plan.grid
    rates = load_rates() if rate is None or rates_file().exists() else []
    startup, startup_how = choose_startup(rates, gpu, plan.parameters, grid.resolution)
    if rate is None:
        rate, source = choose_rate(rates, gpu, plan.parameters, grid.resolution)
    else:
        source = "as given (--rate)"
    say = lambda text: console.print(text, highlight=False)  # noqa: E731
    say(f"map of {loaded.config.region.name} planned from its catalog (no cube or model needed); nothing written")
    say(f"output grid: {grid.height:,} x {grid.width:,} cells of {grid.resolution:g} ({grid.crs}): "
        f"{plan.cells_in_bounds:,} in the bounding box, "
        + (f"about {plan.cells_inside:,} inside region.mask ({plan.mask})" if plan.mask else
           "no region.mask (every cell counts, sea included)"))
    say(f"windows: {plan.windows:,} of {grid.chunks[0]} x {grid.chunks[1]} cells, {plan.windows_inside:,} holding "
        "cells inside the mask (the others read only empty chunks)")
    url = model_url(root, model)
    say(f"map model: {url}" + ("" if checkpoint.is_checkpoint(url) else f" (not made yet: {how_to_make(url)})"))
    say(f"network (the catalog's model section; sizes it leaves unset for {loaded.config.sampling.unlabelled:,} "
        f"samples, its sampling.unlabelled): {plan.parameters / 1e6:.1f} M parameters, {plan.patch} px patches "
        f"of {plan.bands} bands, {plan.months} months x {plan.variables} climate variables")
    decoded = plan.decoded(1)
    say(f"reads (decoded bytes of whole cube chunks, each process keeping up to {_size(plan.cache_bytes)} of them and "
        f"running the windows in strips {plan.strip} wide): "
        + ", ".join(f"{group} {_size(n)}" for group, n in decoded.items())
        + f"; {_size(plan.read_bytes() // max(plan.windows_inside, 1))} per window, "
        f"{_size(int(plan.bytes_per_cell()))} per cell; the patches need {_size(plan.needed_bytes)}: read "
        f"amplification {plan.amplification():.2f} on 1 actor, {plan.amplification(actors):.2f} on {actors}")
    say(f"compute rate: {source}")
    needed = plan.bytes_per_cell() * rate / 1e6
    say(f"read rate: {read_mbps:,.0f} MB/s per actor assumed (--read-mbps); keeping one actor computing needs "
        f"{needed:,.0f} MB/s")
    say(f"start-up of a Ray map job (the job, its actors, their model loads): {startup_how}")
    for n in sorted({1, actors}):
        compute, read = plan.compute_seconds(rate, n), plan.read_seconds(read_mbps, n)
        bound = "compute" if compute >= read else "reading"
        say(f"on {n} actor{'s' if n > 1 else ''}: start-up {_duration(startup)}, compute {_duration(compute)}, "
            f"reading {_duration(read)}: about {_duration(startup + max(compute, read))}, bound by {bound}")
    say("a projection from the rates above, not a measurement")


@app.command()
@user_errors
def evaluate(
    region: str | None = RegionOpt,
    catalog: Path | None = CatalogOpt,
    root: str | None = RootOpt,
    cv: str = typer.Option("spatial", "--cv", help="spatial: the SampleSet's block folds; random: seeded random folds."),
    folds: int | None = typer.Option(None, "--folds", min=2, max=MAX_FOLDS, help="Number of folds (default: the SampleSet's)."),
    models: str | None = typer.Option(None, "--models", help="Comma-separated, of ssl, supervised, hybrid, rf, gbm, qrf, and with AlphaEarth embeddings aef-rf, aef-qrf, aef+cov-qrf, aef-hybrid (default: all the SampleSet has inputs for); any of them with +rk (residual kriging, e.g. qrf+rk), stack (weights over the others), a tree model with +xy or +nn (spatial context features)."),
    repeats: int = typer.Option(1, "--repeats", min=1, max=MAX_REPEATS, help="Repeat the cross-validation with other fold seeds."),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="Fine-tuning epochs of the network runs (default: the catalog's); it does not reach pretraining, which `geosoc pretrain --epochs N` extends. Other epochs make new runs."),
    seeds: int | None = SeedsOpt,
    threads: int | None = ThreadsOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Every model on the same held-out folds (-> evaluation/: metrics.csv, summary.json, predictions.parquet,
    scatter.png). A re-run skips finished (model, fold) pairs."""
    from geosoc.evaluation.campaign import evaluate_region
    from geosoc.threads import use_threads

    count = use_threads(threads)
    loaded, root = _region(region, catalog, root)
    chosen = tuple(m.strip() for m in models.split(",") if m.strip()) if models is not None else None
    result = evaluate_region(loaded.config, root, cv=cv, folds=folds,  # type: ignore[arg-type]
                             models=chosen, repeats=repeats,
                             epochs=epochs, seeds=seeds, threads=count, progress=not quiet)
    print_evaluation(result.summary)
    for name, url in result.outputs.items():
        console.print(f"{name:>20}: {url}", highlight=False)


def print_evaluation(summary: dict[str, Any]) -> None:
    """The evaluation table, then the model recommended to map with (chosen without any held-out fold's
    targets: `evaluation.recommend`), the rule that chose it, its honest score and how to map with it."""
    print_table(evaluation_table(summary))
    reused = {m: s["reused_runs"] for m, s in summary["models"].items() if s.get("reused_runs")}
    if reused:
        console.print("reused from earlier runs with the same folds and settings: " + ", ".join(
            f"{m} {n} of {summary['models'][m]['folds']}" for m, n in reused.items()), highlight=False)
    chosen = summary.get("recommendation")
    if chosen is not None:
        honest = chosen.get("choices_pooled_r2")
        score = "" if honest is None else (f"; those per-fold choices scored pooled R² {honest:.3f} on their own "
                                           "held-out folds")
        console.print(f"recommended: {chosen['model']}, chosen for {chosen['chosen_for']} of {chosen['of']} "
                      f"held-out folds by this rule: {chosen['rule']}{score}", highlight=False)
        console.print(f"to map with {chosen['model']}: {how_to_map(chosen['model'])}", highlight=False)
    if summary.get("time"):
        print_table(evaluation_time_table(summary["time"]))


def how_to_map(model: str) -> str:
    """The commands that make a map with an evaluated model."""
    from geosoc.maps.tabular import fits

    if fits(model):
        return f"geosoc fit-tabular --model {model}, then geosoc predict --model {model}"
    if model == "hybrid":
        return "not possible yet (maps need the encoders' embeddings at every cell); the best other model will do"
    return "geosoc finetune" + (" --from-scratch" if model == "supervised" else "") + ", then geosoc predict"


def print_table(table: Table) -> None:
    """A table whole: written to a file or a pipe, rich would cut it to 80 columns ("0.5…"), so it gets room."""
    (console if console.is_terminal else Console(width=200)).print(table)


def evaluation_table(summary: dict[str, Any]) -> Table:
    """Mean ± sd over the held-out folds, the pooled R², and for a network ensemble its members and the sd of
    their pooled R² one by one (what one seed alone would have scored), per model."""
    units = summary.get("units", "")
    table = Table(title=f"{summary['cv']} cross-validation: means over held-out folds "
                        f"({summary.get('target', 'SOC')} in {units})",
                  box=box.SIMPLE_HEAD)
    for column in ("model", "RMSE", "R² ± sd", "CCC", "bias", "PICP90", "width", "pooled R²", "seeds: R² sd"):
        table.add_column(column, justify="right", no_wrap=True, min_width=len(column))

    def cell(value: float | None, digits: str = ".3g") -> str:
        return "-" if value is None else format(value, digits)

    for model, stats in summary["models"].items():
        mean, sd = stats["mean"], stats["sd"]
        r2 = f"{cell(mean['r2'], '.3f')} ± {cell(sd['r2'], '.2f')}" if mean["r2"] is not None else "-"
        table.add_row(model, cell(mean["rmse"]), r2, cell(mean["ccc"], ".3f"), cell(mean["bias"]),
                      cell(mean["picp"], ".3f"), cell(mean["width"]), cell(stats["pooled"]["r2"], ".3f"),
                      f"{stats['seeds']}: {cell(stats['seed_sd']['r2'], '.3f')}" if stats.get("seeds") else "-")
    return table


def evaluation_time_table(time: dict[str, Any]) -> Table:
    """Where an evaluation's time went (summary.json's "time"): per model the wall seconds of its runs' phases and
    their CPU seconds (every thread's), then the campaign's own phases (inputs, report)."""
    table = Table(title="where the evaluation's time went (wall s; CPU s of all threads)", box=box.SIMPLE_HEAD)
    phases = ("fit", "calibrate", "predict", "other")
    for column in ("", "runs", *phases, "total", "CPU"):
        table.add_column(column, justify="right", no_wrap=True)
    for model, spent in time["models"].items():
        table.add_row(model, str(spent["runs"]), *(f"{spent['wall'][p]:.1f}" for p in phases),
                      f"{sum(spent['wall'].values()):.1f}", f"{sum(spent['cpu'].values()):.1f}")
    for name, seconds in time["campaign"]["wall"].items():
        table.add_row(name, "", "", "", "", "", f"{seconds:.1f}", f"{time['campaign']['cpu'][name]:.1f}")
    table.add_row("all", "", "", "", "", "", f"{time['wall_s']:.1f}", f"{time['cpu_s']:.1f}")
    if time.get("network_processes"):
        table.caption = (f"the network runs trained {time['network_processes']} at a time in processes of their own, "
                         "beside the trees: wall seconds overlap, 'all' is the campaign's")
    return table


def _metrics_line(title: str, metrics: dict[str, Any]) -> str:
    keys = [k for k in ("val_rmse", "val_mae", "val_r2", "val_ccc", "val_picp") if k in metrics]
    return f"{title} (epoch {metrics['epoch']}): " + ", ".join(f"{k[4:].upper()} {metrics[k]:.3f}" for k in keys)


def _columns(fmt: str, id_col: str | None, x_col: str | None, y_col: str | None, target_col: str | None,
             points_crs: str, units: str) -> Any:
    """A column mapping for --format csv (or to override a preset's columns)."""
    from geosoc.data.points import PRESETS, Columns

    if not any((id_col, x_col, y_col, target_col)):
        return None
    base = PRESETS.get(fmt)
    if base is None:
        if not (x_col and y_col):
            raise InputError("--format csv needs at least --x-col and --y-col (and usually --id-col and --target-col)")
        return Columns(id_col, (x_col,), (y_col,), target_col, points_crs, units)
    return Columns(id_col or base.id, (x_col,) if x_col else base.x, (y_col,) if y_col else base.y,
                   target_col or base.target, points_crs if x_col else base.crs, base.units)


FormatOpt = typer.Option("csv", "--format", "-f", help="lucas2015, lucas2018, raca, edgeroi or csv (with the --*-col options).")
IdOpt = typer.Option(None, "--id-col", help="csv: column with the point id (none: points are named row<N>, N the line).")
XOpt = typer.Option(None, "--x-col", help="csv: column with x or longitude (in --points-crs).")
YOpt = typer.Option(None, "--y-col", help="csv: column with y or latitude.")
TargetOpt = typer.Option(None, "--target-col", help="csv: column with SOC.")
PointsCrsOpt = typer.Option("EPSG:4326", "--points-crs", help="csv: CRS of the coordinate columns.")
UnitsOpt = typer.Option("g/kg", "--units", help="csv: units of the target.")
OnErrorOpt = typer.Option("fail", "--on-error", help="drop: skip bad rows (reported); fail: stop with the report.")


@app.command()
@user_errors
def sample(
    region: str | None = RegionOpt,
    catalog: Path | None = CatalogOpt,
    root: str | None = RootOpt,
    points: Path | None = typer.Option(None, "--points", help="Soil point table (CSV or GeoParquet)."),
    fmt: str = FormatOpt,
    id_col: str | None = IdOpt,
    x_col: str | None = XOpt,
    y_col: str | None = YOpt,
    target_col: str | None = TargetOpt,
    points_crs: str = PointsCrsOpt,
    units: str = UnitsOpt,
    on_error: str = OnErrorOpt,
    random: int | None = typer.Option(None, "--random", min=1, help="Instead of --points: N random valid locations."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of --random and of fold assignment."),
    min_spacing: float | None = typer.Option(None, "--min-spacing", min=0.0, callback=finite, help="--random: minimum distance (CRS units; default: the catalog's sampling.min_spacing)."),
    from_source: bool | None = typer.Option(None, "--from-source/--from-cube", help="Read patches, climate and embeddings from the catalog's sources (Earth Engine, COGs, synthetic), resumably, or cut them from the built cube (default: the cube when a complete one is at --root, else the sources)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan reading from the sources from the catalog alone (windows, bytes, Earth Engine requests and time, beside the cube route's); write nothing."),
    workers: int | None = WorkersOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Extract patches and climate series at soil points (samples/labelled.zarr) or at random valid
    locations (samples/unlabelled.zarr), with spatial cross-validation folds: cut from the cube, or read
    straight from the sources when there is none (--from-source)."""
    from geosoc.data.cube import cube_url
    from geosoc.data.points import read_points
    from geosoc.data.sampling import random_points, sample_points, samples_url

    if (points is None) == (random is None):
        raise InputError("give either --points FILE or --random N")
    if dry_run and from_source is False:
        raise InputError("--dry-run plans reading from the sources; the cube's plan is `geosoc build-cube --dry-run`")
    loaded, root = _region(region, catalog, root, writes=not dry_run)
    config = loaded.config
    cube = cube_url(loaded, root)
    patch = config.sampling.patch_size
    spacing = config.sampling.min_spacing if min_spacing is None else min_spacing
    if points is not None:
        found = read_points(points, config.region.crs, fmt, _columns(fmt, id_col, x_col, y_col, target_col,
                            points_crs, units), config.imagery_grid.bounds, on_error)  # type: ignore[arg-type]
        print_dropped_rows(found.problems)
        kind = "labelled"
    else:
        found, kind = None, "unlabelled"
    if dry_run or (from_source if from_source is not None else not _complete_cube(cube)):
        from geosoc.data.from_source import plan_points, sample_from_source

        if dry_run:
            print_points_plan(plan_points(loaded, samples_url(root, kind), found, random, seed=seed,
                                          min_spacing=spacing, root=root), loaded, root)
            return
        console.print(f"reading from the sources (no complete cube at {cube}; --from-cube cuts from one)"
                      if from_source is None else "reading from the sources", highlight=False)
        result = sample_from_source(loaded, samples_url(root, kind), found, random, seed=seed, min_spacing=spacing,
                                    root=root, kind=kind, workers=workers, progress=not quiet)
    else:
        if found is None:
            assert random is not None  # one of the two was given (checked above)
            found = random_points(cube, random, patch, seed, spacing, workers=workers, progress=not quiet,
                                  max_nodata=config.sampling.max_nodata)
        result = sample_points(cube, found, samples_url(root, kind), patch,
                               fold_block_size=config.sampling.fold_block_size, folds=config.sampling.folds, seed=seed,
                               workers=workers, progress=not quiet, kind=kind, max_nodata=config.sampling.max_nodata)
    for line in result.dropped[:50]:
        errors.print(line, highlight=False)
    console.print(f"{result.samples:,} samples ({len(result.dropped)} dropped for missing data) -> {result.url}")
    if result.mostly_nodata:
        console.print(f"{result.mostly_nodata:,} of them have more than half their patch without data (at the edge "
                      "of the rasters): kept, with a mask the network sees (geosoc dropped them before; "
                      "sampling.max_nodata: 0.5 still does)", highlight=False)
    if not result.has_climate:
        console.print("this cube has no climate: the SampleSet holds patches only (image branch alone)")


def _complete_cube(url: str) -> bool:
    """Whether a finished cube is at `url` (`sample` then cuts from it unless told --from-source)."""
    from geosoc.io.storage import read_group_attrs

    return (read_group_attrs(url) or {}).get("geosoc_status") == "complete"


def print_points_plan(plan: Any, loaded: Any, root: str) -> None:
    """What reading the points from the sources costs, and, beside it, what building the cube to cut them costs."""
    from geosoc.data.cube import plan_cube

    table = Table(title=f"{plan.points:,} points from the sources -> {plan.url} ({_size(plan.sampleset_bytes)}); "
                        "nothing written")
    for column in ("group", "windows", "read", "requests"):
        table.add_column(column, justify="right")
    for reads in plan.reads:
        table.add_row(reads.group, f"{reads.windows:,}", _size(reads.nbytes),
                      f"{reads.requests:,}" if reads.requests is not None else "")
    print_table(table)
    remote = [reads for reads in plan.reads if reads.requests is not None]
    for reads in remote:
        console.print(f"{reads.group}: {reads.requests:,} Earth Engine requests, {reads.concurrency} at a time, at an "
                      f"assumed {reads.seconds_per_request:g} s each (catalog: seconds_per_request): about "
                      f"{_duration(reads.estimated_seconds)}", highlight=False)
    cube = plan_cube(loaded, root)
    requests = sum(layer.requests or 0 for layer in cube.layers)
    seconds = sum(layer.estimated_seconds or 0 for layer in cube.layers)
    line = f"the cube route instead: build-cube writes {_size(cube.nbytes)} in {cube.chunks:,} chunks"
    if requests:
        ours = sum(reads.requests or 0 for reads in remote)
        line += (f" from {requests:,} Earth Engine requests (about {_duration(seconds)}); from the sources: "
                 f"{ours:,} requests (about {_duration(sum(r.estimated_seconds or 0 for r in remote))}), "
                 f"{_size(plan.nbytes)} read")
    console.print(line, highlight=False)


def print_dropped_rows(problems: Sequence[Any]) -> None:
    """The rows of a point table that `--on-error drop` left out, and why (nothing when none were)."""
    from geosoc.data.points import report

    if problems:
        errors.print(f"{len(problems)} problem(s), rows dropped:\n{report(problems)}", highlight=False)


@app.command("sample-table")
@user_errors
def sample_table(
    table: Path = typer.Option(..., "--table", help="CSV with points and climate columns <variable>_<YYYY-MM>."),
    out: str = typer.Option(..., "--out", help="URL of the SampleSet to write (e.g. ./samples/labelled.zarr)."),
    crs: str = typer.Option("EPSG:4326", "--crs", help="CRS for the SampleSet's x/y (e.g. the region's)."),
    fmt: str = FormatOpt,
    id_col: str | None = IdOpt,
    x_col: str | None = XOpt,
    y_col: str | None = YOpt,
    target_col: str | None = TargetOpt,
    points_crs: str = PointsCrsOpt,
    units: str = UnitsOpt,
    patches: Path | None = typer.Option(None, "--patches", help=".npy of (rows, band, py, px) patches."),
    bands: str | None = typer.Option(None, "--bands", help="Comma-separated band names of --patches."),
    fold_block_size: float = typer.Option(50_000, "--fold-block-size", callback=finite, help="Spatial CV block side (CRS units of --crs)."),
    folds: int = typer.Option(5, "--folds", min=2, max=MAX_FOLDS, help="Number of folds."),
    on_error: str = OnErrorOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Accepted as by every command (this one shows no progress bars)."),
) -> None:
    """Build a SampleSet from data prepared elsewhere (climate series as columns and/or patches)."""
    from geosoc.data.tables import sampleset_from_table

    if not fold_block_size > 0:
        raise InputError(f"--fold-block-size must be > 0 (CRS units of --crs), got {fold_block_size:g}")

    result = sampleset_from_table(
        table, out, crs, fmt, _columns(fmt, id_col, x_col, y_col, target_col, points_crs, units), patches,
        bands.split(",") if bands else None, fold_block_size=fold_block_size, folds=folds, on_error=on_error,
    )
    print_dropped_rows(result.dropped)
    what = [name for name, present in (("climate", result.has_climate), ("patches", patches is not None)) if present]
    console.print(f"{result.samples:,} samples with {' and '.join(what)} -> {result.url}")


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
    print_table(table)
    for layer in remote:
        console.print(
            f"{layer.group}: {layer.requests:,} Earth Engine requests, {layer.concurrency} at a time, at an assumed "
            f"{layer.seconds_per_request:g} s each (catalog: seconds_per_request): about "
            f"{_duration(layer.estimated_seconds)}"
        )
    for layer in plan.layers:
        if layer.outside_chunks:
            saved = f" and {layer.requests_saved:,} requests" if layer.requests_saved else ""
            console.print(f"{layer.group}: region.mask saves {layer.outside_chunks:,} of "
                          f"{layer.chunks + layer.outside_chunks:,} chunks{saved} (wholly outside it: never requested "
                          "nor written, read as NaN)", highlight=False)


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


SCHEDULER_TIMEOUT_S = 10  # how long to keep trying a --scheduler address before calling it unreachable


def _client(address: str | None) -> Any:
    if address is None:
        return None
    from distributed import Client

    try:
        return Client(address, timeout=f"{SCHEDULER_TIMEOUT_S}s")
    except OSError as err:
        raise ServiceError(f"cannot reach the Dask scheduler at {address}: {err}") from err


def main() -> None:
    """The `geosoc` command. A usage mistake (unknown command or option, bad value) ends like every other error:
    one `error:` line with a pointer to --help, exit status 2 (click draws an "Error" box otherwise)."""
    from typer._click import exceptions as click_errors  # typer's own click: the classes its parser raises

    try:
        code = app(prog_name="geosoc", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as err:
        err.show()
        raise SystemExit(err.exit_code) from None
    except click_errors.ClickException as err:
        context = getattr(err, "ctx", None)
        helps = f" (see '{context.command_path} --help')" if context is not None else ""
        errors.print(f"[bold red]error:[/] {escape(err.format_message())}{escape(helps)}", highlight=False,
                     markup=True, soft_wrap=True)
        raise SystemExit(err.exit_code) from None
    except typer.Abort:
        errors.print("[bold red]error:[/] aborted", highlight=False, markup=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
