"""Two Ray Train workers on a real local Ray head (CPU, gloo): the loops are right on many workers.

After pretraining and fine-tuning both ranks hold identical weights (every loss comes through the
DistributedDataParallel forward), both made the same number of steps from an odd sample count, and NT-Xent
with negatives gathered across the workers equals the single-process loss over both batches, gradient
included. Ranks that see different validation losses still stop together, on rank 0's figures."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from geosoc.errors import GeosocError
from geosoc.learn import checkpoint
from geosoc.learn.models.losses import nt_xent
from tests.helpers import config_for, ray_actor_pids, submit_job, tiny_sampleset

B, DIM = 6, 8


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, DIM, generator=generator), torch.randn(2 * B, DIM, generator=generator)


def _digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(getattr(model, "module", model).state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def _worker(config: dict[str, Any]) -> None:
    """One rank: the gathered loss on its half of fixed embeddings, then real pretraining and fine-tuning."""
    from geosoc.catalog import FinetuneConfig, PretrainConfig
    from geosoc.learn.distributed import ray_context
    from geosoc.learn.models import NetworkConfig
    from geosoc.learn.training import finetune, pretrain

    ctx = ray_context()
    models: list[torch.nn.Module] = []
    prepare = ctx.wrap
    ctx.wrap = lambda model: models.append(prepare(model)) or models[-1]
    a, b = _embeddings()
    mine = slice(ctx.rank * B, (ctx.rank + 1) * B)
    a_mine, b_mine = a[mine].clone().requires_grad_(), b[mine].clone().requires_grad_()
    loss = nt_xent(a_mine, b_mine, 0.5, gather=True)
    loss.backward()
    out: dict[str, Any] = {"loss": loss.item(), "grad_a": a_mine.grad.tolist(), "grad_b": b_mine.grad.tolist()}
    model = NetworkConfig.from_dict(config["model"])
    runs = {
        "pretrain": lambda: pretrain(config["samples"], f"{config['out']}/pre", model,
                                     PretrainConfig(epochs=1, batch_size=8), ctx=ctx),
        "finetune": lambda: finetune(config["samples"], f"{config['out']}/ft", model,
                                     FinetuneConfig(epochs=1, batch_size=8), ctx=ctx),
    }
    for stage, run in runs.items():
        history = run()["history"]
        out[stage] = {"steps": history[-1]["steps"], "weights": _digest(models[-1]),
                      "is_ddp": type(models[-1]).__name__ == "DistributedDataParallel"}
    out["disagreeing"] = _disagreeing_finetune(ctx, model, config["samples"], f"{config['out']}/disagree")
    Path(config["out"], f"rank{ctx.rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def two_workers(ray_head: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One TorchTrainer run of `_worker` on 2 CPU workers (a Ray Train start costs ~20 s: the tests share it)."""
    import ray
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    folder = tmp_path_factory.mktemp("two-workers")
    # odd: pretraining trains on 60 samples (30 a rank, 4 batches), fine-tuning on 48 (19 held out; 24 a rank, 3)
    url = tiny_sampleset(str(folder / "s.zarr"), n=67)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
        monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests package
        ray.init(address=ray_head["gcs"], logging_level="ERROR")
        try:
            TorchTrainer(
                _worker,
                train_loop_config={"samples": url, "model": config_for(url).to_dict(), "out": str(folder)},
                scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                torch_config=TorchConfig(timeout_s=300),  # a hang guard: ranks that part ways fail, not wait
                run_config=RunConfig(name="geosoc-ddp-test", storage_path=str(folder / "ray-results")),
            ).fit()
        finally:
            ray.shutdown()
            cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return folder


@pytest.mark.slow
def test_two_ray_workers_train_as_one(two_workers: Path) -> None:
    ranks = [json.loads((two_workers / f"rank{r}.json").read_text()) for r in range(2)]
    for stage, steps in (("pretrain", 4), ("finetune", 3)):
        assert ranks[0][stage]["is_ddp"] and ranks[0][stage]["steps"] == ranks[1][stage]["steps"] == steps
        assert ranks[0][stage]["weights"] == ranks[1][stage]["weights"], stage
    a, b = _embeddings()
    a.requires_grad_(), b.requires_grad_()
    single = nt_xent(a, b, 0.5)
    single.backward()
    assert np.mean([r["loss"] for r in ranks]) == pytest.approx(single.item(), rel=1e-5)
    # DistributedDataParallel averages gradients over the 2 workers: that average is the single-process one.
    for name, full in (("grad_a", a.grad), ("grad_b", b.grad)):
        gathered = torch.tensor(np.concatenate([r[name] for r in ranks]), dtype=torch.float32) / 2
        torch.testing.assert_close(gathered, full, rtol=1e-4, atol=1e-6)


