"""What several test modules share: tiny regions, models and SampleSets, damaged checkpoints, waits and child
processes under a progress guard (never a deadline), killing a process at random, finding and stopping the
processes of one Ray head. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from geosoc.catalog import load_catalog
from geosoc.data.cube import build_cube
from geosoc.data.points import Points
from geosoc.data.sampling import SampleSetWriter, random_points, sample_points, sampleset_dataset
from geosoc.data.streaming import SampleData
from geosoc.learn import checkpoint
from geosoc.learn.models import NetworkConfig, SoilNet
from geosoc.learn.training import Context, finetune_region
from geosoc.sources.synthetic import Landscape
from tests.reaper import stop as stop_processes

REPO = Path(__file__).resolve().parents[1]
EDGEROI = REPO / "geosoc" / "data" / "edgeroi"


# The longest a test waits without progress (a line read, a window written, a log grown): its clock restarts at
# every sign of progress, so it guards against a hang and is never a deadline on work, however slow the machine.
PROGRESS_GUARD_S = 120


def wait_with_progress(done: Callable[[], bool], progress: Callable[[], object], what: str,
                       guard: float = PROGRESS_GUARD_S) -> None:
    """Poll until `done()`; fail once `progress()` (a count of windows, a log's size) has not changed for `guard`
    seconds. `done` may raise to end the wait early (a job that ended before the awaited moment)."""
    last, since = progress(), time.monotonic()
    while not done():
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > guard:
            raise AssertionError(f"no progress in {guard} s while waiting for {what} (last seen: {now!r})")
        time.sleep(0.05)


def _collect(stream: Any, into: list[str]) -> None:
    for line in stream:
        into.append(line)


def run_guarded(command: list[str], progress: Callable[[], object] | None = None, guard: float = PROGRESS_GUARD_S,
                **popen: Any) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(command, capture_output=True, text=True)` with a progress guard instead of a timeout: it is
    killed (with everything it started) once `guard` seconds pass without a line of its output or a change of
    `progress()`, and the test fails saying so."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **popen)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=_collect, args=(stream, into), daemon=True)
               for stream, into in ((process.stdout, out), (process.stderr, err))]
    for reader in readers:
        reader.start()
    try:
        wait_with_progress(lambda: process.poll() is not None and not any(r.is_alive() for r in readers),
                           lambda: (len(out), len(err), progress() if progress else None), " ".join(command)[:300],
                           guard)
    except AssertionError as stalled:
        raise AssertionError(f"{stalled}; its output so far: {''.join(out + err)[-3000:]}") from None
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, "".join(out), "".join(err))


READY = 'print("ready", flush=True)\n'
# Runs a script's part before READY once (its imports: seconds on 2 cores), then forks a fresh process for each
# round that runs the part after it with that round's arguments. The script calls `step(label)` where it reaches
# a moment worth killing at; the zygote and its children report on the file descriptor argv[3]: "ready <pid>",
# "step <label>", "gone <wait status>". A child told to stop at its n-th step (of `label`, or of any label)
# stops itself there with SIGSTOP, to be killed at exactly that point.
_ZYGOTE = """
import json, os, signal, sys, threading, traceback
setup, work = sys.argv[1].split(sys.argv[2], 1)
report = int(sys.argv[3])
child, count, stop, stop_label, lock = False, 0, None, None, threading.Lock()

def tell(line):
    os.write(report, (line + "\\n").encode())

def step(label=""):
    global count
    label = "_".join(str(label).split()) or "-"
    if not child:
        return
    with lock:
        tell("step " + label)
        if stop_label in (None, label):
            count += 1
            if count == stop:
                os.kill(os.getpid(), signal.SIGSTOP)

def run(args):
    sys.argv = ["-c", *args]
    tell(f"ready {os.getpid()}")
    code = 0
    try:
        exec(compile(work, "<work>", "exec"), scope)
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else int(end.code is not None)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

order = json.loads(sys.stdin.readline())
sys.argv = ["-c", *order["args"]]
scope = {"__name__": "__main__", "step": step}
exec(compile(setup, "<setup>", "exec"), scope)
while order is not None:
    pid = os.fork()
    if pid == 0:
        child, stop, stop_label = True, order["stop"], order["label"]
        run(order["args"])
    tell(f"gone {os.waitpid(pid, 0)[1]}")
    line = sys.stdin.readline()
    order = json.loads(line) if line else None
"""


class RandomKiller:
    """SIGKILLs a script at moments of its work chosen by its progress, never by the clock, round after round.

    On a busy machine a child may take seconds to get anywhere: a kill timed from its start may land before any
    work. Here the script (the repository importable) prints "ready" (`READY`) where its work starts and calls
    `step(label)` (a name the zygote provides) at each moment worth killing at: a write done, a chunk finished.
    Each round runs what follows READY in a process forked from one that ran what precedes it once (the fork is
    what a fresh process would be, without the seconds of imports), and kills it at or after its n-th step."""

    def __init__(self, script: str) -> None:
        assert READY in script
        self.script = script
        self.zygote: subprocess.Popen[bytes] | None = None
        self.child: int | None = None  # the pid of this round's child while it may live
        self.lines: queue.Queue[str] = queue.Queue()

    def kill_at_step(self, args: list[str], n: int, label: str | None = None) -> list[str]:
        """One round, killed exactly after its n-th step (of `label`, or of any): the child stops itself there,
        so the kill lands at that point whatever the machine's load. Returns the labels of the steps it made."""
        return self._round(args, n, label, stop=True, delay=0.0)

    def kill_after_step(self, args: list[str], n: int, delay: float, label: str | None = None) -> list[str]:
        """One round, killed `delay` seconds after its n-th step (of `label`, or of any): at a random moment of
        the work that follows (how far it got depends on the load), never before. Returns the labels of its
        steps up to the n-th (more may have followed)."""
        return self._round(args, n, label, stop=False, delay=delay)

    def _round(self, args: list[str], n: int, label: str | None, stop: bool, delay: float) -> list[str]:
        self._order({"args": args, "stop": n if stop else None, "label": label})
        kind, pid = self._next()
        assert kind == "ready", (kind, pid)
        self.child = int(pid)
        labels: list[str] = []
        while sum(label in (None, seen) for seen in labels) < n:
            kind, rest = self._next()
            assert kind == "step", f"the child ended (wait status {rest}) before its step {n}: {labels[-5:]}"
            labels.append(rest)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):  # it ended by itself: told by the status below
            os.kill(self.child, signal.SIGKILL)
        while kind != "gone":
            kind, rest = self._next()
        self.child, status = None, int(rest)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the child ended by itself: {status}"
        return labels

    def _order(self, order: dict[str, Any]) -> None:
        """Start the zygote on the first round's order (it runs the setup with its arguments), or send it one."""
        if self.zygote is None:
            read, write = os.pipe()
            self.zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE, self.script, READY, str(write)],
                                           cwd=REPO, stdin=subprocess.PIPE, pass_fds=(write,),
                                           env={**os.environ, "PYTHONPATH": str(REPO)})
            os.close(write)
            threading.Thread(target=self._read, args=(read,), daemon=True).start()
        assert self.zygote.stdin is not None
        self.zygote.stdin.write(json.dumps(order).encode() + b"\n")
        self.zygote.stdin.flush()

    def _read(self, fd: int) -> None:
        """Every report line into the queue, then "" when every writer has closed it (the zygote ended)."""
        with os.fdopen(fd, "rb") as reports:
            for line in reports:
                self.lines.put(line.decode().rstrip("\n"))
        self.lines.put("")

    def _next(self) -> tuple[str, str]:
        try:
            line = self.lines.get(timeout=PROGRESS_GUARD_S)
        except queue.Empty:
            raise AssertionError(f"no word from the child in {PROGRESS_GUARD_S} s: {self.script[-300:]}") from None
        assert line, "the zygote ended (its error is in the captured stderr)"
        kind, _, rest = line.partition(" ")
        return kind, rest

    def __enter__(self) -> RandomKiller:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.child is not None:  # a round that failed: its child would keep the zygote waiting for it
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
        if self.zygote is not None:
            assert self.zygote.stdin is not None
            self.zygote.stdin.close()
            self.zygote.wait()


