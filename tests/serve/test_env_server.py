"""Environment server on a real local Ray Serve, driven over HTTP (and SessionManager directly)."""

import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serve.env_server import EnvServerError, SessionManager



def _can_sandbox() -> bool:
    """OS sessions join the test only where sandboxes can run (bwrap + user namespaces)."""
    if not shutil.which("bwrap"):
        return False
    from serve.envs.sandbox import Sandbox, SandboxUnavailable

    try:
        Sandbox().close()
    except SandboxUnavailable:
        return False
    return True


HAVE_BWRAP = _can_sandbox()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(bench_data):
    from ray import serve

    from serve.env_server import EnvServer

    envs = {"db": {"path": str(bench_data / "agentbench/dbbench_dev.jsonl")}}
    if HAVE_BWRAP:
        envs["os"] = {"path": str(bench_data / "agentbench/os_dev.json"), "options": {"command_timeout": 30}}
    # Two replicas: every session request must reach the replica holding it (SessionRouter).
    app = EnvServer.options(num_replicas=2, ray_actor_options={"num_cpus": 0}).bind(envs, 64, 600.0)
    serve.run(app, name="envs_test", route_prefix="/")


@pytest.fixture(scope="module")
def server(ray_local, bench_data):
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _deploy(bench_data)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _episode(base: str, env: str, task_id: str) -> dict:
    r = requests.post(f"{base}/envs/{env}/sessions", json={"task_id": task_id}, timeout=60)
    assert r.status_code == 200, (env, task_id, r.text)
    sid = r.json()["session_id"]
    assert r.json()["messages"][-1]["role"] == "user"
    for _ in range(20):
        action = requests.get(f"{base}/sessions/{sid}/expert", timeout=60).json()["action"]
        out = requests.post(f"{base}/sessions/{sid}/step", json={"action": action}, timeout=60)
        assert out.status_code == 200, (env, task_id, out.text)
        out = out.json()
        if out["done"]:
            break
    assert requests.delete(f"{base}/sessions/{sid}", timeout=60).json()["closed"]
    return out


def test_list_envs(server):
    body = requests.get(f"{server}/envs", timeout=30).json()
    envs = {e["name"]: e for e in body["envs"]}
    assert envs["db"]["tasks"] == 60 and envs["db"]["splits"] == {"dev": 60}
    if HAVE_BWRAP:
        # Every dev task runs: the init/check/example scripts its records name ship in data/.
        assert envs["os"]["tasks"] == 26 and envs["os"]["skipped"] == {}


def test_50_concurrent_expert_sessions_over_http(server):
    jobs = [("db", str(i)) for i in range(35)]
    # Not dev 8: AgentBench's own size-match.py cannot parse du's "4.0K" (it fails there too).
    jobs += [("os", t) for t in ["0", "3", "6", "7", "9", "11", "12", "13", "14", "17", "18", "21", "22", "23", "24"]]
    if not HAVE_BWRAP:
        jobs = [("db", str(i)) for i in range(50)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda j: _episode(server, *j), jobs))
    assert len(results) == 50
    bad = [(j, r) for j, r in zip(jobs, results) if r["status"] != "completed" or r["reward"] != 1.0]
    assert not bad
    assert time.monotonic() - t0 < 120
    assert requests.get(f"{server}/envs", timeout=30).json()["sessions"] == 0


def test_http_errors(server):
    def err(resp, code):
        assert resp.status_code == code, resp.text
        return resp.json()["error"]["reason"]

    assert "unknown environment 'nope'" in err(requests.post(f"{server}/envs/nope/sessions", json={"task_id": "0"}), 404)
    assert "no task '999'" in err(requests.post(f"{server}/envs/db/sessions", json={"task_id": "999"}), 404)
    assert "task_id" in err(requests.post(f"{server}/envs/db/sessions", json={"task": "0"}), 400)
    assert "lost with the replica" in err(requests.post(f"{server}/sessions/zzz/step", json={"action": "x"}), 410)
    sid = requests.post(f"{server}/envs/db/sessions", json={"task_id": 0}).json()["session_id"]
    assert "no session" in err(requests.post(f"{server}/sessions/{sid}x/step", json={"action": "x"}), 404)
    assert "action" in err(requests.post(f"{server}/sessions/{sid}/step", json={}), 400)
    r = requests.post(f"{server}/sessions/{sid}/step", json={"action": "no idea"}).json()
    assert r["done"] and r["status"] == "invalid_format"
    assert "no running episode" in err(requests.post(f"{server}/sessions/{sid}/step", json={"action": "x"}), 409)
    requests.delete(f"{server}/sessions/{sid}")
    assert "was closed" in err(requests.delete(f"{server}/sessions/{sid}"), 410)


def test_session_cap_gives_429(server):
    sids, refused = [], None
    try:
        for _ in range(2 * 64 + 1):  # two replicas of 64 each: a 429 must come by then
            r = requests.post(f"{server}/envs/db/sessions", json={"task_id": "1"}, timeout=60)
            if r.status_code == 429:
                refused = r.json()["error"]["reason"]
                assert r.headers["Retry-After"] == "5"  # serve.retry_after_s: clients back off, not spin
                break
            assert r.status_code == 200, r.text
            sids.append(r.json()["session_id"])
        assert refused and "max_sessions=64" in refused
        assert len(sids) >= 64
        assert len({sid.split("-")[0] for sid in sids}) == 2  # both replicas hold sessions
    finally:
        for sid in sids:
            requests.delete(f"{server}/sessions/{sid}", timeout=60)


def test_session_lost_with_its_replica_gets_410(server, bench_data):
    from ray import serve

    sid = requests.post(f"{server}/envs/db/sessions", json={"task_id": "2"}, timeout=60).json()["session_id"]
    serve.delete("envs_test")  # the replica holding the session goes away
    _deploy(bench_data)
    r = requests.post(f"{server}/sessions/{sid}/step", json={"action": "Action: Answer\nFinal Answer: []"}, timeout=60)
    assert r.status_code == 410 and "lost with the replica" in r.json()["error"]["reason"]


def test_manager_idle_timeout_and_lost_replica(bench_data):
    m = SessionManager({"db": {"path": str(bench_data / "agentbench/dbbench_dev.jsonl"),
                               "options": {"backend": "sqlite"}}}, max_sessions=2, idle_timeout_s=0.2)
    a = m.create("db", "0")["session_id"]
    b = m.create("db", "1")["session_id"]
    with pytest.raises(EnvServerError) as exc:
        m.create("db", "2")
    assert exc.value.status == 429
    time.sleep(0.3)
    m.step(b, "Action: Operation\n```sql\nSELECT 1\n```")  # keeps b alive
    assert m.reap_idle() == 1
    with pytest.raises(EnvServerError) as exc:
        m.step(a, "x")
    assert exc.value.status == 410 and "expired after 0.2s" in exc.value.reason
    other = SessionManager({}, 1, 1.0)  # a different replica: its ids are not ours
    with pytest.raises(EnvServerError) as exc:
        m.step(other.tag + "-0123", "x")
    assert exc.value.status == 410 and "lost with the replica" in exc.value.reason
    m.shutdown()


def test_config_file_builds_the_app():
    from agenttuning.config import load_config, to_object
    from serve.env_server import build_env_app

    cfg = load_config("configs/envs.yaml", ["envs.server.max_sessions=5", "envs.tasks.os.enabled=false"])
    assert cfg.envs.tasks.db.options.backend == "auto"
    app = build_env_app(to_object(cfg.envs))
    assert app is not None