def _tiny_catalog(tmp_path: Path) -> Path:
    import yaml

    from tests.helpers import REPO

    catalog = yaml.safe_load((REPO / "catalogs" / "demo.yaml").read_text())
    catalog["model"] = {"image": {"patch": 4, "dim": 16, "depth": 1, "heads": 2},
                        "climate": {"dim": 16, "layers": 1, "heads": 2, "feedforward": 32}, "embedding": 8}
    path = tmp_path / "demo-tiny.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


def _size(path: Path) -> int:
    """The size of a file that may not be there yet (0 then)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _epochs_saved(url: str) -> int:
    """Epochs in a resumable checkpoint (0 while there is none, or while it is being replaced)."""
    try:
        return int(checkpoint.state_info(url)["epoch"]) if checkpoint.is_checkpoint(url) else 0
    except GeosocError:
        return 0


@pytest.mark.slow
def test_a_pretrain_job_survives_a_killed_worker(ray_head: dict[str, Any], tmp_path: Path) -> None:
    """`ray job submit` of jobs/pretrain.py with two workers; one is killed with SIGKILL after the first epoch
    (the worker that published it waits, so the kill lands there whatever the machine's load): Ray restarts the
    group, the loops resume from the last epoch, the job finishes every epoch and ends with the final metrics."""
    import signal
    import time
    import uuid

    from tests.helpers import follow_job, run_guarded, wait_with_progress
    from tests.ray_pause import PAUSE_ENV

    root = tmp_path / "demo"
    tiny_sampleset(str(root / "samples" / "unlabelled.zarr"), n=240)
    job = f"geosoc-kill-{uuid.uuid4().hex[:8]}"
    ray = [ray_head["ray"], "job"]
    address = ["--address", ray_head["address"]]
    last = str(root / "models" / "pretrain" / "last")
    marks = tmp_path / "marks"
    marks.mkdir()
    runtime_env = {"worker_process_setup_hook": "tests.ray_pause.pause_at_first_publish",
                   "env_vars": {PAUSE_ENV: json.dumps({"at": f"{last}/config.json", "marks": str(marks)})}}
    submitted = submit_job(ray_head, [
        "--no-wait", "--submission-id", job, "--runtime-env-json", json.dumps(runtime_env), "--", "python",
        "jobs/pretrain.py", "--catalog", str(_tiny_catalog(tmp_path)), "--root", str(root), "--workers", "2",
        "--epochs", "4", "--batch-size", "8"])
    assert submitted.returncode == 0, submitted.stderr

    asked_at = [time.monotonic()]

    def paused() -> bool:
        if (marks / "paused").exists():
            return True
        if time.monotonic() - asked_at[0] > 10:  # a job that ended without getting there fails now, not at the guard
            asked_at[0] = time.monotonic()
            asked = run_guarded([*ray, "status", *address, job], env=ray_head["env"])
            said = asked.stdout + asked.stderr
            assert asked.returncode != 0 or ": PENDING" in said or ": RUNNING" in said, said[-3000:]
        return False

    # progress: the job's log grows (the driver's and, forwarded to it, its workers' lines)
    logs_folder = Path(ray_head["temp"]) / "session_latest" / "logs"
    wait_with_progress(paused, lambda: _size(logs_folder / f"job-driver-{job}.log"), "a worker to publish epoch 1")
    assert _epochs_saved(last) == 1
    workers = ray_actor_pids(Path(ray_head["temp"]), "RayTrainWorker")
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    (marks / "go").touch()
    logs = follow_job(ray_head, job)
    status = run_guarded([*ray, "status", *address, job], env=ray_head["env"])
    assert "succeeded" in status.stdout, logs[-3000:]
    history = checkpoint.state_info(last)["history"]
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    # The driver's own lines: less `ray job`'s and the workers' (streamed to the log in their own time).
    own = [line for line in logs.strip().splitlines() if " cli.py:" not in line and "pid=" not in line]
    best = checkpoint.load_config(str(root / "models" / "pretrain"))[1]["metrics"]
    assert own[-1] == f"pretrain finished: the model saved at {root / 'models' / 'pretrain'} is epoch " \
                      f"{best['epoch']} of 4: {best}", "\n".join(own[-15:])


@pytest.mark.slow
def test_finetune_jobs_train_on_s3_and_gcs(ray_head: dict[str, Any], s3: dict[str, str], gcs: dict[str, str],
                                          tmp_path: Path) -> None:
    """`ray job submit jobs/finetune.py --root s3://…` (moto) and `--root gs://…` (the loopback GCS server), each
    with only the settings users give (the job's environment): Ray's run records and geosoc's checkpoint land in
    the bucket (Ray used pyarrow's own S3 client before, which looked for the bucket on AWS). They are submitted
    with --fresh over an earlier run's leftovers, which go, Ray's records included. The two jobs run side by side
    on the head, as a cluster runs them."""
    import uuid

    from tests.helpers import BUCKET, bucket_listing, bucket_python, bucket_settings, follow_job

    local = tmp_path / "region"
    tiny_sampleset(str(local / "samples" / "labelled.zarr"), n=40)
    earlier = ("models/finetune/state.json", "ray/geosoc-demo-finetune/checkpoint_manager_snapshot.json")
    jobs = {}
    for bucket in (s3, gcs):
        root = f"{bucket['scheme']}://{BUCKET}/ray-{uuid.uuid4().hex[:8]}"
        bucket_python(bucket, f"import fsspec; fs = fsspec.filesystem({bucket['scheme']!r}); "
                              f"fs.put({str(local / 'samples')!r}, {root + '/samples'!r}, recursive=True); "
                              f"[fs.pipe_file({root!r} + '/' + name, b'from an earlier run') for name in {earlier!r}]")
        job = f"geosoc-{bucket['scheme']}-{uuid.uuid4().hex[:8]}"
        submitted = submit_job(ray_head, [
            "--no-wait", "--submission-id", job, "--runtime-env-json",
            json.dumps({"env_vars": bucket_settings(bucket)}), "--", "python", "jobs/finetune.py", "--catalog",
            str(_tiny_catalog(tmp_path)), "--root", root, "--batch-size", "8", "--epochs", "1", "--fresh"])
        assert submitted.returncode == 0, submitted.stderr
        jobs[job] = (bucket, root)
    for job, (bucket, root) in jobs.items():
        logs = follow_job(ray_head, job)
        assert "is epoch 1 of 1: {'epoch': 1," in logs, logs[-3000:]  # a leftover read back would have failed it
        snapshot = bucket_python(bucket, f"import fsspec; print(fsspec.filesystem({bucket['scheme']!r}).cat("
                                         f"{root!r} + '/{earlier[1]}'))")
        assert "from an earlier run" not in snapshot  # Ray wrote its own after the old one was removed
        names = bucket_listing(bucket, root)
        assert "models/finetune/config.json" in names
        ray_records = [n for n in names if n.startswith("ray/geosoc-demo-finetune/")]
        assert any(n.endswith("geosoc.json") for n in ray_records), names  # Ray's checkpoint, pointing at geosoc's


def _disagreeing_finetune(ctx: Any, model: Any, samples: str, out: str) -> dict[str, Any]:
    """A fine-tuning whose ranks see different validation losses (as bf16 kernels may give): rank 0 improves
    every epoch, rank 1 never after the first. Deciding alone with patience 1, rank 1 would stop after epoch 2
    and leave rank 0 waiting in the next epoch's collectives."""
    from geosoc.catalog import FinetuneConfig
    from geosoc.learn import training

    validate, seen = training._validate, []

    def perturbed(*args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = validate(*args, **kwargs)
        seen.append(dict(metrics))  # what the whole validation part gave this rank, before the fault
        metrics["val_loss"] = 10.0 - len(seen) if ctx.rank == 0 else 10.0
        return metrics

    training._validate = perturbed
    try:
        result = training.finetune(samples, out, model, FinetuneConfig(epochs=4, batch_size=8, patience=1), ctx=ctx)
    finally:
        training._validate = validate
    return {"history": result["history"], "seen": seen}


@pytest.mark.slow
def test_ranks_that_disagree_on_validation_stop_together(two_workers: Path) -> None:
    """Stopping and the best model follow rank 0's figures on every rank: no hang, both ranks train the same
    epochs, and the saved model is the epoch the metrics name. Validation is sharded and its sums combined, so
    both ranks see the whole part's figures before the fault."""
    ranks = [json.loads((two_workers / f"rank{r}.json").read_text())["disagreeing"] for r in range(2)]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert [m["val_loss"] for m in ranks[0]["history"]] == [9.0, 8.0, 7.0, 6.0]
    assert ranks[0]["seen"] == ranks[1]["seen"] and "val_r2" in ranks[0]["seen"][0]
    _, meta = checkpoint.load_config(str(two_workers / "disagree"))
    assert meta["epoch"] == 4 and meta["metrics"]["val_loss"] == 6.0
