"""A real two-node Ray cluster on one machine; training submitted with `ray job submit` spans both.

`ray start --head` and a second `ray start --address` (4 logical CPUs each, own ports and temp
dirs), then the training job the way users submit it (`ray job submit --working-dir .
--runtime-env cluster/runtime_env.yaml -- python -m pipelines.train ...`) with
`scaling.placement_strategy=STRICT_SPREAD`; the training workers' own reports (workers.json: rank →
node id) must name both nodes. Default run: training over packed rows written in-process; `-m slow`:
the real data job (configs/data_agentlm.yaml on local files) and training as one submitted job.

The cluster never meets the session's `ray_local` instance: nothing in this process calls ray.init,
the nodes use their own temp dirs (so `ray_current_cluster` under /tmp/ray is never written and
other sessions' `ray.init()` cannot find them), and teardown kills exactly the process trees of the
two `ray start` commands, never `ray stop` (which would stop every Ray instance on the machine,
including other engineers' test sessions).
"""

import importlib.util
import json
import logging
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List

import psutil
import pytest

log = logging.getLogger(__name__)
REPO = pathlib.Path(__file__).resolve().parents[1]

# Free-port and wait-for-dashboard helpers of the single-node job-submit smoke script.
_spec = importlib.util.spec_from_file_location("ray_job_submit_train", REPO / "scripts" / "ray_job_submit_train.py")
_rjs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_rjs)

# Ports every node opens; the head adds GCS, dashboard and client server. Ray's defaults for some
# (dashboard agent 52365, client 10001) are fixed numbers, so two nodes on one host would collide.
NODE_PORTS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
HEAD_PORTS = ("--port", "--dashboard-port", "--ray-client-server-port")