# A geosoc CLI command whose every finished chunk (a cube's, a map's window) is a step labelled with its key.
MARKING_CLI = """
import sys
from geosoc.cli import app
from geosoc.io.progress import Markers
mark = Markers.mark

def marking(self, key):
    mark(self, key)
    step(key)

Markers.mark = marking
print("ready", flush=True)
app(sys.argv[1:], prog_name="geosoc")
"""


def without_root_rights(read_only: Path) -> list[str]:
    """A prefix that runs a command without root's rights over files (root writes into read-only folders; CI runs
    as root): as the user nobody, or else as the owner of this checkout's files in a user namespace of its own
    (owner rights only, no capabilities). Empty when the tests do not run as root; skips the test where neither
    way can run this checkout's Python and be refused a write into `read_only`."""
    if os.geteuid() != 0:
        return []
    ways = [["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"],
            ["unshare", "--user", "--map-user=65534", "--map-group=65534", "--"]]
    tried = []
    for way in ways:
        probe = subprocess.run([*way, sys.executable, "-c", "import geosoc.cli, os, sys; "
                                f"sys.exit(os.access({str(read_only)!r}, os.W_OK))"], capture_output=True, cwd="/")
        if probe.returncode == 0:
            return way
        tried.append(f"{way[0]}: {probe.stderr.decode()[-200:].strip() or 'can write into a read-only folder'}")
    import pytest

    pytest.skip("cannot run commands without root's rights here: " + "; ".join(tried))


