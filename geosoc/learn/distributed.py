"""Ray Train around the same pretraining and fine-tuning loops (the Ray jobs' entry points are `geosoc.jobs`).

Each worker runs `pretrain_region`/`finetune_region` with a `Context` from Ray: its rank, its device, the
model wrapped for DistributedDataParallel, metrics reported to Ray. Rank 0 writes checkpoints under the
region root, so a resubmitted job resumes from them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geosoc.catalog import load_catalog, parse_catalog
from geosoc.errors import InputError
from geosoc.io.locks import exclusive
from geosoc.io.storage import default_root, filesystem, join

if TYPE_CHECKING:
    import pyarrow.fs

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
        lock=False,  # the job's driver holds the checkpoint's lock for every attempt of the worker group
    )


def _report_to_ray(metrics: dict[str, Any], checkpoint_url: str | None) -> None:
    """An epoch's metrics to Ray; from rank 0 with a Ray checkpoint that points at geosoc's own (which stays the
    source of truth: it is what every worker resumes from after a failure, and what `geosoc finetune`, evaluate
    and predict read outside Ray, so `ray.train.get_checkpoint` is not used to resume)."""
    import ray.train

    if checkpoint_url is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="geosoc-ray-checkpoint-") as folder:
        Path(folder, "geosoc.json").write_text(json.dumps({"checkpoint": checkpoint_url, **metrics}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _worker_loop(config: dict[str, Any]) -> None:
    from geosoc.learn.training import finetune_region, pretrain_region

    catalog = parse_catalog(config["catalog_text"])  # validated by the driver already
    run = pretrain_region if config["stage"] == "pretrain" else finetune_region
    kwargs = {k: config[k] for k in ("epochs", "batch_size", "samples") if config.get(k) is not None}
    if config["stage"] == "finetune" and config.get("test_fold") is not None:
        kwargs["test_fold"] = config["test_fold"]
    run(catalog, config["root"], ctx=ray_context(), **kwargs)


def shared_root(root: str | None, region: str) -> str:
    """The region root, which every worker must reach: absolute or a URL (a job runs in a temporary dir)."""
    root = root or default_root(region)
    if "://" not in root and not os.path.isabs(root):
        raise InputError(
            f"--root {root!r} is relative: a Ray job runs in a temporary copy of the working dir, so give an "
            "absolute path or a URL (e.g. s3://bucket/geosoc/demo) that every worker can reach"
        )
    return root


def ray_storage(root: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """Where Ray Train keeps its run records (`<root>/ray`), and the filesystem to reach it with.

    On an object store Ray gets geosoc's own fsspec filesystem, wrapped for pyarrow: left to itself, Ray would
    resolve the URL with pyarrow's S3 or GCS client, which ignores fsspec's settings (an S3-compatible
    endpoint in FSSPEC_S3_ENDPOINT_URL, gcsfs's token), so it would look for the bucket somewhere else."""
    url = join(root, "ray")
    if "://" not in url or url.startswith("file://"):
        return url, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(url)
    return path, PyFileSystem(FSSpecHandler(fs))


def train_on_ray(stage: str, region: str | None, catalog: str | None, root: str | None, *, workers: int = 1,
                 gpus_per_worker: float = 0, max_failures: int = 2, fresh: bool = False, **options: Any) -> str:
    """Run a stage under Ray Train's TorchTrainer on the cluster this process is connected to; say which epoch
    the saved model is, with its metrics (Ray's last report is the last epoch's, which early stopping passed by).

    A failed worker (a killed process, a lost node) restarts the worker group up to `max_failures` times; the
    loops then resume from the stage's last epoch under the root. `fresh` removes that checkpoint first, once,
    so that a restart after a failure still resumes, and Ray's records of the earlier run with it (Ray would
    otherwise load their snapshot and go on counting its checkpoints)."""
    from geosoc.io.progress import remove
    from geosoc.learn import checkpoint
    from geosoc.learn.training import stage_urls

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # report() otherwise blocks ~2 s
    loaded = load_catalog(region, catalog)
    region_name = loaded.config.region.name
    root = shared_root(root, region_name)
    name = f"geosoc-{region_name}-{stage}"  # one Ray run per region and stage: a resubmitted job continues it
    url = stage_urls(root)[stage]
    with exclusive(url, f"{stage} on Ray"):  # one writer: a second job for the same stage is refused
        if fresh:
            remove(url)
            remove(join(root, "ray", name))
        result = _fit_on_ray(stage, loaded.text, root, name, workers, gpus_per_worker, max_failures, options)
    best = checkpoint.load_config(url)[1].get("metrics", {})
    return f"the model saved at {url} is epoch {best.get('epoch')} of {(result.metrics or {}).get('epoch')}: {best}"


def _fit_on_ray(stage: str, catalog_text: str, root: str, name: str, workers: int, gpus_per_worker: float,
                max_failures: int, options: dict[str, Any]) -> Any:
    """The TorchTrainer run itself; Ray's result (its last report)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init()
    storage_path, storage_filesystem = ray_storage(root)
    # Workers get the catalog's text: on other nodes the driver's file path does not exist.
    config = {"stage": stage, "catalog_text": catalog_text, "root": root, **options}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker={"GPU": gpus_per_worker} if gpus_per_worker else None),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    return trainer.fit()
