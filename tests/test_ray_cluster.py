"""The multi-node harness of the Ray tests (tests/ray_cluster.py): a node that cannot join is told at once, with
the reason the `ray_cluster` fixture skips with, and nothing of the cluster outlives it."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest


def test_a_node_whose_raylet_ends_is_told_with_its_reason() -> None:
    pytest.importorskip("ray")
    import psutil

    from tests.helpers import ray_processes_under
    from tests.ray_cluster import LocalCluster

    with LocalCluster(head_cpus=1) as cluster:
        start = cluster.cluster.add_node

        def add_a_node_that_dies(**node_args: Any) -> Any:
            """A node whose raylet ends as it starts (as one did on a host where joining nodes cannot serve)."""
            node = start(**node_args)
            os.kill(node.all_processes["raylet"][0].process.pid, signal.SIGKILL)
            return node

        cluster.cluster.add_node = add_a_node_that_dies
        reason = cluster.probe_join()
        assert reason is not None and reason.startswith("a Ray node cannot join a cluster on this host: its raylet "
                                                        "ended while waiting for"), reason
        temp = cluster.temp
        left = ray_processes_under(temp)
        assert left  # the head still runs until the block ends
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not temp.exists()
