"""Training throughput of the paper-size SSL-SoilNet, against the bare model on the same batches.

    python tests/benchmarks/training.py [--batch 16] [--steps 6] [--device cpu|cuda]

Model: ViT (64 px, patch 8, 768 wide, 12 deep, 12 heads) + climate Transformer (512 wide, 6 layers, 8 heads,
FF 2048) projected to 128, 14 bands and 61 months x 14 variables. Two timings per step, after one warm-up step:
- bare: forward, NT-Xent, backward and an Adam step on tensors already on the device;
- geosoc: the same plus what the pretraining loop adds: reading the batch from a SampleSet (Zarr), normalising,
  augmenting (flips, rotations).
On CUDA both run in bf16 autocast and the model FLOP utilisation (MFU) is printed against the device's
stated bf16 peak (--peak-tflops). The last line is `train_samples_per_s=<geosoc samples/s>`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geosoc.models import ModelConfig, SoilNet
from geosoc.models.losses import nt_xent
from geosoc.points import Points
from geosoc.sampling import SampleSetWriter, sampleset_dataset
from geosoc.training import SampleData, _contrastive_loss, fit_normalisation

BANDS, PATCH, MONTHS, VARIABLES = 14, 64, 61, 14


def make_sampleset(url: str, n: int) -> str:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1e5, n), rng.uniform(0, 1e5, n)
    points = Points(np.array([str(i) for i in range(n)], dtype=object), x, y, x, y, np.full(n, np.nan), "", "bench")
    bands = [f"b{i}" for i in range(BANDS)]
    writer = SampleSetWriter(url, bands, PATCH)
    writer.append(rng.normal(size=(n, BANDS, PATCH, PATCH)).astype(np.float32))
    months = [np.datetime64("2010-01-01") + np.timedelta64(31 * m, "D") for m in range(MONTHS)]
    series = rng.normal(size=(n, MONTHS, VARIABLES)).astype(np.float32)
    return writer.finish(sampleset_dataset(points, np.zeros(n, np.int8), series, months, [f"v{i}" for i in range(VARIABLES)],
                                  bands, {"patch_size": PATCH}))


def flops_per_sample(model: SoilNet) -> float:
    """~6 x parameters x tokens for a Transformer training step (forward + backward)."""
    image = sum(p.numel() for p in model.image.parameters())
    climate = sum(p.numel() for p in model.climate.parameters())
    return 6 * (image * (PATCH // 8) ** 2 + climate * MONTHS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak (H100 SXM: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="geosoc-train-bench-"))
    try:
        url = make_sampleset(str(folder / "s.zarr"), args.batch * (args.steps + 1))
        data = SampleData(url)
        norm = fit_normalisation(data, np.arange(data.size), log_target=False, seed=0)
        config = ModelConfig(bands=data.bands, variables=data.variables, patch_size=PATCH, months=MONTHS)
        model = SoilNet(config).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        generator = torch.Generator().manual_seed(0)
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters on {device}; "
              f"batch {args.batch}, {args.steps} timed steps")

        batches = [np.arange(i * args.batch, (i + 1) * args.batch) for i in range(args.steps + 1)]
        tensors = [norm.inputs(data.batch(b), device) for b in batches]

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def bare_step(inputs: dict[str, torch.Tensor]) -> None:
            with autocast:
                loss = nt_xent(model.image(inputs["patch"]), model.climate(inputs["climate"]), 0.5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def geosoc_step(indices: np.ndarray) -> None:
            with autocast:
                loss = _contrastive_loss(model, norm.inputs(data.batch(indices), device), 0.5, True, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        bare_step(tensors[0])
        sync()
        start = time.perf_counter()
        for inputs in tensors[1:]:
            bare_step(inputs)
        sync()
        bare = args.batch * args.steps / (time.perf_counter() - start)

        geosoc_step(batches[0])
        sync()
        start = time.perf_counter()
        for indices in batches[1:]:
            geosoc_step(indices)
        sync()
        ours = args.batch * args.steps / (time.perf_counter() - start)

        print(f"bare model step:   {bare:8.2f} samples/s")
        print(f"geosoc loop step:  {ours:8.2f} samples/s  (ratio to bare {ours / bare:.2f})")
        if device.type == "cuda":
            achieved = flops_per_sample(model) * ours / 1e12
            print(f"model FLOP utilisation (bf16): {achieved:.1f} TFLOP/s = {achieved / args.peak_tflops:.1%} of "
                  f"{args.peak_tflops:g} TFLOP/s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"train_samples_per_s={ours:.2f}")


if __name__ == "__main__":
    main()
