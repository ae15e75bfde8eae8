"""Training throughput of the paper-size SSL-SoilNet: geosoc's pretraining loop against the bare model.

    python tests/benchmarks/training.py [--device cpu|cuda] [--batch 16] [--steps 6] [--in-memory-mib M]
    python tests/benchmarks/training.py --device cuda --batch 256 1024 --steps 12

Model: ViT (64 px, patch 8, 768 wide, 12 deep, 12 heads) + climate Transformer (512 wide, 6 layers, 8 heads,
FF 2048) projected to 128, 14 bands and 61 months x 14 variables (105 M parameters). Per batch size:
- bare: forward, NT-Xent, backward and an Adam step on normalised batches already on the device;
- loop: geosoc's own code path: a SampleSet on local disk larger than the in-memory limit (default: a quarter
  of its size, so it is streamed), `SampleStream` + DataLoader (worker processes, pinned memory), normalisation
  and augmentation on the device, `training.train_epoch` (fused Adam on CUDA, no per-step host sync).
Both run in bf16 autocast on CUDA; the first step of each is left out of the timing; the bare model is timed
before and after the loop and the faster run is the baseline. The model FLOP
utilisation (MFU) comes from torch.utils.flop_counter over one bare step, against --peak-tflops.
Last lines: `train_samples_per_s=<loop, largest batch>` and `loop_over_bare=<smallest ratio>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from geosoc.data.points import Points
from geosoc.data.sampling import SampleSetWriter, sampleset_dataset
from geosoc.data.streaming import SampleData, SampleStream, data_loader
from geosoc.learn.models import NetworkConfig, SoilNet
from geosoc.learn.models.losses import nt_xent
from geosoc.learn.training import Context, contrastive_loss, fit_normalisation, make_optimizer, train_epoch

BANDS, PATCH, MONTHS, VARIABLES = 14, 64, 61, 14


def make_sampleset(url: str, n: int) -> str:
    rng = np.random.default_rng(0)
    bands = [f"b{i}" for i in range(BANDS)]
    with SampleSetWriter(url, bands, PATCH) as writer:
        for start in range(0, n, 512):
            writer.append(rng.standard_normal((min(512, n - start), BANDS, PATCH, PATCH), dtype=np.float32))
        x, y = rng.uniform(0, 1e5, n), rng.uniform(0, 1e5, n)
        points = Points(np.array([str(i) for i in range(n)], dtype=object), x, y, x, y, np.full(n, np.nan), "",
                        "bench")
        months = [np.datetime64("2010-01-01") + np.timedelta64(31 * m, "D") for m in range(MONTHS)]
        series = rng.standard_normal((n, MONTHS, VARIABLES), dtype=np.float32)
        return writer.finish(sampleset_dataset(points, np.zeros(n, np.int8), series, months,
                                               [f"v{i}" for i in range(VARIABLES)], bands, {"patch_size": PATCH}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--in-memory-mib", type=float, help="in-memory limit (default: a quarter of the SampleSet)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak (H100/H200 SXM: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="geosoc-train-bench-"))
    results = []
    try:
        started = time.perf_counter()
        url = make_sampleset(str(folder / "s.zarr"), max(args.batch) * (args.steps + 1))
        size_mib = sum(p.stat().st_size for p in (folder / "s.zarr").rglob("*") if p.is_file()) / 2**20
        limit = args.in_memory_mib if args.in_memory_mib is not None else size_mib / 4
        os.environ["GEOSOC_IN_MEMORY_MIB"] = str(limit)
        data = SampleData(url)
        print(f"SampleSet: {data.size} samples, {size_mib:,.0f} MiB on disk, in-memory limit {limit:,.0f} MiB "
              f"({'in memory' if data.in_memory else 'streamed'}), written in {time.perf_counter() - started:.0f} s")
        norm = fit_normalisation(data, np.arange(data.size), log_target=False, seed=0)
        config = NetworkConfig(bands=data.bands, variables=data.variables, patch_size=PATCH, months=MONTHS)
        model = SoilNet(config).to(device)
        model.head.requires_grad_(False)  # as in pretraining
        optimizer = make_optimizer(model, 1e-4, device)
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        ctx = Context(device=device, progress=False)
        generator = torch.Generator(device=device).manual_seed(0)
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters on {device} "
              f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {args.steps} timed steps, "
              f"{torch.get_num_threads()} CPU threads")

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def bare_step(inputs: dict[str, torch.Tensor]) -> None:
            with autocast:
                loss = nt_xent(model.image(inputs["patch"]), model.climate(inputs["climate"]), 0.5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], is_train: bool,
                    gen: torch.Generator) -> tuple[torch.Tensor, None]:  # as `training.pretrain` makes it
            return contrastive_loss(model, norm.apply(batch), 0.5, is_train, gen), None

        for batch_size in args.batch:
            indices = np.arange(batch_size * (args.steps + 1))
            tensors = [norm.inputs(data.rows(indices[i * batch_size : (i + 1) * batch_size]), device)
                       for i in range(args.steps + 1)]
            with FlopCounterMode(display=False) as counter:
                bare_step(tensors[0])
            flops_per_sample = counter.get_total_flops() / batch_size

            def time_bare() -> float:
                sync()
                start = time.perf_counter()
                for inputs in tensors[1:]:
                    bare_step(inputs)
                sync()
                return batch_size * args.steps / (time.perf_counter() - start)

            first = time_bare()
            stream = SampleStream(data, indices, batch_size, shuffle=True, seed=0)
            clock = {"calls": 0, "start": 0.0}

            def timed_loss(*loss_args: Any) -> tuple[torch.Tensor, None]:
                clock["calls"] += 1
                if clock["calls"] == 2:  # the first step (and the loader's start) is warm-up
                    sync()
                    clock["start"] = time.perf_counter()
                return loss_fn(*loss_args)

            _, steps = train_epoch(model, optimizer, data_loader(stream, device), timed_loss, ctx, generator, autocast)
            loop = batch_size * (steps - 1) / (time.perf_counter() - clock["start"])
            bare = max(first, time_bare())  # before and after the loop: the faster is the baseline
            tensors.clear()  # free the device memory before the next batch size
            results.append((batch_size, bare, loop))
            line = f"batch {batch_size:5d}: bare {bare:9.1f} samples/s   loop {loop:9.1f} samples/s   loop/bare {loop / bare:.2f}"
            if device.type == "cuda":
                line += f"   peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                torch.cuda.reset_peak_memory_stats(device)
                line += (f"   MFU bare {flops_per_sample * bare / 1e12 / args.peak_tflops:.1%}, loop "
                         f"{flops_per_sample * loop / 1e12 / args.peak_tflops:.1%} of {args.peak_tflops:g} TFLOP/s "
                         f"({flops_per_sample / 1e9:.1f} GFLOP a sample)")
            print(line, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"train_samples_per_s={results[-1][2]:.2f}")
    print(f"loop_over_bare={min(loop / bare for _, bare, loop in results):.3f}")


if __name__ == "__main__":
    main()
