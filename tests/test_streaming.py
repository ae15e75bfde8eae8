"""The streaming SampleSet Dataset: every sample once per epoch, whole-chunk reads, equal shares per rank, the
same batches whatever the number of loader workers, and memory that does not grow with the SampleSet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from geosoc.data.points import Points
from geosoc.data.sampling import SampleSetWriter, sample_chunk_rows, sampleset_dataset
from geosoc.data.streaming import SampleData, SampleStream, data_loader
from tests.helpers import REPO, tiny_sampleset


@pytest.fixture
def streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOSOC_IN_MEMORY_MIB", "0")  # every SampleSet is streamed from Zarr


def test_patches_and_climate_share_chunk_rows(tmp_path: Path) -> None:
    url = tiny_sampleset(str(tmp_path / "s.zarr"), n=40)
    group = zarr.open_group(url, mode="r")
    rows = sample_chunk_rows(3 * 8 * 8 * 4)
    assert group["patch"].chunks[0] == group["climate"].chunks[0] == rows


def test_an_epoch_reads_every_sample_once_by_whole_chunks(tmp_path: Path, streamed: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("geosoc.data.sampling.TARGET_CHUNK_BYTES", 20 * 3 * 8 * 8 * 4)  # 20 samples a chunk
    url = tiny_sampleset(str(tmp_path / "s.zarr"), n=300)
    data = SampleData(url)
    assert not data.in_memory and data.chunk_rows == 20
    source = zarr.open_group(url, mode="r")
    assert source["climate"].chunks[0] == 20
    reads: list[tuple[int, int]] = []
    original = zarr.Array.__getitem__

    def counting(self: zarr.Array, selection: object) -> np.ndarray:
        if isinstance(selection, slice):
            reads.append((selection.start, selection.stop))
        return original(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", counting)
    indices = np.arange(0, 300, 3)[5:]  # a subset, as a training split is
    stream = SampleStream(data, indices, batch_size=16, shuffle=True, seed=1, window=40)
    epochs = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        reads.clear()
        batches = list(stream)
        seen = np.concatenate([b["index"].numpy() for b in batches])
        assert sorted(seen) == sorted(indices) and len(batches) == len(stream)
        for batch in batches:  # values are the rows they claim to be
            i = batch["index"].numpy()
            np.testing.assert_array_equal(batch["patch"].numpy(), source["patch"][...][i])
            np.testing.assert_array_equal(batch["climate"].numpy(), source["climate"][...][i])
        assert all(stop - start <= 20 and start // 20 == (stop - 1) // 20 for start, stop in reads)
        assert len(reads) <= 2 * (300 // 20 + len(seen) // 40 + 1)  # per chunk and window, not per sample
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_ranks_get_equal_disjoint_shares_of_an_odd_count(tmp_path: Path) -> None:
    data = SampleData(tiny_sampleset(str(tmp_path / "s.zarr"), n=67))
    indices = np.arange(67)
    streams = [SampleStream(data, indices, 8, shuffle=True, seed=3, rank=r, world=2) for r in range(2)]
    shares = [np.concatenate([b["index"].numpy() for b in s]) for s in streams]
    assert len(streams[0]) == len(streams[1]) == 4  # 33 samples each: 4 x 8, and 1 too few for a batch
    assert len(shares[0]) == len(shares[1]) == 32 and not set(shares[0]) & set(shares[1])


def test_loader_workers_do_not_change_the_batches(tmp_path: Path, streamed: None) -> None:
    data = SampleData(tiny_sampleset(str(tmp_path / "s.zarr"), n=100))
    stream = SampleStream(data, np.arange(100), 8, shuffle=True, seed=0, window=16)

    def batches(workers: int) -> list[tuple[int, ...]]:
        return sorted(tuple(b["index"].tolist()) for b in data_loader(stream, torch.device("cpu"), workers))

    assert batches(0) == batches(2)


CHILD = """
import json, sys
import numpy as np
from geosoc.catalog import PretrainConfig
from geosoc.learn.models import NetworkConfig
from geosoc.data.streaming import SampleData
from geosoc.learn.training import Context, pretrain
sys.path.insert(0, "tests/benchmarks")
from memory import peak_rss_mib
url, out = sys.argv[1], sys.argv[2]
data = SampleData(url)
before = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
config = NetworkConfig(bands=data.bands, variables=data.variables, patch_size=32, months=4, image_patch=8, image_dim=16,
                       image_depth=1, image_heads=2, climate_dim=16, climate_layers=1, climate_heads=2,
                       climate_feedforward=32, embedding=8, head_hidden=16)
