"""Entry points of the Ray jobs (jobs/pretrain.py, jobs/finetune.py, jobs/predict.py): parse, call the library.

    ray job submit --working-dir . -- python jobs/pretrain.py --region demo --workers 2
    ray job submit --working-dir . -- python jobs/finetune.py --region demo --workers 1 --gpus-per-worker 1
    ray job submit --working-dir . -- python jobs/predict.py --region demo --root /shared/geosoc/demo
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from geosoc.catalog import load_catalog
from geosoc.errors import GeosocError, missing_extra
from geosoc.learn.distributed import shared_root, train_on_ray


def _at_least(low: int) -> Any:
    """An argparse type: an integer >= `low` (a usage error, before anything starts on the cluster)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def job_parser(stage: str) -> argparse.ArgumentParser:
    """Arguments of jobs/pretrain.py, jobs/finetune.py and jobs/predict.py (also checked against infra/)."""
    how = "Ray actors" if stage == "predict" else "Ray Train TorchTrainer"
    parser = argparse.ArgumentParser(description=f"geosoc {stage} on a Ray cluster ({how})")
    parser.add_argument("--region", help="catalog name in catalogs/")
    parser.add_argument("--catalog", help="catalog file (instead of --region)")
    parser.add_argument("--root", help="region root URL every worker reaches (default $GEOSOC_ROOT or "
                                       "./geosoc-data/<region>)")
    if stage == "predict":
        parser.add_argument("--model", help="a model under <root>/models/ (finetune, rf, gbm, qrf) or a URL "
                                             "(default: the catalog's predict.model)")
        parser.add_argument("--resolution", type=float, help="output cell size (default: the catalog's "
                                                             "predict.resolution)")
        parser.add_argument("--max-actors", type=_at_least(1),
                            help="actors to ask for; an autoscaling cluster adds nodes to hold them (default: the "
                                 "catalog's predict.max_actors, else what the cluster holds when the job starts)")
        parser.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default 1 when the cluster has GPUs)")
        parser.add_argument("--cpus-per-actor", type=float, help="CPUs per actor (default 1)")
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
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (0: CPU)")
    parser.add_argument("--epochs", type=_at_least(1), help="override the catalog's epochs")
    parser.add_argument("--batch-size", type=_at_least(2), help="override the catalog's batch size (per worker)")
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
