"""Several Ray nodes on one machine for multi-node tests, by Ray's own test harness (`ray.cluster_utils.Cluster`,
as Ray's test suite runs them): a head started from the test's process, nodes added while a test runs.

Every node has the address Ray picks for it, the host's own, as in Ray's own tests: pinned to 127.0.0.1, Ray 2.60
still names nodes by the host's address (a driver in this process given 127.0.0.1:PORT connected to the host's
address:PORT, where nothing listened, and waited in native code for ever; a node joined with `ray start
--node-ip-address=127.0.0.1` was reported under the host's address and never served). Ports are the OS's choice,
and the cluster has one temp folder; its processes are recorded with the reaper (tests/reaper.py) as they start. Whether a node can join on this host at all is told by `LocalCluster.probe_join`
(a node added, seen alive, and running a task pinned to it, then removed): the fixture skips with its reason."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import PROGRESS_GUARD_S, RAY_TEST_SETTINGS, free_ports, ray_processes_under, stop_ray_processes_under
from tests.reaper import record


class NodeCannotJoin(Exception):
    """A node did not join, or joined and ran nothing: the reason, in words."""


class LocalCluster:
    """A `ray.cluster_utils.Cluster` whose head has `head_cpus` CPUs, the driver of this process connected to it.
    `with LocalCluster(2) as cluster:` starts it (NodeCannotJoin where it cannot start on this host); leaving the
    block stops every process of it and removes its temp folder."""

    def __init__(self, head_cpus: int, guard: float = PROGRESS_GUARD_S) -> None:
        self.head_cpus = head_cpus
        self.guard = guard
        self.temp = Path(tempfile.mkdtemp(prefix="geosoc-rc-"))  # short: Ray's socket paths live below it
        self.cluster: Any = None
        # What the cluster's processes and this driver need in the environment while the cluster lives: Ray writes
        # the head's address under RAY_TMPDIR (/tmp/ray, shared with every Ray on the machine, by default).
        self._saved = {name: os.environ.get(name) for name in [*RAY_TEST_SETTINGS, "RAY_TMPDIR"]}

    def __enter__(self) -> LocalCluster:
        import ray
        from ray.cluster_utils import Cluster

        (self.temp / "ray").mkdir()
        os.environ.update(RAY_TEST_SETTINGS, RAY_TMPDIR=str(self.temp))
        try:
            # shutdown_at_exit=False: Ray would make this process a process group leader (os.setpgrp) for its own
            # reaper; the suite's reaper stops what a crashed test process leaves instead.
            self.cluster = Cluster(shutdown_at_exit=False)
            gcs_port, agent_port = free_ports(2)
            self._start_node("Ray cluster head", lambda: self.cluster.add_node(
                num_cpus=self.head_cpus, temp_dir=str(self.temp / "ray"), gcs_server_port=gcs_port,
                include_dashboard=False, dashboard_agent_listen_port=agent_port))
            self._guarded("this process's driver to connect",
                          lambda: ray.init(address=self.cluster.address, log_to_driver=False))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        ray.shutdown()
        everything = ray_processes_under(self.temp)  # workers and agents too, before their raylets go
        if self.cluster is not None and self.cluster.head_node is not None:
            try:
                self.cluster.shutdown()
            except Exception:  # a node that died by itself: what is left is stopped below
                pass
        stop_ray_processes_under(self.temp, also=everything)
        shutil.rmtree(self.temp, ignore_errors=True)
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def add_node(self, num_cpus: int, probe: bool = False) -> Any:
        """Start a node of `num_cpus` CPUs and wait until the head sees it alive (and, with `probe`, until a task
        pinned to it has run there). Each stage reached restarts the guard's clock; a node whose processes end,
        or that reaches no further stage in `guard` seconds, raises NodeCannotJoin with what was seen."""
        import ray

        node = self._start_node("Ray cluster node", lambda: self.cluster.add_node(wait=False, num_cpus=num_cpus))
        self._wait(node, lambda: any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()),
                   "the head to see it alive")
        if probe:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            @ray.remote(num_cpus=1)
            def where() -> str:
                return ray.get_runtime_context().get_node_id()

            pinned = where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False))
            ref = pinned.remote()
            self._wait(node, lambda: bool(ray.wait([ref], timeout=0.5)[0]), "a task pinned to it to run")
            if ray.get(ref) != node.node_id:
                raise NodeCannotJoin("a task pinned to the new node ran on another")
        return node

    def probe_join(self) -> str | None:
        """None where a node can join this cluster and run a task; otherwise why not (the node is removed)."""
        try:
            node = self.add_node(num_cpus=1, probe=True)
        except NodeCannotJoin as cannot:
            return f"a Ray node cannot join a cluster on this host: {cannot}"
        self.cluster.remove_node(node)
        return None

    def _start_node(self, what: str, start: Callable[[], Any]) -> Any:
        """Ray's node start, within the guard; the node's processes recorded with the reaper."""
        node = self._guarded(f"{what} to start", start)
        record(what, [process.process.pid for infos in node.all_processes.values() for process in infos], self.temp)
        return node

    def _guarded(self, what: str, call: Callable[[], Any]) -> Any:
        """`call()` (one step of Ray's, which waits on Ray's own terms, some in native code that nothing interrupts)
        in a thread: its result, or NodeCannotJoin once it fails or has not returned in `guard` seconds."""
        returned: list[Any] = []
        failed: list[BaseException] = []

        def run() -> None:
            try:
                returned.append(call())
            except BaseException as error:
                failed.append(error)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(self.guard)
        if thread.is_alive():
            raise NodeCannotJoin(f"no progress in {self.guard} s while waiting for {what}{self._raylet_log()}")
        if failed:
            raise NodeCannotJoin(f"failed while waiting for {what}: {failed[0]!r}{self._raylet_log()}")
        return returned[0]

    def _wait(self, node: Any, done: Callable[[], bool], what: str) -> None:
        """Poll `done` until it holds; NodeCannotJoin once a process of `node` has ended or after the guard."""
        since = time.monotonic()
        while not done():
            dead = [kind for kind, _ in node.dead_processes()]
            if dead:
                raise NodeCannotJoin(f"its {', '.join(dead)} ended while waiting for {what}{self._raylet_log()}")
            if time.monotonic() - since > self.guard:
                raise NodeCannotJoin(f"no progress in {self.guard} s while waiting for {what}{self._raylet_log()}")
            time.sleep(0.1)

    def _raylet_log(self) -> str:
        """The last lines of the newest raylet log that says something went wrong, to name the reason."""
        logs = sorted(self.temp.glob("ray/session_*/logs/raylet*.out"), key=lambda p: p.stat().st_mtime)
        for log in reversed(logs):
            lines = [line for line in log.read_text(errors="replace").splitlines()
                     if " E " in line[:40] or " C " in line[:40] or "terminated" in line.lower()]
            if lines:
                return f" ({log.name}: {' | '.join(lines[-3:])[-600:]})"
        return ""

