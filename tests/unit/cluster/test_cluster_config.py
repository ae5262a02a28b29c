"""The cluster configs are valid for the installed Ray and say what the cluster guide (docs/guides/vm-cluster.md) says they do."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

from vcl_dist.config import load_config
from vcl_dist.ray_cluster import RAY_DATA_ENV

SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path, provider", [("ray-cluster.yaml", "aws"), ("cluster/gcp.yaml", "gcp")])
def test_autoscaler_configs_validate_against_the_installed_schema(repo_root, path, provider):
    config = yaml.safe_load((repo_root / path).read_text())
    jsonschema.validate(config, SCHEMA)
    assert config["provider"]["type"] == provider
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert set(gpu_types) == {"gpu_worker_spot", "gpu_worker_ondemand"}  # spot with an on-demand fallback
    assert all(t["min_workers"] == 0 for t in gpu_types.values())
    assert any(not t["resources"].get("GPU") and name != config["head_node_type"] for name, t in types.items())  # CPU workers
    assert config["idle_timeout_minutes"] > 0 and config["setup_commands"]
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert f"rayproject/ray:{ray.__version__}" in config["docker"]["image"]
    # Token authentication on every node: the token at Ray's default path, RAY_AUTH_MODE=token
    # on every `ray start`, the head's and the workers'.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts)


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


def _documents(repo_root, path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((repo_root / path).read_text())}


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def network_policy_admits(policy: dict, target_labels: dict, namespace: str, peer_labels: dict, peer_namespace: str,
                          port: int) -> bool:
    """Kubernetes' ingress rule for one connection (matchLabels selectors, TCP ports): a pod the
    policy selects admits a peer when some rule's ``from`` and ``ports`` both let it in."""
    if not _matches(policy["spec"]["podSelector"], target_labels):
        return True  # the policy does not apply to this pod
    peer_ns_labels = {"kubernetes.io/metadata.name": peer_namespace}
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        for peer in rule.get("from", []):
            in_namespace = (_matches(peer["namespaceSelector"], peer_ns_labels) if "namespaceSelector" in peer
                            else peer_namespace == namespace)
            if in_namespace and _matches(peer.get("podSelector", {}), peer_labels):
                return True
    return False


OPERATOR = {"labels": {"app.kubernetes.io/name": "kuberay-operator"}, "namespace": "kuberay-system"}


