"""infra/ stays in step with the package and with what the tools accept: the KubeRay overlays, rendered here as
kustomize would, against KubeRay v1.7.0's CRD schemas (unknown fields included) and against the allocatable CPU
and memory of the machine types they select (the table in infra/README.md); the cluster-launcher file against
Ray's own schema and `validate_config`, with no Ray default command left in it, an identity on every node and
Ray resources its machines have; the Ray version of the lock file, the jobs and flags that exist, an image Ray can
start."""

from __future__ import annotations

import copy
import gzip
import re
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO
from tests.kustomize import Unsupported, render

INFRA = REPO / "infra"
KUBERAY_DIR = INFRA / "kuberay"
OVERLAYS = {"gke": "GKE", "eks": "EKS"}  # overlay directory -> platform column of the machine table
CRDS = Path(__file__).parent / "schemas" / "kuberay-v1.7.0"
KUBERAY = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
GIB = 1024**3


@lru_cache(maxsize=2)
def crd_schema(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser: the CRDs are large
    crd = yaml.load(gzip.open(CRDS / f"{KUBERAY[kind]}.yaml.gz"), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@lru_cache(maxsize=2)
def crd_validator(kind: str) -> Any:
    """A validator for the CRD's schema, made once: `jsonschema.validate` checks the (large) schema every call."""
    import jsonschema

    schema = crd_schema(kind)
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return validator(schema)


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

    schema = crd_schema(manifest["kind"])
    crd_validator(manifest["kind"]).validate(manifest)
    unknown = unknown_fields(manifest, schema)
    if unknown:
        raise ValueError(f"unknown fields: {unknown}")


@lru_cache(maxsize=4)
def _rendered(directory: Path) -> list[dict[str, Any]]:
    return render(directory)


def rendered(name: str) -> list[dict[str, Any]]:
    """The objects of base/ or of an overlay, a fresh copy each call."""
    directory = KUBERAY_DIR / ("base" if name == "base" else f"overlays/{name}")
    return copy.deepcopy(_rendered(directory))


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


def test_renderer_follows_kustomize_and_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "kustomization.yaml").write_text("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
                                             "resources: [pod.yaml]\n")
    (base / "pod.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "1", "b": "2"}},
        "spec": {"containers": [{"name": "c", "image": "REGISTRY/img:1.0", "env": [{"name": "X", "value": "1"}]}]}}))
    overlay = tmp_path / "overlay"
    overlay.mkdir()

    def build(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
        kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                         "resources": ["../base"], **kustomization}
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return render(overlay)

    (pod,) = build({
        "patches": [
            {"patch": "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {b: null, c: '3'}}\n"},
            {"patch": "- {op: test, path: /spec/containers/0/name, value: c}\n"
                      "- {op: add, path: /spec/containers/0/env/-, value: {name: Y, value: '2'}}\n"
                      "- {op: replace, path: /metadata/name, value: q}\n", "target": {"kind": "Pod", "name": "p"}}],
        "images": [{"name": "REGISTRY/img", "newName": "example.org/r/img"}]})
    assert pod["metadata"] == {"name": "q", "labels": {"a": "1", "c": "3"}}
    assert pod["spec"]["containers"][0]["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    assert pod["spec"]["containers"][0]["image"] == "example.org/r/img:1.0"
    with pytest.raises(Unsupported, match="namespace"):
        build({"namespace": "elsewhere"})
    with pytest.raises(Unsupported, match="a list at /spec/containers"):
        build({"patches": [{"patch": "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n"}]})
    with pytest.raises(AssertionError, match="JSON 6902 test failed"):
        build({"patches": [{"patch": "- {op: test, path: /spec/containers/0/name, value: other}\n",
                            "target": {"kind": "Pod", "name": "p"}}]})
    with pytest.raises(ValueError, match="matches no resource"):
        build({"patches": [{"patch": "apiVersion: v1\nkind: Pod\nmetadata: {name: absent, labels: {a: '0'}}\n"}]})
    with pytest.raises(ValueError, match="matches no container"):
        build({"images": [{"name": "REGISTRY/other", "newName": "x"}]})


def kuberay_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(name, o) for name in ("base", *OVERLAYS) for o in rendered(name) if o["kind"] in KUBERAY]


