"""SampleSets as a stream of training batches: any size, any fsspec URL, the same number of steps on every rank.

A SampleSet smaller than the in-memory limit is read once and batches are gathered from memory. A larger one
is streamed: each epoch shuffles the order of its Zarr chunks (whole chunks are read, never one sample at a
time), cuts that order into one equal piece per rank, and shuffles within windows of several chunks (a
shuffle buffer). A `torch.utils.data.DataLoader` with worker processes and pinned memory reads the next
windows while the device trains on the current batch. Everything here is NumPy on the host; normalisation and
augmentation happen on the training device (`training.Normalisation.apply`, `training.augment_patches`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from typing import Any, cast

import numpy as np
import torch
import zarr

from geosoc.data.sampling import open_sampleset
from geosoc.io.storage import zarr_store
from geosoc.threads import available_cores

log = logging.getLogger(__name__)

DEFAULT_IN_MEMORY_MIB = 4096
PREFETCH = 2  # batches each loader worker keeps ready
WINDOW_CHUNKS = 8  # a shuffle window spans at least this many Zarr chunks


def in_memory_limit() -> int:
    """Bytes of patches and climate series below which a SampleSet is held in memory (`GEOSOC_IN_MEMORY_MIB`)."""
    return int(float(os.environ.get("GEOSOC_IN_MEMORY_MIB", DEFAULT_IN_MEMORY_MIB)) * 2**20)


class SampleData:
    """A SampleSet's arrays for training: in memory when small, otherwise read from Zarr chunk by chunk."""

    def __init__(self, url: str, modalities: tuple[str, ...] = ("patch", "climate")):
        self.url = url
        ds = open_sampleset(url)
        self.attrs = dict(ds.attrs)
        self.size = ds.sizes["sample"]
        self.bands = [str(b) for b in ds["band"].values] if "patch" in ds and "patch" in modalities else []
        self.variables = [str(v) for v in ds["variable"].values] if "climate" in ds and "climate" in modalities else []
        self.months = ds.sizes.get("time", 0)
        self.time = ds["time"].values if "time" in ds.coords and self.variables else None
        self.patch_size = ds.sizes.get("py", 0)
        self.fold = ds["fold"].values.astype(np.int64)
        self.x, self.y = ds["x"].values.astype(np.float64), ds["y"].values.astype(np.float64)
        self.block_size = float(ds.attrs.get("fold_block_size") or 0)  # the side of its spatial folds' blocks
        self.target = ds["target"].values.astype(np.float64)
        self.names = [name for name, present in (("patch", self.bands), ("climate", self.variables)) if present]
        self.nbytes = sum(ds[name].nbytes for name in self.names)
        self.in_memory = self.nbytes < in_memory_limit()
        self._arrays: dict[str, Any] | None = None
        self._pid = 0
        # Rows of one shuffle unit: one sample when in memory, else the largest array's Zarr chunk.
        self.chunk_rows = 1 if self.in_memory or not self.names else int(self._open()[self.names[0]].chunks[0])

    def _open(self) -> dict[str, Any]:
        """The arrays: loaded once when in memory (shared with forked loader workers), else Zarr arrays opened
        anew in each process (a forked worker must not reuse its parent's connections)."""
        if self._arrays is None or (not self.in_memory and self._pid != os.getpid()):
            group = zarr.open_group(zarr_store(self.url, read_only=True), mode="r", zarr_format=3)
            arrays = {name: cast(zarr.Array, group[name]) for name in self.names}
            self._arrays = {k: np.asarray(a[...], np.float32) for k, a in arrays.items()} if self.in_memory else arrays
            self._pid = os.getpid()
        return self._arrays

    def load(self) -> None:
        """Read an in-memory SampleSet now (before loader workers fork, so that they share it)."""
        self._open()

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Patches, climate series and targets of `indices`, in that order (float32; NaN where no data)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = {name: np.empty((len(indices), *shape), np.float32) for name, shape in self.shapes().items()}
        self.read_into(indices, out)
        return {**out, "target": self.target[indices]}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of one sample of each array."""
        return {name: tuple(array.shape[1:]) for name, array in self._open().items()}

    def read_into(self, indices: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Fill `out` (one float32 array per name, rows in the order of `indices`): from memory, or with one
        contiguous Zarr read per chunk that `indices` touch, each row copied straight to its place."""
        for name, array in self._open().items():
            if self.in_memory:
                np.take(array, indices, axis=0, out=out[name])
                continue
            order = np.argsort(indices, kind="stable")
            rows = indices[order]
            keys = rows // array.chunks[0]
            for group in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(keys)) + 1) if len(rows) else []:
                first, last = int(rows[group[0]]), int(rows[group[-1]])
                block = array[first : last + 1]
                out[name][order[group]] = block[rows[group] - first]

    def chunk_order(self, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`indices` grouped by chunk, the chunks in random order (rows within a chunk stay in order)."""
        keys = np.asarray(indices) // self.chunk_rows
        _, compact = np.unique(keys, return_inverse=True)
        rank = rng.permutation(compact.max() + 1)[compact] if len(keys) else compact
        return np.asarray(indices)[np.argsort(rank, kind="stable")]


class SampleStream(torch.utils.data.IterableDataset):
    """Batches of `indices` for one rank of `world`: dicts of CPU tensors (`patch`, `climate`, `target`, `index`).

    Every rank gets the same number of samples (the epoch's order cut into `world` equal pieces, the few left
    over skipped that epoch), hence the same number of steps: DistributedDataParallel needs that, since every
    backward pass is a collective. Batches smaller than `min_batch` (only ever the last) are skipped.
    Loader workers take turns by window, so the batches and their number do not depend on how many workers
    there are (their order does: the DataLoader interleaves the workers).
    """

    def __init__(self, data: SampleData, indices: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world: int = 1, min_batch: int = 2, window: int | None = None) -> None:
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.indices = np.sort(np.asarray(indices, dtype=np.int64))
        self.rank, self.world, self.min_batch = rank, world, min_batch
        wanted = window or WINDOW_CHUNKS * data.chunk_rows
        self.window = batch_size * max(1, -(-wanted // batch_size))  # whole batches per window
        self.epoch = 0
        if data.in_memory:
            data.load()  # before loader workers fork, so that they share it

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def samples(self) -> int:
        """Samples this rank reads per epoch."""
        return len(self.indices) // self.world

    def __len__(self) -> int:
        full, rest = divmod(self.samples, self.batch_size)
        return full + int(rest >= self.min_batch)

    def order(self) -> np.ndarray:
        """This rank's samples for the current epoch, in the order they are batched."""
        piece = self.samples
        if not self.shuffle:
            return self.indices[self.rank * piece : (self.rank + 1) * piece]
        order = self.data.chunk_order(self.indices, np.random.default_rng([self.seed, self.epoch]))
        order = order[self.rank * piece : (self.rank + 1) * piece]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        windows = np.arange(piece) // self.window
        return order[np.lexsort((rng.random(piece), windows))]  # shuffled within each window

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order()
        for number, start in enumerate(range(0, len(order), self.window)):
            if number % workers != worker:
                continue
            part = order[start : start + self.window]
            window = {name: _empty((len(part), *shape), shared=info is not None)
                      for name, shape in self.data.shapes().items()}
            self.data.read_into(part, {name: tensor.numpy() for name, tensor in window.items()})
            target = torch.from_numpy(self.data.target[part].astype(np.float32))
            for first in range(0, len(part), self.batch_size):
                last = min(first + self.batch_size, len(part))
                if last - first < self.min_batch:
                    continue
                batch = {name: tensor[first:last] for name, tensor in window.items()}
                batch["target"] = target[first:last]
                batch["index"] = torch.from_numpy(part[first:last])
                yield batch


def _empty(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """A float32 tensor to fill; in a loader worker, made in shared memory from the start (as torch's own
    collate does), so that handing its batches to the training process copies nothing."""
    if not shared:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.empty(0, dtype=torch.float32)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.float32).new(storage).view(shape)


def loader_workers(data: SampleData, device: torch.device, batch_size: int = 0) -> int:
    """Loader processes per training process: none when batches come from memory to the CPU (nothing to
    overlap), else up to 12, as many as the shared memory that carries their batches (/dev/shm, small in some
    containers) holds with room to spare. `GEOSOC_LOADER_WORKERS` overrides."""
    if "GEOSOC_LOADER_WORKERS" in os.environ:
        return max(0, int(os.environ["GEOSOC_LOADER_WORKERS"]))
    if data.in_memory and device.type == "cpu":
        return 0
    workers = min(12, max(1, available_cores() - 4))  # a few cores stay with the training process
    batch_bytes = data.nbytes // max(1, data.size) * batch_size
    if batch_bytes and os.path.isdir("/dev/shm"):
        room = shutil.disk_usage("/dev/shm").free // (2 * PREFETCH * batch_bytes)
        if room < workers:
            log.warning("/dev/shm has room for %d loader worker(s) of batch %d, not %d; reading with %d",
                        room, batch_size, workers, room)
            workers = int(room)
    return workers


def data_loader(stream: SampleStream, device: torch.device, workers: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over a stream: worker processes read ahead, pinned host memory when the device is a GPU."""
    workers = loader_workers(stream.data, device, stream.batch_size) if workers is None else workers
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH if workers else None,
    )


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on the training device; the copy is asynchronous when the host memory is pinned."""
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def on_device(batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Batches moved to `device`. On CUDA the next batch is copied on a side stream while the current one
    trains, so the host-to-device copy costs no step time."""
    if device.type != "cuda":
        yield from (to_device(batch, device) for batch in batches)
        return
    copies = torch.cuda.Stream(device)
    waiting: list[tuple[dict[str, torch.Tensor], torch.cuda.Event]] = []
    for batch in batches:
        with torch.cuda.stream(copies):
            waiting.append((to_device(batch, device), torch.cuda.Event()))
            waiting[-1][1].record(copies)
        if len(waiting) > 1:
            yield _ready(*waiting.pop(0))
    for moved, copied in waiting:
        yield _ready(moved, copied)


def _ready(batch: dict[str, torch.Tensor], copied: torch.cuda.Event) -> dict[str, torch.Tensor]:
    """A batch copied on the side stream, made safe to use on the current stream."""
    compute = torch.cuda.current_stream()
    compute.wait_event(copied)
    for value in batch.values():
        value.record_stream(compute)  # its memory is not reused before the compute stream is done with it
    return batch
