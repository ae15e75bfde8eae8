"""Maps on Ray: up to N actors, each a `WindowPipeline` (read, compute and write overlapped) fed several windows
at once, sized from what the user asks rather than from what happens to be up when the job starts.

Each actor works through a contiguous run of the windows in their reading order (`maps.reads`: strips whose
cube chunks its cache holds), so the windows that share a chunk share an actor and the chunk is decoded once; an
actor whose run is done takes the far half of the longest run left (`Runs`).

All N actors are requested at once. Those the cluster can place start; the others wait as pending actors, which
is the demand an autoscaler (KubeRay's, the cluster launcher's) answers by adding nodes; each actor takes windows
from the moment it is up. An actor that dies is restarted by Ray and its windows retried (rewritten whole);
one that stays dead hands its windows to the others. Actors log to the driver, so their warnings and
tracebacks are in the job's log.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from geosoc.errors import GeosocError, IncompleteError
from geosoc.grid import Window
from geosoc.maps.chunks import ReadCount
from geosoc.maps.predictor import load_predictor
from geosoc.maps.reads import MapReads
from geosoc.maps.windows import IN_FLIGHT, CubeAccess, MapSpec, RaySizing, WindowPipeline

log = logging.getLogger(__name__)

STATUS_EVERY_S = 30.0  # how often a job waiting for the cluster says so


class WindowWorker:
    """A Ray actor: the model loaded once (on its GPU when it has one); `run` is called from IN_FLIGHT threads.

    A failure while starting is kept and raised by `where`, so that the driver shows the actual error (Ray
    reports a constructor's exception only as text)."""

    def __init__(self, spec: MapSpec, out: str, build_id: str, threads: int, cube: CubeAccess) -> None:
        torch.set_num_threads(max(1, threads))
        self.pipeline: WindowPipeline | None = None
        self.failure: Exception | None = None
        try:
            self.pipeline = WindowPipeline(spec, out, build_id, load_predictor(spec.model, None, spec.batch_size),
                                           cube)
        except Exception as err:  # raised again by `where`, on the driver's first call
            self.failure = err

    def where(self) -> str:
        """Where this actor runs (host, pid, device)."""
        if self.failure is not None:
            raise self.failure
        assert self.pipeline is not None
        return f"{socket.gethostname()} pid {os.getpid()} on {self.pipeline.predictor.device}"

    def run(self, window: Window) -> str:
        assert self.pipeline is not None
        return self.pipeline.run(window)

    def decoded(self) -> ReadCount:
        assert self.pipeline is not None
        return self.pipeline.decoded


class Runs:
    """Which windows each actor works through: contiguous runs of the reading order, one per actor to begin with
    (`MapReads.split`: neighbours walk toward each other). An actor whose run is done takes a run no actor holds,
    else the part of the longest run left that its owner would come to last, cut where the two parts share the
    fewest chunks, and walks it back toward the owner: the part next to it when the owner is its neighbour. An
    actor that dies hands its windows back as a run of their own."""

    def __init__(self, reads: MapReads, ordered: Sequence[Window], parts: int, reach: int) -> None:
        self.reads, self.reach = reads, reach
        self.free: list[deque[Window]] = [deque(run) for run in reads.split(ordered, parts, reach)]
        self.owned: dict[Any, deque[Window]] = {}

    def __len__(self) -> int:
        return sum(map(len, self.free)) + sum(map(len, self.owned.values()))

    def next(self, actor: Any) -> Window | None:
        """The actor's next window (None: nothing is left that another actor is not about to run)."""
        run = self.owned.get(actor)
        if not run:
            taken = self._take()
            if taken is None:
                return None
            run = self.owned[actor] = taken
        return run.popleft()

    def _take(self) -> deque[Window] | None:
        if self.free:
            return self.free.pop(0)
        longest = max(self.owned.values(), key=len, default=deque())
        if len(longest) < 2:
            return None
        windows = list(longest)
        at = self.reads.cut(windows, len(windows) // 2, self.reach)
        for _ in range(len(windows) - at):
            longest.pop()
        return deque(reversed(windows[at:]))

    def give_back(self, actor: Any, window: Window) -> None:
        """`window` failed on `actor`, dead: it and the rest of the actor's run go to the others."""
        self.free.insert(0, deque([window, *self.owned.pop(actor, deque())]))


def actor_shape(sizing: RaySizing, resources: dict[str, float]) -> tuple[float, float]:
    """(GPUs, CPUs) per actor: one GPU each when the cluster has GPUs (or `gpus_per_actor`), one CPU each."""
    gpus = sizing.gpus_per_actor if sizing.gpus_per_actor is not None else float(resources.get("GPU", 0) >= 1)
    return gpus, sizing.cpus_per_actor or 1.0


def actor_count(sizing: RaySizing, resources: dict[str, float], windows: int) -> tuple[int, str]:
    """How many actors to ask for, and why: `max_actors` when given, else as many as the cluster holds now."""
    gpus, cpus = actor_shape(sizing, resources)
    if sizing.max_actors is not None:
        count, why = sizing.max_actors, "as asked"
    elif gpus:
        count, why = int(resources.get("GPU", 0) // gpus), "one per GPU the cluster has now (--max-actors to grow)"
    else:
        count, why = int(resources.get("CPU", 1) // cpus), "one per CPU the cluster has now (--max-actors to grow)"
    count = max(1, min(count, windows))
    return count, why


def run_on_ray(spec: MapSpec, windows: list[Window], out: str, build_id: str, bar: tqdm, sizing: RaySizing,
               max_retries: int, cube: CubeAccess, reads: MapReads, reach: int) -> ReadCount:
    """Write `windows` (in reading order) of the map at `out` with up to `sizing.max_actors` actors, each reading
    `cube` through a cache of its own (the driver's grids: an actor opens no xarray); what the actors up at the end
    decoded."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    resources = ray.cluster_resources()
    gpus, cpus = actor_shape(sizing, resources)
    count, why = actor_count(sizing, resources, len(windows))
    log.info("predict on Ray: %d actors (%s), each %g GPU and %g CPU, %d windows in flight each; the cluster has "
             "%g GPU and %g CPU now", count, why, gpus, cpus, IN_FLIGHT, resources.get("GPU", 0),
             resources.get("CPU", 0))
    remote = ray.remote(WindowWorker).options(num_gpus=gpus, num_cpus=cpus, max_concurrency=IN_FLIGHT,
                                              max_restarts=max_retries, max_task_retries=max_retries)
    actors: list[Any] = [remote.remote(spec, out, build_id, max(1, int(cpus)), cube) for _ in range(count)]
    try:
        up = _dispatch(actors, Runs(reads, windows, count, reach), bar, max_retries)
        decoded = ReadCount()
        for part in ray.get([actor.decoded.remote() for actor in up]):
            decoded.add(part)
        return decoded
    finally:
        for actor in actors:  # pending ones too: the autoscaler stops asking for their nodes
            ray.kill(actor)


def _dispatch(actors: list[Any], runs: Runs, bar: tqdm, max_retries: int) -> list[Any]:
    """Hand windows to actors as they come up and as their windows finish, IN_FLIGHT at a time each; the actors
    up at the end."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    starting = {actor.where.remote(): actor for actor in actors}
    running: dict[Any, tuple[Any, Window]] = {}
    load: Counter[Any] = Counter()
    failures: Counter[str] = Counter()
    up: list[Any] = []
    while len(runs) or running:
        if not starting and not running and not up:
            raise IncompleteError(f"every map actor died; {len(runs)} windows not written: run predict again")
        done, _ = ray.wait([*starting, *running], num_returns=1, timeout=STATUS_EVERY_S)
        if not done:  # a warning while nothing can progress: the cluster may never have room (no GPU, say)
            log.log(logging.INFO if up else logging.WARNING, "%d of %d map actors up, %d windows waiting; the "
                    "others start when the cluster has room for them", len(up), len(actors), len(runs))
            continue
        ref = done[0]
        if ref in starting:
            actor = starting.pop(ref)
            try:
                log.info("map actor %d of %d up: %s", len(up) + 1, len(actors), _result(ref, RayTaskError))
            except RayActorError as err:  # its process died while starting (after Ray's restarts)
                log.warning("a map actor could not start: %s", err)
                continue
            up.append(actor)
        else:
            actor, window = running.pop(ref)
            load[actor] -= 1
            try:
                _result(ref, RayTaskError)
                bar.update(1)
            except RayActorError as err:  # dead after its restarts: the window goes to another actor
                failures[window.key] += 1
                if failures[window.key] > max_retries:
                    raise IncompleteError(f"window {window.key} failed {failures[window.key]} times: actors "
                                          "running it died; see the log above, and run predict again") from err
                log.warning("a map actor died for good; window %s goes to another", window.key)
                runs.give_back(actor, window)
                if actor in up:
                    up.remove(actor)
        for actor in up:
            while load[actor] < IN_FLIGHT and (next_window := runs.next(actor)) is not None:
                running[actor.run.remote(next_window)] = (actor, next_window)
                load[actor] += 1
    return up


def _result(ref: Any, task_error: type[Exception]) -> Any:
    """`ray.get`, with a geosoc error raised in an actor (bad input, a damaged chunk) raised as itself."""
    import ray

    try:
        return ray.get(ref)
    except task_error as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, GeosocError):
            raise cause from err
        raise
