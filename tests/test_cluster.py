"""Cluster configs validate without cloud access: Ray's autoscaler schema, KubeRay CRD fields,
Kubernetes schemas of the pod templates (kubernetes-validate), and the job commands the docs cite."""

import copy
import pathlib
import re
import shlex
import subprocess

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
    # The shared filesystem every job's outputs live on: mounted on the host, passed into the container.
    assert any("/mnt/shared" in c and "mount" in c for c in cfg["initialization_commands"])
    assert any("-v /mnt/shared:/mnt/shared" in o for o in cfg["docker"]["run_options"])
    for key in ("initialization_commands", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cfg[key]:
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, f"{name} {key}: {cmd!r}: {r.stderr}"
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


def _k8s_validate(resource: dict) -> None:
    """Strict Kubernetes OpenAPI validation, offline (schemas ship inside kubernetes-validate)."""
    import kubernetes_validate

    kubernetes_validate.validate(resource, "1.30", strict=True)


def _pod_templates(spec):
    yield "headGroupSpec", spec["headGroupSpec"]["template"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]


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
    # No offline schema for the RayCluster CRD itself; the pod templates inside it are core types.
    for where, template in _pod_templates(spec):
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where}, "template": template})


def test_kuberay_manifests():
    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (rc["apiVersion"], rc["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    _check_raycluster_spec(rc["spec"])
    assert job["spec"]["rayClusterSpec"] == rc["spec"], "rayjob.yaml's cluster spec drifted from raycluster.yaml"
    assert _job_commands(job["spec"]["entrypoint"]), "RayJob entrypoint runs no job"
    # Every pod mounts the shared claim that shared-pvc.yaml creates.
    pvc = yaml.safe_load((CLUSTER / "kuberay" / "shared-pvc.yaml").read_text())
    _k8s_validate(pvc)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for where, template in _pod_templates(rc["spec"]):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == [pvc["metadata"]["name"]], where
    # The image the manifests name is cluster/Dockerfile's: it installs the project where the RayJob runs.
    docker = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", docker, re.M).group(1)
    assert f"cd {workdir} " in job["spec"]["entrypoint"]
    images = {c["image"] for _, t in _pod_templates(rc["spec"]) for c in t["spec"]["containers"]}
    assert images == {"agenttuning:latest"}


def test_dockerfile_layers_and_runtime_contents():
    """Dependencies install before the source is copied (a code change reinstalls nothing), from
    constraints.txt, with the runtime extras only; tests stay out of the image."""
    docker = (CLUSTER / "Dockerfile").read_text()
    steps = [ln.split()[0] for ln in docker.splitlines() if ln and not ln.startswith((" ", "#"))]
    lines = [ln for ln in docker.splitlines() if ln and not ln.startswith("#")]
    deps = next(i for i, ln in enumerate(lines) if '-c constraints.txt ".[envs]"' in ln)
    source = next(i for i, ln in enumerate(lines) if ln.startswith("COPY") and " . ." in ln)
    assert deps < source and steps.count("FROM") == 1
    assert "test" not in docker.split('".[', 1)[1].split("]", 1)[0]
    block = re.search(r"APT_PACKAGES=\((.*?)\n\)", (ROOT / "scripts" / "install.sh").read_text(), re.S).group(1)
    apt = {p for ln in block.splitlines() for p in ln.split("#", 1)[0].split()}
    apt -= {"python3-venv", "python3-dev"}  # the image's own Python (python:3.11) has venv and headers
    assert apt <= set(docker.split()), f"install.sh packages missing from the image: {apt - set(docker.split())}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "tests" in ignored and ".git" in ignored and "outputs" in ignored


def test_kubernetes_validation_catches_a_typo():
    import kubernetes_validate

    rc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    template = copy.deepcopy(rc["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["resorces"] = template["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError, match="resorces"):
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template})


JOB = re.compile(r"python -m (pipelines\.\w+|serve\.\w+)|agenttuning (\w+)")


def _job_commands(text: str):
    """(module, config, overrides) of each `python -m pipelines.X CONFIG k=v ...` line in text."""
    from pipelines.cli import JOBS

    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    out = []
    for line in text.splitlines():
        for part in re.split(r"&&|;", line):
            m = JOB.search(part)
            if not m:
                continue
            module = m.group(1) or JOBS.get(m.group(2))
            if module is None:  # e.g. "agenttuning run" named in prose
                continue
            args = shlex.split(part[m.end():].split("#")[0].strip().rstrip("`)"))
            if args and args[0].endswith(".yaml"):
                out.append((module, args[0], [a for a in args[1:] if "=" in a and not a.startswith("-")]))
    return out


@pytest.mark.parametrize("doc", ["README.md", "aws.yaml", "gcp.yaml", "runtime_env.yaml", "kuberay/raycluster.yaml",
                                 "kuberay/rayjob.yaml"])
def test_cited_job_commands_load(doc):
    """Every job command in the cluster docs names a config that exists and loads with its overrides."""
    from agenttuning.config import load_config

    cmds = _job_commands((CLUSTER / doc).read_text())
    assert cmds, f"{doc} cites no job command"
    for module, config, overrides in cmds:
        assert (ROOT / config).is_file(), f"{doc}: {config} does not exist"
        load_config(str(ROOT / config), overrides)
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{doc}: no module {module}"


def test_readme_covers_the_agentlm_7b_path():
    readme = (CLUSTER / "README.md").read_text()
    configs = {c for _, c, _ in _job_commands(readme)}
    assert {"configs/data_agentlm.yaml", "configs/train_llama2_7b.yaml", "configs/eval_agentbench_dev.yaml",
            "configs/eval_general.yaml"} <= configs
    for path in re.findall(r"cluster/[\w/.-]+\.(?:yaml|md)|cluster/Dockerfile", readme):
        assert (ROOT / path).is_file(), path


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)
    assert "outputs/" in env["excludes"]
