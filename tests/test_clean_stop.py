"""Clean stops on a shared cluster: `ray job stop` / Kubernetes send SIGTERM, Ctrl-C sends SIGINT.

A job stopped either way deletes exactly the Serve apps it created (another user's app on the same
cluster stays), exits 128+signal with one line saying so, and prints no stack dump.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import requests

sys.path.insert(0, os.path.dirname(__file__))
from test_multinode import LocalCluster  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(num_nodes=1, cpus_per_node=4)
    try:
        yield c.start()
    finally:
        c.stop()


def _on_cluster(cluster, code: str) -> str:
    """Run a small driver script against the cluster; returns its stdout."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=cluster.node_env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def port():
    """The cluster's one Serve HTTP port (Serve keeps the port it first started with)."""
    from serve.openai_api import free_port

    return free_port()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopped_job_deletes_only_its_own_apps(cluster, port, sig):
    # Another user's app, on the same cluster and Serve proxy, deployed before our job starts.
    _on_cluster(cluster, f"""
        import ray
        from ray import serve
        ray.init()
        serve.start(http_options={{"host": "127.0.0.1", "port": {port}}})

        @serve.deployment(ray_actor_options={{"num_cpus": 0}})
        class Other:
            def __call__(self, request):
                return "still here"

        serve.run(Other.bind(), name="other-user", route_prefix="/other")
    """)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "envs", "configs/envs.yaml", f"serve.port={port}",
         "envs.tasks={db: {options: {backend: sqlite}}}", "envs.server.num_cpus=0"],
        env={**cluster.node_env, "AGENTTUNING_PROGRESS": "0"}, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/envs", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("the environment server did not come up")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + int(sig), (proc.returncode, err[-3000:])
    assert f"stopped by {sig.name}" in err and "Traceback" not in err, err[-3000:]
    apps = _on_cluster(cluster, "import ray; from ray import serve; ray.init(); print(sorted(serve.status().applications))")
    assert "other-user" in apps and "'envs'" not in apps, apps
    assert requests.get(f"http://127.0.0.1:{port}/other", timeout=30).text == "still here"