def entries_under(folder: Path) -> int:
    """How many files and folders are below `folder` now: a progress measure of a run that writes there. os.walk
    skips a folder that vanishes while it is listed (a SampleSet's `.old` folder being removed); rglob raises."""
    return sum(len(folders) + len(files) for _, folders, files in os.walk(folder))


def files_state(folder: Path) -> dict[str, int | None]:
    """Every path below `folder`, and when each file was last written (to tell that a run wrote nothing)."""
    return {str(p): p.stat().st_mtime_ns if p.is_file() else None for p in folder.rglob("*")}


def tiny_catalog_dict(size_px: int = 96, chunk: int = 32, climate: bool = True) -> dict[str, Any]:
    """A synthetic region of size_px x size_px pixels at 30 m in EPSG:3035, climate at 960 m."""
    x0, y0 = 4419990, 2824380  # includes a lake: nodata pixels
    side = size_px * 30
    data: dict[str, Any] = {
        "region": {"name": "tiny", "crs": "EPSG:3035", "bounds": [x0, y0, x0 + side, y0 + side]},
        "imagery": {"resolution": 30, "chunk": chunk, "source": {"kind": "synthetic", "seed": 7}},
    }
    if climate:
        data["climate"] = {
            "resolution": 960,
            "chunk": 2,
            "source": {"kind": "synthetic", "seed": 7},
            "variables": ["pr", "tmmx", "swe"],
            "start": "2014-10",
            "end": "2015-01",
        }
    return data




def western_half_mask(folder: Path, bounds: list[float]) -> str:
    """A `region.mask` (60 m pixels, EPSG:3035) over `bounds` whose western half is inside: the tiny region's pixels
    0-47 of 96."""
    import rasterio
    from rasterio.transform import from_origin

    x0, y0, x1, y1 = bounds
    width, height = int((x1 - x0) / 60), int((y1 - y0) / 60)
    values = np.zeros((height, width), np.uint8)
    values[:, : width // 2] = 1
    path = folder / "mask.tif"
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                       crs="EPSG:3035", transform=from_origin(x0, y1, 60, 60)) as dst:
        dst.write(values, 1)
    return str(path)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: each socket stays bound until all are chosen, for the kernel hands a port
    just released to the next bind (a Ray head once got one port for its dashboard and its object manager)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


# What every Ray the suite starts runs with: auth mode set explicitly, no usage stats, and workers at the suite's own
# priority. Ray starts its workers at nice 15 (`RAY_worker_niceness`): beside the other pytest worker or a busy
# machine's processes at nice 0, an actor got 3 % of a core and took minutes to load its model.
RAY_TEST_SETTINGS = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}
# The ports of a Ray head besides its GCS and dashboard: each is given its own, or two heads on one machine (two
# pytest workers, the benchmark beside the suite) would clash on Ray's defaults.
RAY_HEAD_PORTS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                  "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")