@pytest.mark.parametrize("path", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_the_kuberay_operator_can_follow_the_cluster_and_no_one_else_can(repo_root, path):
    """What the RayJob controller needs (ray-project/kuberay, ``FetchHeadServiceURL`` and the
    dashboard HTTP client): it calls ``http://<head Service>:<dashboard port>/api/jobs/…`` from
    its own pod in its own namespace, with the cluster's token in ``x-ray-authorization``. So the
    dashboard must listen beyond the head's loopback, token auth must be on (the operator reads
    the token KubeRay made), and the NetworkPolicy must let the operator in on that port while
    keeping every other pod out of the cluster."""
    docs = _documents(repo_root, path)
    cluster = docs["RayCluster"]["spec"] if "RayCluster" in docs else docs["RayJob"]["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    params = head["rayStartParams"]
    assert params.get("dashboard-host", "0.0.0.0") not in ("127.0.0.1", "localhost", "::1")
    dashboard_port = int(params.get("dashboard-port", 8265))
    assert cluster["authOptions"] == {"mode": "token"}
    for c in _containers(head):  # a port list of its own replaces KubeRay's default Service ports
        assert all(p["containerPort"] == dashboard_port for p in c.get("ports", []) if p.get("name") == "dashboard")

    policy = docs["NetworkPolicy"]
    namespace = "ml"
    pods = [g["template"]["metadata"]["labels"] for g in [head, *cluster["workerGroupSpecs"]]]
    head_labels = pods[0] | {"ray.io/node-type": "head"}
    assert all(_matches(policy["spec"]["podSelector"], labels) for labels in pods)  # every Ray pod is covered
    assert network_policy_admits(policy, head_labels, namespace, OPERATOR["labels"], OPERATOR["namespace"], dashboard_port)
    assert not network_policy_admits(policy, head_labels, namespace, OPERATOR["labels"], OPERATOR["namespace"], 6379)
    for worker in pods[1:]:  # the cluster's own pods reach the GCS and the dashboard
        for port in (6379, dashboard_port):
            assert network_policy_admits(policy, head_labels, namespace, worker, namespace, port)
    stranger = {"app": "web"}
    for peer_namespace in (namespace, "default", OPERATOR["namespace"]):
        for port in (dashboard_port, 6379, 10001):
            assert not network_policy_admits(policy, head_labels, namespace, stranger, peer_namespace, port)


@pytest.mark.parametrize("path", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_kuberay_manifests(repo_root, path):
    manifest = _documents(repo_root, path)["RayJob" if "rayjob" in path else "RayCluster"]
    assert manifest["apiVersion"] == "ray.io/v1"
    spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert groups["gpu"]["minReplicas"] == 0 and groups["gpu"]["maxReplicas"] >= 1
    assert _containers(groups["gpu"])[0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for group in [head, *groups.values()]:
        assert all(c["image"].startswith(f"rayproject/ray:{ray.__version__}") for c in _containers(group))
    if manifest["kind"] == "RayJob":
        assert manifest["spec"]["shutdownAfterJobFinishes"] is True
        # The submitter is a sidecar of the head pod, which then must not restart on its own.
        assert manifest["spec"]["submissionMode"] == "SidecarMode"
        assert head["template"]["spec"]["restartPolicy"] == "Never"
        entrypoint = manifest["spec"]["entrypoint"].split()
        assert entrypoint[:2] == ["python", "jobs/train.py"]
        config = entrypoint[entrypoint.index("--config") + 1]
        load_config(repo_root / config, [e for e in entrypoint if "=" in e])
        RuntimeEnv(**yaml.safe_load(manifest["spec"]["runtimeEnvYAML"]))


def _project() -> dict:
    import tomllib

    return tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())["project"]


def test_cluster_installs_pin_a_release_and_carry_every_dependency(repo_root):
    """A node installs the released version (never a moving branch) and every package the jobs
    import: the runtime envs list pyproject's dependencies, less Ray (the image has it)."""
    project = _project()
    wanted = sorted(d for d in project["dependencies"] if not d.startswith("ray["))
    runtime_env = yaml.safe_load((repo_root / "cluster/runtime_env.yaml").read_text())
    rayjob_env = yaml.safe_load(_documents(repo_root, "cluster/kuberay/rayjob.yaml")["RayJob"]["spec"]["runtimeEnvYAML"])
    assert sorted(runtime_env["pip"]) == wanted and sorted(rayjob_env["pip"]) == wanted
    tag = f"v{project['version']}"
    assert rayjob_env["working_dir"].endswith(f"/refs/tags/{tag}.zip")
    for path in ("ray-cluster.yaml", "cluster/gcp.yaml"):
        installs = [c for c in yaml.safe_load((repo_root / path).read_text())["setup_commands"] if "vcl-dist" in c]
        assert installs and all(f"vcl-dist.git@{tag}" in c for c in installs), path


def test_torch_floor_is_the_first_safe_weights_only_release(repo_root):
    """torch.load(weights_only=True) is safe only from torch 2.6 (CVE-2025-32434)."""
    import tomllib

    deps = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.6" in deps
    for path in ("cluster/runtime_env.yaml", "cluster/kuberay/rayjob.yaml"):
        assert "torch>=2.6" in (repo_root / path).read_text(), path


def test_runtime_env_and_gpu_config(repo_root):
    env = RuntimeEnv(**yaml.safe_load((repo_root / "cluster/runtime_env.yaml").read_text()))
    assert RAY_DATA_ENV.items() <= env["env_vars"].items()  # the settings a local Ray gets
    cfg = load_config(repo_root / "jobs/configs/gpu.yaml")
    assert cfg.train.use_gpu is True and cfg.train.amp is True and cfg.data.train_path.startswith("s3://")
    # Spot-ready: restarts allowed, and checkpoints inside epochs by the clock (a preemption loses minutes, not an epoch).
    assert cfg.train.max_failures > 0 and 0 < cfg.train.checkpoint_every_minutes <= 10
    text = (repo_root / "jobs/configs/gpu.yaml").read_text().lower()
    assert "secret" not in text and "access_key" not in text


@pytest.mark.parametrize("path", ["ray-cluster.yaml", "cluster/gcp.yaml"])
def test_the_local_autoscaling_cluster_is_built_from_the_repository_config(repo_root, path, tmp_path):
    """The autoscaling tests and benchmarks/autoscale.py run the node types of the repository's
    own configs (GPUs as a stand-in resource): a change to a config changes what they run."""
    from autoscaling_cluster import FAKE_HEAD_TYPE, GPU_STAND_IN, autoscaling_config

    config = yaml.safe_load((repo_root / path).read_text())
    built = autoscaling_config(repo_root / path, gcs_port=6379)
    assert built["provider"]["type"] == "fake_multinode" and built["head_node_type"] == FAKE_HEAD_TYPE
    assert {k: built[k] for k in ("max_workers", "upscaling_speed", "idle_timeout_minutes")} == \
        {k: config[k] for k in ("max_workers", "upscaling_speed", "idle_timeout_minutes")}
    head = config["head_node_type"]
    assert built["available_node_types"][FAKE_HEAD_TYPE]["resources"] == config["available_node_types"][head]["resources"]
    workers = {name: t for name, t in config["available_node_types"].items() if name != head}
    assert set(built["available_node_types"]) == set(workers) | {FAKE_HEAD_TYPE}
    for name, node_type in workers.items():
        resources = dict(node_type["resources"])
        if "GPU" in resources:
            resources[GPU_STAND_IN] = resources.pop("GPU")
        assert built["available_node_types"][name]["resources"] == resources
        assert built["available_node_types"][name]["max_workers"] == node_type["max_workers"]
        assert built["available_node_types"][name]["min_workers"] == node_type.get("min_workers", 0)

    config["available_node_types"]["gpu_worker_spot"]["max_workers"] = 3
    config["idle_timeout_minutes"] = 2
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(config))
    changed = autoscaling_config(tmp_path / "changed.yaml", gcs_port=6379)
    assert changed["available_node_types"]["gpu_worker_spot"]["max_workers"] == 3 and changed["idle_timeout_minutes"] == 2
