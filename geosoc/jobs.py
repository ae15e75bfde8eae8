"""Entry points of the Ray jobs (jobs/pretrain.py, jobs/finetune.py, jobs/predict.py): parse, call the library.

    ray job submit --working-dir . -- python jobs/pretrain.py --region demo --workers 2
    ray job submit --working-dir . -- python jobs/finetune.py --region demo --workers 1 --gpus-per-worker 1
    ray job submit --working-dir . -- python jobs/predict.py --region demo --root /shared/geosoc/demo
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any, NoReturn

from geosoc.catalog import load_catalog
from geosoc.errors import GeosocError, missing_extra
from geosoc.learn.device import gpu_share_problem
from geosoc.learn.distributed import shared_root, train_on_ray
from geosoc.learn.training import MAX_BATCH


def _at_least(low: int, high: int | None = None) -> Any:
    """An argparse type: an integer >= `low` (and <= `high`): a usage error, before anything starts on the cluster."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}" if high is None else
                                             f"must be from {low} to {high:,}, got {value}")
        return value

    parse.__name__ = "whole number"  # argparse's word for a value int() cannot read: "invalid whole number value"
    return parse


def _finite(text: str) -> float:
    """An argparse type: a finite number (Python reads 'inf' and 'nan' as numbers; no option means either)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return value


def _gpus(text: str) -> float:
    """An argparse type: GPUs per worker or actor, as Ray takes them."""
    value = float(text)
    problem = gpu_share_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


_finite.__name__ = _gpus.__name__ = "number"  # as argparse names them: "invalid number value: 'x'"


class JobParser(argparse.ArgumentParser):
    """A usage mistake ends like every other error of a job: one `error:` line, exit status 2 (argparse prints its
    usage first otherwise)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def job_parser(stage: str) -> argparse.ArgumentParser:
    """Arguments of jobs/pretrain.py, jobs/finetune.py and jobs/predict.py (also checked against infra/)."""
    how = "Ray actors" if stage == "predict" else "Ray Train TorchTrainer"
    parser = JobParser(description=f"geosoc {stage} on a Ray cluster ({how})")
    parser.add_argument("--region", help="catalog name in catalogs/")
    parser.add_argument("--catalog", help="catalog file (instead of --region)")
    parser.add_argument("--root", help="region root URL every worker reaches (default $GEOSOC_ROOT or "
                                       "./geosoc-data/<region>)")
    if stage == "predict":
        parser.add_argument("--model", help="a model under <root>/models/ (finetune, rf, gbm, qrf) or a URL "
                                             "(default: the catalog's predict.model)")
        parser.add_argument("--resolution", type=_finite, help="output cell size (default: the catalog's "
                                                             "predict.resolution)")
        parser.add_argument("--max-actors", type=_at_least(1),
                            help="actors to ask for; an autoscaling cluster adds nodes to hold them (default: the "
                                 "catalog's predict.max_actors, else what the cluster holds when the job starts)")
        parser.add_argument("--gpus-per-actor", type=_gpus, help="GPUs per actor (default 1 when the cluster has GPUs)")
        parser.add_argument("--cpus-per-actor", type=_finite, help="CPUs per actor (default 1)")
        parser.add_argument("--batch-size", type=_at_least(1), default=1024, help="cells per forward pass")
        parser.add_argument("--chunk", type=_at_least(1), help="output cells per window side")
        parser.add_argument("--max-retries", type=_at_least(0), default=3,
                            help="restarts of a dead actor and retries of its window")
        parser.add_argument("--fresh", action="store_true", help="replace an existing map instead of resuming it")
        parser.add_argument("--no-export", action="store_true", help="only maps/soc.zarr")
        return parser
    parser.add_argument("--workers", type=_at_least(1), default=1, help="Ray Train workers")
    parser.add_argument("--max-failures", type=_at_least(0), default=2,
                        help="worker-group restarts after a failure (each resumes from the last epoch)")
    parser.add_argument("--fresh", action="store_true",
                        help="start the stage over instead of resuming it (Ray's records of the earlier run go too)")
    parser.add_argument("--gpus-per-worker", type=_gpus, default=0, help="GPUs per worker (0: CPU)")
    parser.add_argument("--epochs", type=_at_least(1), help="override the catalog's epochs")
    parser.add_argument("--batch-size", type=_at_least(2, MAX_BATCH),
                        help="override the catalog's batch size (per worker)")
    parser.add_argument("--samples", help="SampleSet URL (default: the region's)")
    if stage == "finetune":
        parser.add_argument("--test-fold", type=int, help="fold held out for evaluation")
    return parser


def job_main(stage: str, argv: list[str] | None = None) -> None:
    """Entry point of jobs/pretrain.py, jobs/finetune.py and jobs/predict.py: a user's mistake ends the job
    with one `error:` line; the last line says what finished."""
    parser = job_parser(stage)
    args = parser.parse_args(argv)
    _log_to_the_job()
    if not (args.region or args.catalog):
        parser.error("give --region or --catalog")
    try:
        import ray  # noqa: F401  (a Ray job without Ray installed ends here, before any work)

        done = _predict_on_ray(args) if stage == "predict" else _train_on_ray(stage, args)
    except GeosocError as err:
        raise SystemExit(f"error: {err}") from None
    except ImportError as err:  # ray itself, or another optional part, not installed
        missing = missing_extra(err)
        if missing is None:
            raise
        raise SystemExit(f"error: {missing}") from None
    print(f"{stage} finished: {done}")


def _log_to_the_job() -> None:
    """geosoc's INFO lines (actors up, windows waiting, epochs) in the job's log, which `ray job logs` shows."""
    logger = logging.getLogger("geosoc")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _train_on_ray(stage: str, args: argparse.Namespace) -> str:
    own = ("region", "catalog", "root", "workers", "gpus_per_worker", "max_failures", "fresh")
    options = {k: v for k, v in vars(args).items() if k not in own}
    return train_on_ray(stage, args.region, args.catalog, args.root, workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, max_failures=args.max_failures, fresh=args.fresh,
                        **options)


def _predict_on_ray(args: argparse.Namespace) -> str:
    from geosoc.maps.inference import map_region

    loaded = load_catalog(args.region, args.catalog)
    root = shared_root(args.root, loaded.config.region.name)
    assets = map_region(loaded.config, root, model=args.model, resolution=args.resolution, engine="ray",
                        batch_size=args.batch_size, chunk=args.chunk, max_actors=args.max_actors,
                        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                        max_retries=args.max_retries, fresh=args.fresh,
                        export=not args.no_export, progress=False)
    return ", ".join(f"{k}={v}" for k, v in assets.items())
