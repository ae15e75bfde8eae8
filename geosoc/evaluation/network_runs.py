"""The network runs of an evaluation campaign (each a fine-tuning and its held-out predictions), side by side on a
CPU with several cores.

A small network's training step on a CPU is many small operations, which torch's threads share poorly: two cores
fine-tune 1.44x as fast as one (docs/results/benchmarks.md). So on a CPU with several cores a campaign starts all
its network runs at once in a pool of processes, one per core, each on its own share of the threads, and goes on
with the tree models while they train; it takes each run's result in its turn. The processes are spawned, not
forked (a fork of a process whose torch threads have run can hang). On a GPU, or with one core, the runs are made
in this process when their turn comes, as before. A run is the same computation either way: the same settings,
seed and folds; only the thread count differs, which can change a float's last bits.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from geosoc.catalog import Catalog
from geosoc.data.streaming import SampleData
from geosoc.errors import IncompleteError
from geosoc.learn.training import Context, finetune_region, member_predictions
from geosoc.stopwatch import Spent, collecting, phase

Members = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # each member's (lower, median, upper)
Key = tuple[str, int, tuple[int, ...]]  # (model, repeat, held-out folds)


@dataclass(frozen=True)
class Campaign:
    """What every network run of a campaign shares."""

    catalog: Catalog
    root: str
    samples: str  # the labelled SampleSet's URL
    epochs: int | None
    pretrained: str | None  # the encoders ssl starts from


@dataclass(frozen=True)
class NetworkRun:
    model: str  # ssl (from the pretrained encoders) or supervised (from scratch)
    repeat: int
    held: tuple[int, ...]  # the folds held out (two for a pair run, held out as the first)
    url: str  # the run's checkpoint folder
    folds: np.ndarray  # every sample's fold in this run (-1: unlabelled)
    test: np.ndarray  # the held-out samples (indices into the SampleSet)

    @property
    def key(self) -> Key:
        return self.model, self.repeat, self.held


def run(campaign: Campaign, network: NetworkRun, device: torch.device,
        data: SampleData | None = None) -> tuple[Members, dict[str, Spent]]:
    """Fine-tune one run (resuming it if it was cut short) and predict its held-out samples: each member's
    calibrated (lower, median, upper), and where the time went (fit, calibrate, predict)."""
    with collecting("other") as spent:
        with phase("fit"):  # fine-tuning marks its calibration as a phase of its own
            finetune_region(campaign.catalog, campaign.root, epochs=campaign.epochs, test_fold=network.held[0],
                            ctx=Context(device=device, progress=False), out=network.url, folds=network.folds,
                            pretrained=campaign.pretrained if network.model == "ssl" else False,
                            seed=campaign.catalog.training.seed + network.repeat)
        with phase("predict"):
            members = member_predictions(network.url, data or SampleData(campaign.samples), network.test, device)
    return members, spent


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_worker(campaign: Campaign, network: NetworkRun) -> tuple[Members, dict[str, Spent]]:
    return run(campaign, network, torch.device("cpu"))


class Runs:
    """The results of a campaign's network runs: from the processes they were started in, or made when asked."""

    def __init__(self, campaign: Campaign, device: torch.device, data: SampleData,
                 futures: dict[Key, Future[tuple[Members, dict[str, Spent]]]], processes: int = 0) -> None:
        self.campaign, self.device, self.data, self.futures = campaign, device, data, futures
        self.processes = processes  # how many processes make them side by side (0: this one, each in its turn)

    def result(self, network: NetworkRun) -> tuple[Members, dict[str, Spent]]:
        """A run's members' predictions and where its time went (its own process's, when it ran in one)."""
        future = self.futures.pop(network.key, None)
        if future is None:
            return run(self.campaign, network, self.device, self.data)
        try:
            return future.result()
        except BrokenProcessPool as err:
            raise IncompleteError(f"the process training {network.url} ended without a result (killed, or out of "
                                  "memory?); run evaluate again to resume it, or with --threads 1 to train the "
                                  "networks in this process, one at a time") from err


@contextmanager
def started(campaign: Campaign, networks: list[NetworkRun], device: torch.device, threads: int,
            data: SampleData) -> Iterator[Runs]:
    """The network runs to make, started side by side in up to `threads` processes when that helps (a CPU, two
    cores and two runs at least), else made one by one as their results are asked for. Leaving cancels the runs
    not started and waits for those that have (a run stopped halfway is resumed by the next campaign)."""
    workers = min(threads, len(networks))
    if device.type != "cpu" or workers < 2:
        yield Runs(campaign, device, data, {})
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(max(1, threads // workers),))
    try:
        futures = {network.key: pool.submit(_run_in_worker, campaign, network) for network in networks}
        yield Runs(campaign, device, data, futures, workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
