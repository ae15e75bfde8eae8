"""Shared fixtures: tiny catalogs written per test, one trained tiny region and one Ray head for the whole
session, a Ray cluster of several nodes for a test, offline settings, and the reaper's hooks (tests/reaper.py:
nothing the suite starts outlives it). Helpers that are not fixtures are in tests/helpers.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.gcs_server import GcsServer
from tests.helpers import (
    BUCKET,
    free_port,
    start_ray_head,
    stop_ray_head,
    tiny_catalog_dict,
    tiny_region,
)
from tests.reaper import pytest_configure, pytest_sessionfinish, pytest_terminal_summary, record  # noqa: F401

# The files that take longest start first: `make test` hands whole files to two workers in collection order
# (`--dist loadfile --no-loadscope-reorder`; xdist's default order, most tests first, started these last, and one
# worker ran on alone for over a minute). Seconds on 2 cores, measured: 98, 92, about 60 (without its `slow`
# tests), 51; the rest under 40 each.
LONGEST_FIRST = ("test_predict.py", "test_cloud.py", "test_distributed.py", "test_training.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


@pytest.fixture
def write_catalog(tmp_path: Path) -> Callable[..., Path]:
    """Write a catalog dict (default: the tiny synthetic region) to a YAML file and return its path."""

    def write(data: dict[str, Any] | None = None, name: str = "tiny.yaml", **kwargs: Any) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data if data is not None else tiny_catalog_dict(**kwargs), sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def ray_head():
    """A real local Ray head on loopback, with auth mode set explicitly. Every port it opens is its own (free
    ports, and a worker port range per pytest worker), so it shares nothing with another head on the machine."""
    pytest.importorskip("ray")
    temp = Path("/tmp") / f"geosoc-ray-{os.getpid()}"
    first_worker_port = 20_000 + 1_000 * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    try:  # what it started, even where it failed, is the reaper's to stop should this process crash
        head = start_ray_head(temp, cpus=2, worker_ports=(first_worker_port, first_worker_port + 999),
                              started=lambda pids: record("the session's Ray head", pids, temp))
    except RuntimeError as failed:
        pytest.fail(str(failed))
    yield head
    stop_ray_head(head)


@pytest.fixture
def ray_cluster() -> Iterator[Any]:
    """A Ray cluster of several nodes on this machine by Ray's own harness (tests/ray_cluster.py): a 2-CPU head,
    this process's driver connected to it; the test adds nodes (`ray_cluster.add_node`). Skipped, with the reason,
    where a probe node cannot join and run a task on this host."""
    pytest.importorskip("ray")
    from tests.ray_cluster import LocalCluster, NodeCannotJoin

    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(LocalCluster(head_cpus=2))
        except NodeCannotJoin as cannot:
            pytest.skip(f"a Ray cluster cannot start on this host: {cannot}")
        cannot_join = cluster.probe_join()
        if cannot_join:
            pytest.skip(cannot_join)
        yield cluster


@pytest.fixture(scope="session")
def trained_region(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny region of `helpers.tiny_region`, built once: treat it as read-only (`helpers.copy_region` gives a
    test its own copy to write to)."""
    return tiny_region(tmp_path_factory.mktemp("trained-region"))


@pytest.fixture(autouse=True)
def _torch_threads() -> Iterator[None]:
    """Commands run in-process set torch's thread count (`--threads`): give each test the count it started with."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_forests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tree models of 40 trees or boosting rounds (300 in use) for the steps a test runs in this process."""
    from geosoc.learn import baselines

    monkeypatch.setattr(baselines, "TREES", 40)
    monkeypatch.setattr(baselines, "BOOSTING_ROUNDS", 40)


# --- buckets on loopback: a real S3 API server (moto) and the project's GCS server, reached through s3fs and gcsfs
# as users configure them (environment variables only; tests run commands in subprocesses with them) ---------

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield {**S3_CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": endpoint, "scheme": "s3"}
    server.stop()


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[GcsServer]:
    server = GcsServer("127.0.0.1", buckets=[BUCKET]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gcs(gcs_server: GcsServer) -> dict[str, str]:
    # The server speaks the JSON API over HTTP only: no credentials, and gcsfs's gRPC bucket-type probe switched off.
    return {"STORAGE_EMULATOR_HOST": gcs_server.url, "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "scheme": "gs"}


@pytest.fixture(params=["s3", "gs"])
def bucket(request: pytest.FixtureRequest) -> dict[str, str]:
    return request.getfixturevalue("s3" if request.param == "s3" else "gcs")