def start_ray_head(temp: Path, cpus: int = 2, worker_ports: tuple[int, int] | None = None,
                   started: Callable[[list[int]], object] | None = None) -> dict[str, Any]:
    """`ray start --head` on loopback with `cpus` CPUs and no GPU, its files in `temp` (--temp-dir: how its processes
    are found and stopped), every port its own (chosen together: `free_ports`), worker ports in `worker_ports`
    (first, last) if given, `RAY_TEST_SETTINGS` in its environment. Returns what tests and the benchmarks use:
    {"address" (the dashboard, for `ray job submit`), "gcs", "env" (what its commands need: this venv's `python`
    first on PATH), "ray" (the CLI), "temp"}. `started` is told the head's process ids, even where the start
    failed (the reaper's record). A start that fails stops what it started and raises RuntimeError with Ray's
    error."""
    ray_bin = Path(sys.executable).with_name("ray")
    port, dashboard, *ports = free_ports(2 + len(RAY_HEAD_PORTS))
    own_ports = [f"--{name}={number}" for name, number in zip(RAY_HEAD_PORTS, ports, strict=True)]
    if worker_ports is not None:
        own_ports += [f"--min-worker-port={worker_ports[0]}", f"--max-worker-port={worker_ports[1]}"]
    env = {**os.environ, **RAY_TEST_SETTINGS,
           "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # jobs' `python` is the venv's
    try:
        done = run_guarded(
            [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true", *own_ports,
             f"--num-cpus={cpus}", "--num-gpus=0", f"--temp-dir={temp}", "--disable-usage-stats"], env=env)
    finally:
        if started is not None:
            started([p.pid for p in ray_processes_under(temp, port)])
    head = {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{port}", "env": env, "ray": str(ray_bin),
            "temp": str(temp)}
    if done.returncode != 0:
        stop_ray_head(head)
        raise RuntimeError(f"ray start failed: {done.stderr[-2000:]}")
    return head


def stop_ray_head(head: dict[str, Any]) -> None:
    """Stop a head of `start_ray_head`, and only it (`ray stop` would stop every Ray on the machine), and remove
    its temp folder."""
    stop_ray_processes_under(Path(head["temp"]), int(head["gcs"].rsplit(":", 1)[1]))
    shutil.rmtree(head["temp"], ignore_errors=True)




def submit_job(ray_head: dict[str, Any], args: list[str]) -> subprocess.CompletedProcess[str]:
    """`ray job submit --address <head> --working-dir <repo> ARGS`, tried again (at most 30 times, a second
    apart) while a head that has just started has no job agent yet ("No available agent ... try again later").
    Without --no-wait it follows the job's log: every line restarts its progress guard."""
    command = [ray_head["ray"], "job", "submit", "--address", ray_head["address"], "--working-dir", str(REPO), *args]
    for _ in range(30):
        done = run_guarded(command, env=ray_head["env"])
        if "No available agent" not in done.stderr:
            break
        time.sleep(1)
    return done


def follow_job(ray_head: dict[str, Any], job: str) -> str:
    """`ray job logs --follow JOB` on the session's head: the job's whole log once it has ended (a progress guard:
    every line of it restarts the clock)."""
    followed = run_guarded([ray_head["ray"], "job", "logs", "--address", ray_head["address"], "--follow", job],
                           env=ray_head["env"])
    return followed.stdout


def ray_processes_under(temp: Path, gcs_port: int | None = None) -> list[Any]:
    """The processes of one Ray head: those whose command line names its --temp-dir (GCS, raylet, dashboard,
    ...) or, given `gcs_port`, its GCS address (the client server, which names only that), and their descendants
    (workers, actors), as psutil processes."""
    import psutil

    def names_the_head(part: str) -> bool:
        return str(temp) in part or (gcs_port is not None and part.startswith(("--address=", "--gcs-address="))
                                     and part.endswith(f":{gcs_port}"))

    own = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(names_the_head(part) for part in proc.info["cmdline"] or []):
            own.append(proc)
    everything = {p.pid: p for p in own}
    for proc in own:
        try:
            everything.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            pass
    return list(everything.values())


def ray_actor_pids(temp: Path, actor_class: str) -> list[int]:
    """Process ids of the live actors of class `actor_class` on the Ray head whose --temp-dir is `temp`."""
    import psutil

    found = []
    for proc in ray_processes_under(temp):
        try:
            name = proc.cmdline()[0] if proc.cmdline() else ""
            if name.startswith("ray::") and actor_class in name:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def stop_ray_processes_under(temp: Path, gcs_port: int | None = None, also: Iterable[Any] = ()) -> None:
    """Stop the head this test started, and only it (`ray stop` would stop every Ray on the machine); `also`:
    processes of it found earlier (workers whose raylet has gone since are no longer below it)."""
    found = {p.pid: p for p in [*ray_processes_under(temp, gcs_port), *also]}
    stop_processes(found.values())


TINY = dict(patch_size=8, months=4, image_patch=4, image_dim=32, image_depth=1, image_heads=2, climate_dim=32,
            climate_layers=1, climate_heads=2, climate_feedforward=64, embedding=16, head_hidden=32)
CPU = Context(device=torch.device("cpu"), progress=False)


def tiny_sampleset(url: str, n: int = 48, patches: bool = True, climate: bool = True, seed: int = 0) -> str:
    """Samples whose SOC is a known function of both modalities."""
    rng = np.random.default_rng(seed)
    patch = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
    series = rng.normal(size=(n, 4, 2)).astype(np.float32)
    soc = np.exp(2.5 + 0.5 * patch[:, 0].mean(axis=(1, 2)) * 4 + 0.3 * series[:, :, 0].mean(axis=1))
    x, y = rng.uniform(0, 10_000, n), rng.uniform(0, 10_000, n)
    points = Points(np.array([f"s{i}" for i in range(n)], dtype=object), x, y, x, y, soc, "g/kg", "test")
    months = [np.datetime64(f"2010-0{m}-01") for m in range(1, 5)]
    fold = (np.arange(n) % 4).astype(np.int8)
    ds = sampleset_dataset(points, fold, series if climate else None, months if climate else None,
                  ["pr", "tmmx"] if climate else None, ["b0", "b1", "b2"] if patches else None, {"patch_size": 8})
    with SampleSetWriter(url, ["b0", "b1", "b2"] if patches else None, 8 if patches else None) as writer:
        if patches:
            writer.append(patch)
        return writer.finish(ds)


def config_for(url: str) -> NetworkConfig:
    data = SampleData(url)
    return NetworkConfig(bands=data.bands, variables=data.variables, **TINY)




TINY_MODEL = {"image": {"patch": 4, "dim": 32, "depth": 1, "heads": 2},
              "climate": {"dim": 32, "layers": 1, "heads": 2, "feedforward": 64}, "embedding": 16}


def labelled_samples(cube: str, root: str, n: int) -> Points:
    """`n` random points of a tiny catalog's cube labelled with the landscape's true SOC, sampled into the root's
    labelled SampleSet (8 px patches, 3 folds of 600 m blocks)."""
    points = random_points(cube, n, 8, seed=1)
    truth = Landscape(7).soc_at(points.x, points.y, "EPSG:3035")
    lab = Points(points.ids, points.x, points.y, points.lon, points.lat, truth, "g/kg", "simulated")
    sample_points(cube, lab, f"{root}/samples/labelled.zarr", 8, fold_block_size=600, folds=3)
    return lab


def tiny_region(folder: Path, climate: bool = True) -> tuple[Path, str]:
    """A 96 x 96 px synthetic region with a cube, 150 labelled samples (fold 0 held out by its fine-tuned tiny
    model) and 200 unlabelled ones."""
    data = tiny_catalog_dict(size_px=96, chunk=32, climate=climate)
    data.update(sampling={"patch_size": 8, "fold_block_size": 600, "folds": 3}, model=TINY_MODEL,
                training={"finetune": {"epochs": 4, "batch_size": 16, "learning_rate": 0.001}},
                predict={"resolution": 60})
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    catalog = load_catalog(path=path)
    root = str(folder / "root")
    cube = build_cube(catalog, root, progress=False)
    labelled_samples(cube, root, 150)
    finetune_region(catalog.config, root, test_fold=0, pretrained=False, ctx=CPU)
    unlabelled = random_points(cube, 200, 8, seed=5)
    sample_points(cube, unlabelled, f"{root}/samples/unlabelled.zarr", 8, fold_block_size=600, folds=3,
                  kind="unlabelled")
    return path, root


def copy_region(region: tuple[Path, str], folder: Path, leave_out: tuple[str, ...] = ()) -> tuple[Path, str]:
    """A copy of a region made by `tiny_region` (its catalog and root) in `folder`, for a test that writes to it.
    `leave_out`: names not copied (e.g. "maps", "unlabelled.zarr")."""
    path, root = region
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, folder / path.name)
    shutil.copytree(root, folder / "root", ignore=shutil.ignore_patterns(*leave_out))
    return folder / path.name, str(folder / "root")




