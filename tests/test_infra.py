"""infra/ stays in step with the package: valid YAML, the Ray version of the lock file, the jobs that exist."""

from __future__ import annotations

import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"


def locked(name: str) -> str:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==")[1]
    raise AssertionError(f"{name} not in requirements.lock")


def test_manifests_parse_and_match_versions() -> None:
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == locked("ray")
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob-pretrain.yaml").read_text())
    script = job["spec"]["entrypoint"].split()[1]
    assert (REPO / script.removeprefix("/opt/geosoc/")).exists()
    launcher = yaml.safe_load((INFRA / "cluster-launcher" / "cluster.yaml").read_text())
    assert launcher["cluster_name"] == "geosoc"
    runtime = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert ".venv" in runtime["excludes"]


def test_dockerfile_installs_what_the_makefile_installs() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in dockerfile and "torch==2.14.1 torchvision==0.29.1" in makefile
    assert "requirements.lock" in dockerfile
    assert locked("torch") == "2.14.1"


def test_every_rayjob_runs_an_existing_job_with_flags_it_accepts() -> None:
    import shlex

    from geosoc.distributed import job_parser

    jobs = sorted((INFRA / "kuberay").glob("rayjob-*.yaml"))
    assert {p.stem for p in jobs} >= {"rayjob-pretrain", "rayjob-predict"}
    for path in jobs:
        entry = shlex.split(yaml.safe_load(path.read_text())["spec"]["entrypoint"])
        script = REPO / entry[1].removeprefix("/opt/geosoc/")
        assert entry[0] == "python" and script.exists(), path
        job_parser(script.stem).parse_args(entry[2:])  # exits (fails the test) on an unknown flag