class LocalCluster:
    """N Ray nodes on 127.0.0.1, each started by its own `ray start --block` in its own session."""

    def __init__(self, num_nodes: int = 2, cpus_per_node: int = 2):
        self.num_nodes, self.cpus = num_nodes, cpus_per_node
        # Short paths: Ray's AF_UNIX socket names live under the temp dir (108-byte limit).
        self.root = tempfile.mkdtemp(prefix="mn-", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # A throwaway cluster bound to 127.0.0.1: no token authentication for it or its clients.
        self.env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
        # This interpreter's bin first: `ray`, and the job's `python`, come from the same (virtual) env.
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")
        self.procs: List[subprocess.Popen] = []
        self.dashboard = self.gcs = ""

    def _start_node(self, i: int, extra: List[str], name: str = "") -> subprocess.Popen:
        ports = dict(zip(NODE_PORTS, _rjs.free_ports(len(NODE_PORTS))))
        workers = _rjs.free_ports(1)[0]
        temp = os.path.join(self.root, name or f"n{i}")
        os.makedirs(temp)
        cmd = ["ray", "start", "--block", f"--num-cpus={self.cpus}", "--num-gpus=0",
               f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--object-store-memory=200000000",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + 100}",
               *[f"{k}={v}" for k, v in ports.items()], *extra]
        out = open(os.path.join(self.root, f"{name or f'node{i}'}.log"), "w")
        proc = subprocess.Popen(cmd, env=self.node_env, cwd=REPO, start_new_session=True, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def _start_head(self, timeout_s: float, attempt: int) -> None:
        head_ports = dict(zip(HEAD_PORTS, _rjs.free_ports(len(HEAD_PORTS))))
        self.gcs = f"127.0.0.1:{head_ports['--port']}"
        # Every process of the cluster (Ray Train's placement-group cleaner among them) finds it
        # through RAY_ADDRESS; on a machine with several Ray instances, address auto-detection fails.
        self.node_env = {**self.env, "RAY_ADDRESS": self.gcs}
        self.dashboard = f"http://127.0.0.1:{head_ports['--dashboard-port']}"
        head = self._start_node(0, ["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                    *[f"{k}={v}" for k, v in head_ports.items()]], name=f"h{attempt}")
        _rjs._wait_http(f"{self.dashboard}/api/version", timeout_s, head)

    def start(self, timeout_s: float = 180) -> "LocalCluster":
        # Ports are picked free and bound later by Ray: another process (a test's own Serve proxy,
        # Ray workers of the previous test) can take one in between. Then `ray start` exits 1 and
        # a second set of ports is tried.
        for attempt in range(3):
            try:
                self._start_head(timeout_s, attempt)
                break
            except RuntimeError as exc:
                log_path = os.path.join(self.root, f"h{attempt}.log")
                tail = open(log_path).read()[-2000:] if os.path.exists(log_path) else ""
                if attempt == 2:
                    raise RuntimeError(f"{exc}; head log:\n{tail}") from exc
                self.stop()
                self.procs.clear()
        for i in range(1, self.num_nodes):
            self._start_node(i, [f"--address={self.gcs}"])
        deadline = time.time() + timeout_s
        while len(self.alive_nodes()) < self.num_nodes:
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"cluster did not reach {self.num_nodes} nodes (exited: {dead}); "
                                   f"logs in {self.root}")
            time.sleep(1)
        return self

    def alive_nodes(self) -> Dict[str, Dict]:
        """node id → record of the cluster's ALIVE nodes, from the dashboard's state API."""
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=100", timeout=10) as r:
                rows = json.load(r)["data"]["result"]["result"]
        except OSError:
            return {}
        return {n["node_id"]: n for n in rows if n["state"] == "ALIVE"}

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every process these `ray start` commands spawned — nothing else.

        The job driver runs in a session of its own (Ray's job supervisor), so process groups are
        not enough: the whole descendant tree is collected first, while parent links still exist.
        """
        procs = []
        for p in reversed(self.procs):  # worker nodes first, the head (GCS) last
            try:
                root = psutil.Process(p.pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:  # `ray start --block` and the GCS can ignore SIGTERM for a long while
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for p in self.procs:
            p.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    cluster = LocalCluster(num_nodes=2, cpus_per_node=4)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _corpus(d: pathlib.Path) -> str:
    """Small AgentInstruct + ShareGPT jsonl files (the generated stand-ins the training tests use)."""
    from pipelines.synthetic import agentinstruct_records, sharegpt_records, write_jsonl

    write_jsonl(str(d / "os.jsonl"), agentinstruct_records(20, seed=1, task="os", scale=0.1))
    write_jsonl(str(d / "sharegpt.jsonl"), sharegpt_records(80, seed=2, scale=0.1))
    return (f"data.sources=[{{name: os, group: agent, format: agentinstruct, path: {d}/os.jsonl}},"
            f"{{name: sharegpt, group: general, format: sharegpt, path: {d}/sharegpt.jsonl}}]")


def _train_cmd(model_dir, data_dir, out) -> List[str]:
    # 1 CPU per worker on 4-CPU nodes leaves room for the Ray Data read tasks beside each worker;
    # STRICT_SPREAD is what puts the two workers on different nodes (PACK would co-locate them).
    return ["python", "-m", "pipelines.train", "configs/train_tiny_cpu.yaml", f"model.name_or_path={model_dir}",
            "model.tiny.enabled=false", f"train.data_dir={data_dir}", f"train.output_dir={out}", "train.max_steps=2",
            "train.save_every=2", "train.warmup_steps=0", "train.log_every=1", "wandb.mode=disabled",
            "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD", "scaling.resources_per_worker={CPU: 1}"]


def _submit(cluster: LocalCluster, *steps: List[str]) -> float:
    """`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- bash -c 'A && B'`; seconds."""
    # `ray job submit` shell-quotes each entrypoint argument: several steps go through one `bash -c`.
    entrypoint = ["bash", "-c", " && ".join(shlex.join(s) for s in steps)]
    t0 = time.perf_counter()
    proc = subprocess.run(["ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
                           "--runtime-env", "cluster/runtime_env.yaml", "--", *entrypoint],
                          cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return time.perf_counter() - t0


def _check_spread(cluster: LocalCluster, run: pathlib.Path) -> None:
    """The workers' own reports (workers.json) name two different nodes: exactly the cluster's two."""
    placement = json.loads((run / "workers.json").read_text())
    workers = sorted(placement["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1] and placement["world_size"] == 2
    nodes = set(cluster.alive_nodes())
    assert len(nodes) == 2 and {w["node_id"] for w in workers} == nodes, (workers, nodes)
    assert (run / "checkpoint_000002" / "model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.timeout(900)
def test_training_workers_land_on_both_nodes(two_nodes, tiny_model_dir, tmp_path):
    """The training job alone, over packed rows in the data job's output format (written in-process)."""
    from agenttuning.chat import load_tokenizer, tokenizer_fingerprint

    sys.path.insert(0, str(REPO / "tests" / "pipelines"))
    from train_data import write_packed_data

    tok = load_tokenizer(str(tiny_model_dir))
    data_dir = write_packed_data(str(tmp_path / "data"), tok, tokenizer_fingerprint(tok), num_rows=16, max_seq_len=64)
    took = _submit(two_nodes, _train_cmd(tiny_model_dir, data_dir, tmp_path / "train"))
    log.info("training job on two nodes: %.0fs", took)
    _check_spread(two_nodes, tmp_path / "train" / "tiny-cpu")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_data_then_training_job_on_two_nodes(two_nodes, tiny_model_dir, tmp_path):
    """One submitted job runs the real data job (configs/data_agentlm.yaml, local files) then training."""
    data_dir = tmp_path / "data"
    data_cmd = ["python", "-m", "pipelines.data", "configs/data_agentlm.yaml", f"model.name_or_path={tiny_model_dir}",
                "model.tiny.enabled=false", f"data.output_dir={data_dir}", "data.max_seq_len=256",
                "data.num_samples=100", "data.decontamination.enabled=false", _corpus(tmp_path)]
    took = _submit(two_nodes, data_cmd, _train_cmd(tiny_model_dir, data_dir, tmp_path / "train"))
    log.info("data + training job on two nodes: %.0fs", took)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["eta_target"] == 0.2 and manifest["num_rows"] >= 4
    _check_spread(two_nodes, tmp_path / "train" / "tiny-cpu")


def _kill_node(cluster: LocalCluster, i: int) -> None:
    """SIGKILL node i's whole process tree (raylet, workers): the node is gone, as a lost VM."""
    root = psutil.Process(cluster.procs[i].pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _steps(path: pathlib.Path) -> Dict[int, List[int]]:
    """step -> rows of the step's last record (a replayed step overwrites the one lost with the node)."""
    out: Dict[int, List[int]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["rows"]
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_second_node_lost_mid_training_resumes_with_the_same_data_order(tiny_model_dir, tmp_path):
    """Kill the second node after a checkpoint: Ray Train restarts the workers on the node that is
    left, from the newest complete checkpoint, and every step sees the rows of an uninterrupted run."""
    from agenttuning.chat import load_tokenizer, tokenizer_fingerprint

    sys.path.insert(0, str(REPO / "tests" / "pipelines"))
    from train_data import write_packed_data

    tok = load_tokenizer(str(tiny_model_dir))
    data_dir = write_packed_data(str(tmp_path / "data"), tok, tokenizer_fingerprint(tok), num_rows=32, max_seq_len=64)
    common = ["train.max_steps=8", "train.save_every=2", "train.record_samples=true", "train.max_failures=-1",
              "scaling.placement_strategy=SPREAD"]

    def cmd(out):
        return [a for a in _train_cmd(tiny_model_dir, data_dir, out) if not a.startswith(
            ("train.max_steps=", "train.save_every=", "scaling.placement_strategy="))] + common

    cluster = LocalCluster(num_nodes=2, cpus_per_node=4).start()
    try:
        _submit(cluster, cmd(tmp_path / "reference"))
        reference = _steps(tmp_path / "reference" / "tiny-cpu" / "samples.jsonl")
        run = tmp_path / "killed" / "tiny-cpu"
        entry = ["bash", "-c", shlex.join(cmd(tmp_path / "killed"))]
        job = subprocess.Popen(["ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
                                "--runtime-env", "cluster/runtime_env.yaml", "--", *entry],
                               cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 900
        while time.time() < deadline and not (run / "checkpoint_000004" / "trainer_state.json").exists():
            time.sleep(1)
        _kill_node(cluster, 1)
        out, _ = job.communicate(timeout=1200)
        assert job.returncode == 0, out[-4000:]
        assert (run / "checkpoint_000008" / "model.safetensors").is_file()
        assert _steps(run / "samples.jsonl") == reference  # steps 1..8, each with the same rows
        assert json.loads((run / "workers.json").read_text())["start_step"] >= 4  # resumed, not restarted
    finally:
        cluster.stop()