@pytest.mark.parametrize("where, manifest", kuberay_objects(),
                         ids=[f"{w}-{o['metadata']['name']}" for w, o in kuberay_objects()])
def test_kuberay_manifests_are_valid_for_kuberay_1_7(where: str, manifest: dict[str, Any]) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    check_kuberay(manifest)


def test_a_planted_unknown_field_or_wrong_type_is_caught() -> None:
    import jsonschema

    cluster = one(rendered("gke"), "RayCluster")
    planted = copy.deepcopy(cluster)
    planted["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    with pytest.raises(ValueError, match=r"\.spec\.workerGroupSpecs\[0\]\.maxReplica"):
        check_kuberay(planted)
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        check_kuberay(wrong)


def pod_templates(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{group["groupName"]: group["template"]["spec"] for group in spec["workerGroupSpecs"]}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_autoscales_gpu_workers_with_images_from_a_registry(overlay: str) -> None:
    objects = rendered(overlay)
    cluster = one(objects, "RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    pods = pod_templates(one(objects, "RayCluster"))
    for pod in pods.values():
        assert pod["serviceAccountName"] == "geosoc"
        image = pod["containers"][0]["image"]
        assert "/" in image and not image.endswith(":latest") and not image.startswith("REGISTRY/"), image
        assert "node.kubernetes.io/instance-type" in pod["nodeSelector"]
    assert "nvidia.com/gpu" not in pods["head"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" in pods["gpu"]["containers"][0]["resources"]["limits"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pods["gpu"]["tolerations"]
    annotations = one(objects, "ServiceAccount", "geosoc")["metadata"]["annotations"]
    if overlay == "gke":
        assert set(annotations) == {"iam.gke.io/gcp-service-account"}
        assert pods["gpu"]["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    else:
        assert set(annotations) == {"eks.amazonaws.com/role-arn"}
        for pod in pods.values():  # boto3 reads AWS_DEFAULT_REGION, other AWS SDKs AWS_REGION: the same region
            env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
            assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"]


# --- machine types: the table in infra/README.md, and the pods and VMs that must fit them -------------------------

def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def memory_bytes(quantity: str | int) -> float:
    """A Kubernetes memory quantity (Gi, Mi, G, ...) or a docker size (4g, 512m: binary units)."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity))
    assert match, quantity
    number, unit = float(match[1]), match[2]
    binary = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "k": 1, "m": 2, "g": 3, "t": 4, "b": 0, "": 0}
    decimal = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit in decimal:
        return number * 1000 ** decimal[unit]
    return number * 1024 ** binary[unit]


def reserved_cpu(vcpus: int) -> float:
    """kube-reserved CPU on GKE and on EKS (the same formula): 6 % of the first core, 1 % of the second, 0.5 % of
    the next two, 0.25 % of the rest."""
    bands = [(0, 1, 0.06), (1, 2, 0.01), (2, 4, 0.005), (4, float("inf"), 0.0025)]
    return sum(rate * max(0.0, min(vcpus, high) - low) for low, high, rate in bands)


def allocatable(platform: str, vcpus: int, memory_gib: float, max_pods: int | None) -> tuple[float, float]:
    """(cores, GiB) a node's kubelet offers to pods: GKE's reservation bands, or EKS's 255 MiB + 11 MiB per pod;
    both with a 100 MiB hard eviction threshold."""
    if platform == "GKE":
        bands = [(0, 4, 0.25), (4, 8, 0.2), (8, 16, 0.1), (16, 128, 0.06), (128, float("inf"), 0.02)]
        reserved = sum(rate * max(0.0, min(memory_gib, high) - low) for low, high, rate in bands)
    elif platform == "EKS":
        assert max_pods is not None, "EKS reserves memory by the instance type's max pods"
        reserved = (255 + 11 * max_pods) / 1024
    else:
        raise ValueError(platform)
    return vcpus - reserved_cpu(vcpus), memory_gib - reserved - 100 / 1024


# Kept free on every node: the DaemonSets of the platform (kube-proxy, logging, metrics, the CSI and GPU device
# plugins, the metadata or pod-identity agents: under 1 CPU and 2 GiB together) and the share of memory the
# kernel keeps before the kubelet sees any (node capacity is 1-3 % below the nominal size).
HEADROOM_CPU = 1.0


def headroom_memory_gib(memory_gib: float) -> float:
    return 2 + 0.03 * memory_gib


def machine_table() -> list[dict[str, str]]:
    """The rows of the machine table in infra/README.md (its header names `machine type` and `allocatable CPU`)."""
    lines = [line.strip() for line in (INFRA / "README.md").read_text().splitlines()]
    (start,) = [i for i, line in enumerate(lines) if line.startswith("|") and "machine type" in line
                and "allocatable CPU" in line]
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [cell.strip().strip("`") for cell in line.strip("|").split("|")])))
    return rows


def machine(platform: str, name: str) -> dict[str, Any]:
    rows = [r for r in machine_table() if r["platform"] == platform and r["machine type"] == name]
    assert len(rows) == 1, f"{platform} {name}: not in the machine table of infra/README.md"
    row = rows[0]
    gpus = re.match(r"\d+", row["GPU"])
    return {"vcpus": int(row["vCPU"]), "memory_gib": float(row["memory (GiB)"]), "gpus": int(gpus[0]) if gpus else 0,
            "gpu_model": row["GPU"], "row": row}


def test_machine_table_states_the_allocatable_resources_of_each_machine() -> None:
    rows = machine_table()
    assert {r["platform"] for r in rows} == {"GKE", "EKS", "GCE"}
    for row in rows:
        if row["platform"] == "GCE":  # cluster-launcher VMs: no kubelet, Ray sees the whole VM
            continue
        max_pods = int(row["max pods"]) if row["max pods"].isdigit() else None
        cpu, memory = allocatable(row["platform"], int(row["vCPU"]), float(row["memory (GiB)"]), max_pods)
        assert float(row["allocatable CPU"]) == pytest.approx(cpu, abs=0.005), row
        assert float(row["allocatable memory (GiB)"]) == pytest.approx(memory, abs=0.005), row


def pod_requests(pod: dict[str, Any], sidecars: list[dict[str, Any]]) -> dict[str, float]:
    """The sum of the containers' requests (KubeRay adds the autoscaler sidecar to the head pod)."""
    total = {"cpu": 0.0, "memory": 0.0, "gpu": 0.0}
    for container in pod["containers"] + sidecars:
        requests = container["resources"]["requests"]
        assert requests == container["resources"]["limits"], f"{container['name']}: requests and limits differ"
        total["cpu"] += cpu_cores(requests.get("cpu", 0))
        total["memory"] += memory_bytes(requests.get("memory", 0)) / GIB
        total["gpu"] += float(requests.get("nvidia.com/gpu", 0))
    return total


def misfits(platform: str, cluster: dict[str, Any]) -> list[str]:
    """What in a rendered RayCluster does not fit the machine its pods select, or /dev/shm and the object store."""
    found = []
    autoscaler = {"name": "autoscaler", "resources": cluster["spec"]["autoscalerOptions"]["resources"]}
    groups = {"head": cluster["spec"]["headGroupSpec"],
              **{g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}}
    for name, pod in pod_templates(cluster).items():
        node = machine(platform, pod["nodeSelector"]["node.kubernetes.io/instance-type"])
        asks = pod_requests(pod, [autoscaler] if name == "head" else [])
        cpu, memory = allocatable(platform, node["vcpus"], node["memory_gib"],
                                  int(node["row"]["max pods"]) if node["row"]["max pods"].isdigit() else None)
        if asks["cpu"] + HEADROOM_CPU > cpu:
            found.append(f"{name}: {asks['cpu']} CPU + {HEADROOM_CPU} > {cpu:.2f} allocatable")
        if asks["memory"] + headroom_memory_gib(node["memory_gib"]) > memory:
            found.append(f"{name}: {asks['memory']:.2f} GiB + {headroom_memory_gib(node['memory_gib']):.2f} "
                         f"> {memory:.2f} GiB allocatable")
        if asks["gpu"] > node["gpus"]:
            found.append(f"{name}: {asks['gpu']} GPUs on a machine with {node['gpus']}")
        if asks["gpu"] and "L4" in node["gpu_model"] and platform == "GKE":
            if pod["nodeSelector"].get("cloud.google.com/gke-accelerator") != "nvidia-l4":
                found.append(f"{name}: no cloud.google.com/gke-accelerator: nvidia-l4 selector")
        (shm,) = [v for v in pod["volumes"] if v["name"] == "shm"]
        limit = memory_bytes(pod["containers"][0]["resources"]["limits"]["memory"])
        shm_bytes = memory_bytes(shm["emptyDir"]["sizeLimit"])
        if shm["emptyDir"].get("medium") != "Memory" or shm_bytes >= limit:
            found.append(f"{name}: /dev/shm must be memory-backed and inside the {limit / GIB:.0f} GiB limit")
        store = float(groups[name]["rayStartParams"].get("object-store-memory", "inf"))
        if store > 0.95 * shm_bytes:  # Ray moves a store larger than /dev/shm to disk
            found.append(f"{name}: object store {store / GIB:.1f} GiB > 95 % of /dev/shm {shm_bytes / GIB:.1f} GiB")
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_fits_the_machine_type_it_selects(overlay: str) -> None:
    assert misfits(OVERLAYS[overlay], one(rendered(overlay), "RayCluster")) == []


def test_a_pod_too_large_for_its_machine_is_caught() -> None:
    cluster = one(rendered("eks"), "RayCluster")
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    worker["requests"]["memory"] = worker["limits"]["memory"] = "64Gi"  # the whole g6.4xlarge: never schedules
    cluster["spec"]["headGroupSpec"]["rayStartParams"].pop("object-store-memory")  # Ray's default: 30 % of 16 GiB
    found = misfits("EKS", cluster)
    assert len(found) == 2 and found[0].startswith("head: object store") and found[1].startswith("gpu: 64.00 GiB")


def locked(name: str) -> str:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==")[1]
    raise AssertionError(f"{name} not in requirements.lock")


def test_manifests_parse_and_match_versions() -> None:
    for where in ("base", *OVERLAYS):
        cluster = one(rendered(where), "RayCluster")
        assert cluster["spec"]["rayVersion"] == locked("ray")
    runtime = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    assert ".venv" in runtime["excludes"]


def entrypoints(where: str) -> dict[str, list[str]]:
    return {o["metadata"]["name"]: shlex.split(o["spec"]["entrypoint"]) for o in rendered(where) if o["kind"] == "RayJob"}


def root_of(entry: list[str]) -> str:
    return entry[entry.index("--root") + 1]


def test_every_rayjob_runs_an_existing_job_with_flags_it_accepts() -> None:
    from geosoc.jobs import job_parser

    base = entrypoints("base")
    assert {name.split("-")[1] for name in base} >= {"pretrain", "finetune", "predict"}
    schemes = {"gke": "gs://", "eks": "s3://"}
    for overlay, scheme in schemes.items():
        jobs = entrypoints(overlay)
        assert set(jobs) == set(base)
        for name, entry in jobs.items():
            script = REPO / entry[1].removeprefix("/opt/geosoc/")
            assert entry[0] == "python" and script.exists(), name
            job_parser(script.stem).parse_args(entry[2:])  # exits (fails the test) on an unknown flag
            assert root_of(entry).startswith(scheme), (overlay, name)
            unrooted = [token for token in entry if token != root_of(entry)]
            assert unrooted == [token for token in base[name] if token != root_of(base[name])], (overlay, name)
    assert not any("://" in root_of(entry) for entry in base.values())  # the base is not applied as it is


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_map_job_asks_for_every_gpu_the_cluster_can_grow_to(overlay: str) -> None:
    """The GPU group starts at 0 replicas: a job sized from what is up at start would use one GPU. It asks for
    maxReplicas x GPUs per pod actors of its GPUs each, and the autoscaler brings the nodes."""
    from geosoc.jobs import job_parser

    (gpu,) = one(rendered(overlay), "RayCluster")["spec"]["workerGroupSpecs"]
    per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    args = job_parser("predict").parse_args(entrypoints(overlay)["geosoc-predict-europe"][2:])
    assert args.max_actors * args.gpus_per_actor == gpu["maxReplicas"] * per_pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_has_the_stage_it_is_applied_in(overlay: str) -> None:
    """`kubectl apply -k OVERLAY -l geosoc/stage=...`: the cluster first, then one job at a time (applied whole,
    the jobs would start together although each reads what the one before writes)."""
    stages = {}
    for obj in rendered(overlay):
        stage = obj["metadata"]["labels"]["geosoc/stage"]
        if obj["kind"] == "RayJob":
            assert Path(shlex.split(obj["spec"]["entrypoint"])[1]).stem == stage
        else:
            assert stage == "cluster", obj["kind"]
        stages[obj["kind"], obj["metadata"]["name"]] = stage
    assert sorted(stages.values()) == ["cluster", "cluster", "finetune", "predict", "pretrain"]


# --- the cluster launcher --------------------------------------------------------------------------------------

def launcher() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "cluster-launcher" / "cluster.yaml").read_text())


COMMAND_FIELDS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                  "head_start_ray_commands", "worker_start_ray_commands")


def ray_default_commands_in(prepared: dict[str, Any]) -> list[str]:
    """The commands of Ray's GCP defaults (the installed ray's defaults.yaml) that a prepared config would run
    although the file does not say so. The default start commands are not among them: the file sets its own."""
    import ray.autoscaler

    defaults = yaml.safe_load((Path(ray.autoscaler.__file__).parent / "gcp" / "defaults.yaml").read_text())
    default = {cmd for field in COMMAND_FIELDS[:4] for cmd in defaults.get(field) or []}
    return sorted({cmd for field in COMMAND_FIELDS for cmd in prepared.get(field) or [] if cmd in default})


def test_cluster_launcher_file_is_valid_for_ray() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = launcher()
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # Ray's ray-schema.json, then its own checks
    docker = config["docker"]
    assert "--gpus all" in docker["worker_run_options"] and "--gpus all" not in " ".join(docker["run_options"])
    assert "--gpus all" not in " ".join(docker["head_run_options"])


def test_cluster_launcher_runs_only_its_own_commands() -> None:
    from ray.autoscaler._private.util import prepare_config

    config = launcher()
    assert all(field in config for field in COMMAND_FIELDS)  # none left for prepare_config to fill in
    prepared = prepare_config(copy.deepcopy(config))
    assert ray_default_commands_in(prepared) == []
    assert prepared["head_setup_commands"] == config["setup_commands"] + config["head_setup_commands"]
    assert prepared["worker_setup_commands"] == config["setup_commands"] + config["worker_setup_commands"]
    assert not any("pip" in cmd.split() for field in COMMAND_FIELDS for cmd in prepared[field])
    planted = copy.deepcopy(config)  # the check sees what Ray brings in when a field is left out
    del planted["head_setup_commands"]
    assert ray_default_commands_in(prepare_config(planted)) == ["pip install google-api-python-client==1.7.8"]


def test_every_launcher_node_has_an_identity_and_fits_its_machine() -> None:
    config = launcher()
    docker = config["docker"]
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        (account,) = node_config["serviceAccounts"]  # GCE attaches one service account at most
        assert account["email"].endswith(".iam.gserviceaccount.com") and CLOUD_PLATFORM in account["scopes"], name
        vm = machine("GCE", node_config["machineType"])
        resources = node_type["resources"]
        assert 0 < resources["CPU"] <= vm["vcpus"], name
        assert resources.get("GPU", 0) == vm["gpus"] == sum(a["acceleratorCount"] for a in
                                                              node_config.get("guestAccelerators", [])), name
        is_head = name == config["head_node_type"]
        run_options = docker["run_options"] + docker["head_run_options" if is_head else "worker_run_options"]
        start = " ".join(config["head_start_ray_commands" if is_head else "worker_start_ray_commands"])
        (shm,) = [memory_bytes(o.split("=")[1]) for o in run_options if o.startswith("--shm-size=")]
        (store,) = [float(w.split("=")[1]) for w in start.split() if w.startswith("--object-store-memory=")]
        assert store <= 0.95 * shm < 0.5 * vm["memory_gib"] * GIB, name  # the store in /dev/shm, half the VM free
        assert ("--gpus all" in run_options) == bool(vm["gpus"]), name


def test_dockerfile_installs_what_the_makefile_installs() -> None:
    dockerfile = (INFRA / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in dockerfile and "torch==2.14.1 torchvision==0.29.1" in makefile
    assert "-c requirements.lock" in dockerfile  # the lock's versions, not its test tools
    assert locked("torch") == "2.14.1"
    assert not any(line.startswith("ENTRYPOINT") for line in dockerfile.splitlines())  # Ray runs `docker run IMAGE bash`
    (apt,) = [line for line in dockerfile.splitlines() if "apt-get install" in line]
    assert {"rsync", "openssh-client"} <= set(apt.split())  # the launcher syncs with rsync and reaches workers by ssh