result = pretrain(url, out, config, PretrainConfig(epochs=1, batch_size=64), ctx=Context(progress=False))
print(json.dumps({"in_memory": data.in_memory, "steps": result["history"][-1]["steps"],
                  "training_mib": peak_rss_mib() - before}))
"""


def _sampleset_of(url: str, n: int) -> str:
    """`n` samples of 8 bands x 32 x 32 px (32 KiB each), written in parts."""
    rng = np.random.default_rng(0)
    with SampleSetWriter(url, [f"b{i}" for i in range(8)], 32) as writer:
        for start in range(0, n, 1024):
            writer.append(rng.standard_normal((min(1024, n - start), 8, 32, 32), dtype=np.float32))
        x, y = rng.uniform(0, 1e5, n), rng.uniform(0, 1e5, n)
        points = Points(np.array([f"s{i}" for i in range(n)], dtype=object), x, y, x, y, np.full(n, np.nan), "", "t")
        months = [np.datetime64(f"2010-0{m}-01") for m in range(1, 5)]
        return writer.finish(sampleset_dataset(points, np.zeros(n, np.int8), rng.normal(size=(n, 4, 2)), months,
                                               ["pr", "tmmx"], [f"b{i}" for i in range(8)], {"patch_size": 32}))


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_the_sampleset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SampleSet 4x the in-memory limit trains within 1.3x the memory of one just under the limit (held in
    memory). Limit and chunk size are scaled down together (64 MiB and 256 KiB for 4 GiB and 8 MiB); what is
    compared is what training adds to the process (peak minus the resident size before it): importing torch
    and the rest weighs ~1 GB here and would hide any difference."""
    limit_mib = 64
    monkeypatch.setattr("geosoc.data.sampling.TARGET_CHUNK_BYTES", 256 * 2**10)
    env = {**os.environ, "GEOSOC_IN_MEMORY_MIB": str(limit_mib), "GEOSOC_LOADER_WORKERS": "0",
           "OMP_NUM_THREADS": "1"}
    used = {}
    for name, n in (("small", limit_mib * 32 - 64), ("large", limit_mib * 32 * 4)):
        url = _sampleset_of(str(tmp_path / f"{name}.zarr"), n)
        done = subprocess.run([sys.executable, "-c", CHILD, url, str(tmp_path / f"{name}-model")], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        used[name] = json.loads(done.stdout.strip().splitlines()[-1])
    assert used["small"]["in_memory"] and not used["large"]["in_memory"]
    assert used["large"]["steps"] > 3 * used["small"]["steps"]
    assert used["small"]["training_mib"] > limit_mib * 0.9  # the small one really is held in memory
    assert used["large"]["training_mib"] <= 1.3 * used["small"]["training_mib"], used


def test_forward_all_keeps_the_order_asked_for(tmp_path: Path, streamed: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Outputs line up with the requested indices, also when loader workers interleave batches."""
    monkeypatch.setattr("geosoc.data.sampling.TARGET_CHUNK_BYTES", 2 * 3 * 8 * 8 * 4)  # 2 samples a chunk: many windows
    from geosoc.learn.models import SoilNet
    from geosoc.learn.training import fit_normalisation, forward_all
    from tests.helpers import config_for

    url = tiny_sampleset(str(tmp_path / "s.zarr"), n=90)
    data = SampleData(url)
    model = SoilNet(config_for(url)).eval()
    norm = fit_normalisation(data, np.arange(90), True, 0)
    wanted = np.random.default_rng(0).permutation(90)[:70]
    quantiles, features = forward_all(model, data, wanted, norm, torch.device("cpu"), 8, workers=2)
    with torch.no_grad():
        expected = model.features(norm.inputs(data.rows(wanted), torch.device("cpu")))
    torch.testing.assert_close(torch.from_numpy(features), expected)
    torch.testing.assert_close(torch.from_numpy(quantiles), model.quantiles_of(expected))
