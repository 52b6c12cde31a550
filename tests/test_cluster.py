"""Cluster configs validate without cloud access: Ray's autoscaler schema, KubeRay CRD fields."""

import copy
import pathlib
import re

import jsonschema
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_autoscaler_config_passes_ray_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types["head"]["resources"] == {"CPU": 0}
    assert any("gpu" in t for t in types) and all("max_workers" in v for k, v in types.items() if k != "head")
    assert any("scripts/install.sh" in c for c in cfg["setup_commands"])
    bad = copy.deepcopy(raw)
    bad["max_wrokers"] = 3  # a typo must not pass
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def _check_pod_template(t, where):
    containers = t["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: a container needs name and image"
        assert "limits" in c.get("resources", {}), f"{where}: resources.limits missing"


def _check_raycluster_spec(spec):
    """Fields the KubeRay v1 CRDs require (headGroupSpec.template; groupName/template per worker group)."""
    _check_pod_template(spec["headGroupSpec"]["template"], "headGroupSpec")
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    for g in spec["workerGroupSpecs"]:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", g["groupName"])
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _check_pod_template(g["template"], g["groupName"])
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
               for g in spec["workerGroupSpecs"])


def test_kuberay_manifests():
    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    _check_raycluster_spec(rc["spec"])
    assert job["spec"]["rayClusterSpec"] == rc["spec"], "rayjob.yaml's cluster spec drifted from raycluster.yaml"
    for cfg in re.findall(r"configs/\S+\.yaml", job["spec"]["entrypoint"]):
        assert (ROOT / cfg).is_file(), f"RayJob entrypoint names missing {cfg}"


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert "outputs/" in env["excludes"]
