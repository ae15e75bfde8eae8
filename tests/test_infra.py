"""infra/ stays in step with the package and with what the tools accept: every KubeRay manifest against
KubeRay v1.7.0's CRD schemas (unknown fields included), the cluster-launcher file against Ray's own schema and
`validate_config`, the Ray version of the lock file, the jobs and flags that exist, an image Ray can start."""

from __future__ import annotations

import copy
import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO

INFRA = REPO / "infra"
CRDS = Path(__file__).parent / "schemas" / "kuberay-v1.7.0"
KUBERAY = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}


@lru_cache(maxsize=2)
def crd_schema(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser: the CRDs are large
    crd = yaml.load(gzip.open(CRDS / f"{KUBERAY[kind]}.yaml.gz"), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare (what `kubectl apply --validate=strict` refuses)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict):
        properties, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None:
                if key not in properties:
                    found.append(f"{path}.{key}")
                else:
                    found += unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def check_kuberay(manifest: dict[str, Any]) -> None:
    """Raise if a RayCluster/RayJob manifest breaks the CRD's schema or has a field it does not know."""
    import jsonschema

    schema = crd_schema(manifest["kind"])
    jsonschema.validate(manifest, schema)
    unknown = unknown_fields(manifest, schema)
    if unknown:
        raise ValueError(f"unknown fields: {unknown}")


def kuberay_manifests() -> list[Path]:
    return sorted(p for p in (INFRA / "kuberay").glob("*.yaml") if yaml.safe_load(p.read_text())["kind"] in KUBERAY)


@pytest.mark.parametrize("path", kuberay_manifests(), ids=lambda p: p.name)
def test_kuberay_manifests_are_valid_for_kuberay_1_7(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    check_kuberay(manifest)


def test_a_planted_unknown_field_or_wrong_type_is_caught() -> None:
    import jsonschema

    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    planted = copy.deepcopy(cluster)
    planted["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    with pytest.raises(ValueError, match=r"\.spec\.workerGroupSpecs\[0\]\.maxReplica"):
        check_kuberay(planted)
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        check_kuberay(wrong)


def test_cluster_autoscales_gpu_workers_with_images_from_a_registry() -> None:
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], gpu["template"]["spec"]]
    for pod in pods:
        assert pod["serviceAccountName"] == "geosoc"
        image = pod["containers"][0]["image"]
        assert "/" in image and not image.endswith(":latest"), image  # a registry and a version
    head_resources = pods[0]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_resources and "nvidia.com/gpu" in pods[1]["containers"][0]["resources"]["limits"]
    account = yaml.safe_load((INFRA / "kuberay" / "serviceaccount.yaml").read_text())
    assert account["kind"] == "ServiceAccount" and "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]


def test_cluster_launcher_file_is_valid_for_ray() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    launcher = yaml.safe_load((INFRA / "cluster-launcher" / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(launcher)))  # Ray's ray-schema.json, then its own checks
    docker = launcher["docker"]
    assert "--gpus all" in docker["worker_run_options"] and "--gpus all" not in " ".join(docker["run_options"])


def locked(name: str) -> str:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==")[1]
    raise AssertionError(f"{name} not in requirements.lock")


def test_manifests_parse_and_match_versions() -> None:
    cluster = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == locked("ray")
    runtime = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert ".venv" in runtime["excludes"]


def test_dockerfile_installs_what_the_makefile_installs() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in dockerfile and "torch==2.14.1 torchvision==0.29.1" in makefile
    assert "-c requirements.lock" in dockerfile  # the lock's versions, not its test tools
    assert locked("torch") == "2.14.1"
    assert not any(line.startswith("ENTRYPOINT") for line in dockerfile.splitlines())  # Ray runs `docker run IMAGE bash`
    assert "rsync" in dockerfile  # the cluster launcher syncs with it


def test_every_rayjob_runs_an_existing_job_with_flags_it_accepts() -> None:
    import shlex

    from geosoc.jobs import job_parser

    jobs = sorted((INFRA / "kuberay").glob("rayjob-*.yaml"))
    assert {p.stem for p in jobs} >= {"rayjob-pretrain", "rayjob-finetune", "rayjob-predict"}
    for path in jobs:
        entry = shlex.split(yaml.safe_load(path.read_text())["spec"]["entrypoint"])
        script = REPO / entry[1].removeprefix("/opt/geosoc/")
        assert entry[0] == "python" and script.exists(), path
        job_parser(script.stem).parse_args(entry[2:])  # exits (fails the test) on an unknown flag