def _rewrite_config(url: str, change: Callable[[dict], None]) -> None:
    path = Path(url, "config.json")
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _object(url: str, name: str) -> Path:
    return Path(url, json.loads(Path(url, "config.json").read_text())["files"][name]["object"])


def _other_shape_weights(url: str) -> None:
    """Weights of a wider network, published consistently (checksums right) under this config."""
    model = SoilNet(NetworkConfig(bands=["b0"], variables=["v0"], **{**TINY, "embedding": 8}))
    config, meta = checkpoint.load_config(url)
    checkpoint.save_model(url, model, config, meta)


TAMPERING: dict[str, tuple[Callable[[str], object], str]] = {
    "truncated weights": (lambda url: _object(url, "model.safetensors").write_bytes(b"\0" * 4),
                          "does not match its checksum"),
    "missing weights": (lambda url: _object(url, "model.safetensors").unlink(), "missing"),
    "weights of another shape": (_other_shape_weights, "the weights do not fit the network"),
    "config not JSON": (lambda url: Path(url, "config.json").write_text("{ not json"), "not valid JSON"),
    "config without model": (lambda url: _rewrite_config(url, lambda d: d.pop("model")), "'model' entry"),
    "config with a bad model": (lambda url: _rewrite_config(url, lambda d: d["model"].update(image_heads=5)),
                                "'model' does not describe a network"),
    "config with a mistyped model": (lambda url: _rewrite_config(url, lambda d: d["model"].update(embedding="big")),
                                     "'model' does not describe a network"),
    "config without normalisation": (lambda url: _rewrite_config(url, lambda d: d.pop("normalisation")),
                                     "'normalisation' is missing"),
    "config with a bad file list": (lambda url: _rewrite_config(url, lambda d: d.update(files=["x"])), "'files'"),
    "config naming no weights": (lambda url: _rewrite_config(url, lambda d: d["files"].pop("model.safetensors")),
                                 "has no model.safetensors"),
}


# --- buckets (the s3/gcs fixtures of conftest.py: moto and tests/gcs_server.py on loopback) ---------------------

BUCKET = "soil"


def bucket_settings(bucket: dict[str, str]) -> dict[str, str]:
    """The environment variables a user sets for this bucket (the fixture's dict less its scheme)."""
    return {k: v for k, v in bucket.items() if k != "scheme"}


def bucket_python(bucket: dict[str, str], code: str) -> str:
    """Run `code` in a fresh interpreter with the bucket's settings (fsspec and gcsfs read some at import)."""
    done = run_guarded([sys.executable, "-c", code], env={**os.environ, **bucket_settings(bucket)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def bucket_listing(bucket: dict[str, str], url: str) -> list[str]:
    """Every object under `url` (scheme://bucket/prefix), relative to it."""
    prefix = url.split("://", 1)[1].rstrip("/") + "/"
    keys = bucket_python(bucket, f"import fsspec; fs = fsspec.filesystem({bucket['scheme']!r}); "
                                 f"print('\\n'.join(fs.find({prefix!r})))").split()
    return [key.removeprefix(prefix) for key in keys]
