"""Ray Train around the same pretraining and fine-tuning loops, and the entry point of the Ray jobs.

    ray job submit --working-dir . -- python jobs/pretrain.py --region demo --workers 2
    ray job submit --working-dir . -- python jobs/finetune.py --region demo --workers 1 --gpus-per-worker 1
    ray job submit --working-dir . -- python jobs/predict.py --region demo --root /shared/geosoc/demo

Each worker runs `pretrain_region`/`finetune_region` with a `Context` from Ray: its rank, its device, the
model wrapped for DistributedDataParallel, metrics reported to Ray. Rank 0 writes checkpoints under the
region root, so a resubmitted job resumes from them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from geosoc.catalog import Catalog, load_catalog
from geosoc.errors import GeosocError
from geosoc.io.storage import default_root, join

if TYPE_CHECKING:
    from geosoc.learn.training import Context


def ray_context() -> Context:
    """This Ray Train worker's `training.Context`: its rank among the workers, its device, the model wrapped in
    DistributedDataParallel (every loss comes from its forward, so gradients are averaged), metrics to Ray."""
    import ray.train
    import ray.train.torch

    from geosoc.learn.training import Context

    context = ray.train.get_context()
    return Context(
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        device=ray.train.torch.get_device(),
        wrap=lambda model: ray.train.torch.prepare_model(model, move_to_device=False),
        report=_report_to_ray,
        progress=False,
    )


def _report_to_ray(metrics: dict[str, Any], checkpoint_url: str | None) -> None:
    """An epoch's metrics to Ray; from rank 0 with a Ray checkpoint that points at geosoc's own (which stays the
    source of truth: it is what every worker resumes from after a failure)."""
    import ray.train

    if checkpoint_url is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="geosoc-ray-checkpoint-") as folder:
        Path(folder, "geosoc.json").write_text(json.dumps({"checkpoint": checkpoint_url, **metrics}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _worker_loop(config: dict[str, Any]) -> None:
    from geosoc.learn.training import finetune_region, pretrain_region

    catalog = Catalog.model_validate(yaml.safe_load(config["catalog_text"]))  # validated by the driver already
    run = pretrain_region if config["stage"] == "pretrain" else finetune_region
    kwargs = {k: config[k] for k in ("epochs", "batch_size", "samples") if config.get(k) is not None}
    if config["stage"] == "finetune" and config.get("test_fold") is not None:
        kwargs["test_fold"] = config["test_fold"]
    run(catalog, config["root"], ctx=ray_context(), **kwargs)


def _shared_root(root: str | None, region: str) -> str:
    """The region root, which every worker must reach: absolute or a URL (a job runs in a temporary dir)."""
    root = root or default_root(region)
    if "://" not in root and not os.path.isabs(root):
        raise GeosocError(
            f"--root {root!r} is relative: a Ray job runs in a temporary copy of the working dir, so give an "
            "absolute path or a URL (e.g. s3://bucket/geosoc/demo) that every worker can reach"
        )
    return root


def train_on_ray(stage: str, region: str | None, catalog: str | None, root: str | None, *, workers: int = 1,
                 gpus_per_worker: float = 0, max_failures: int = 2, fresh: bool = False, **options: Any) -> Any:
    """Run a stage under Ray Train's TorchTrainer on the cluster this process is connected to.

    A failed worker (a killed process, a lost node) restarts the worker group up to `max_failures` times; the
    loops then resume from the stage's last epoch under the root. `fresh` removes that checkpoint first, once,
    so that a restart after a failure still resumes."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from geosoc.io.progress import remove
    from geosoc.learn.training import stage_urls

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # report() otherwise blocks ~2 s
    loaded = load_catalog(region, catalog)
    root = _shared_root(root, loaded.config.region.name)
    if fresh:
        remove(stage_urls(root)[stage])
    if not ray.is_initialized():
        ray.init()
    # Workers get the catalog's text: on other nodes the driver's file path does not exist.
    config = {"stage": stage, "catalog_text": loaded.text, "root": root, **options}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker={"GPU": gpus_per_worker} if gpus_per_worker else None),
        run_config=RunConfig(name=f"geosoc-{loaded.config.region.name}-{stage}", storage_path=join(root, "ray"),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    return trainer.fit()


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
    how = "a pool of Ray actors" if stage == "predict" else "Ray Train TorchTrainer"
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
        parser.add_argument("--actors", type=_at_least(1), help="actors (default: one per GPU, else one per CPU)")
        parser.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default 1 when the cluster has GPUs)")
        parser.add_argument("--batch-size", type=_at_least(1), default=1024, help="cells per forward pass")
        parser.add_argument("--chunk", type=_at_least(1), help="output cells per window side")
        parser.add_argument("--max-retries", type=_at_least(0), default=3,
                            help="restarts of a dead actor and retries of its "
                                                                       "window")
        parser.add_argument("--fresh", action="store_true", help="replace an existing map instead of resuming it")
        parser.add_argument("--no-export", action="store_true", help="only maps/soc.zarr")
        return parser
    parser.add_argument("--workers", type=_at_least(1), default=1, help="Ray Train workers")
    parser.add_argument("--max-failures", type=_at_least(0), default=2,
                        help="worker-group restarts after a failure (each "
                                                                    "resumes from the last epoch)")
    parser.add_argument("--fresh", action="store_true", help="start the stage over instead of resuming it")
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
    if not (args.region or args.catalog):
        parser.error("give --region or --catalog")
    try:
        done = _predict_on_ray(args) if stage == "predict" else _train_on_ray(stage, args)
    except GeosocError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{stage} finished: {done}")


def _train_on_ray(stage: str, args: argparse.Namespace) -> Any:
    own = ("region", "catalog", "root", "workers", "gpus_per_worker", "max_failures", "fresh")
    options = {k: v for k, v in vars(args).items() if k not in own}
    return train_on_ray(stage, args.region, args.catalog, args.root, workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, max_failures=args.max_failures, fresh=args.fresh,
                        **options).metrics


def _predict_on_ray(args: argparse.Namespace) -> str:
    from geosoc.maps.inference import map_region

    loaded = load_catalog(args.region, args.catalog)
    root = _shared_root(args.root, loaded.config.region.name)
    assets = map_region(loaded.config, root, model=args.model, resolution=args.resolution, engine="ray",
                        batch_size=args.batch_size, chunk=args.chunk, actors=args.actors,
                        gpus_per_actor=args.gpus_per_actor, max_retries=args.max_retries, fresh=args.fresh,
                        export=not args.no_export, progress=False)
    return ", ".join(f"{k}={v}" for k, v in assets.items())
