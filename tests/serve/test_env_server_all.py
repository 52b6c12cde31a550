"""The environment server lists and serves all twelve agent tasks of the paper: one scripted-expert
episode of each through the HTTP API (real backends: MariaDB/SQLite, bubblewrap, TextWorld, a
pyoxigraph SPARQL store, the WebShop catalogue code, a JVM, headless Chromium, a local web shop)."""

import pathlib
import shutil
import sys
import tempfile

import pytest
import requests

from serve.envs import ENVIRONMENTS

ENV_TESTS = pathlib.Path(__file__).parent / "envs"
sys.path.insert(0, str(ENV_TESTS))
import kg_testgraph  # noqa: E402
import kg_testonto  # noqa: E402
import webshop_testshop  # noqa: E402

pytestmark = pytest.mark.skipif(not (shutil.which("bwrap") and shutil.which("chromium") and shutil.which("java")),
                                reason="needs bubblewrap, chromium and java (scripts/install.sh)")

# served name -> (task id, minimum expert reward). DCG's expert wins ~98% of games, not all.
EPISODES = {
    "os": ("0", 1.0), "db": ("0", 1.0), "kg": ("0", 1.0),
    "alfworld": ("pick_and_place_simple-SoapBottle-None-Toilet-424/trial_T20190907_004404_604165", 1.0),
    "webshop": ("0", 1.0), "mind2web": ("a1f3c2d0-5b7e-4c61-9f0a-2e8d4b6c1a01", 1.0),
    "sciworld": ("lifespan-longest-lived/", 1.0), "miniwob": ("click-button/0", 1.0), "webarena": ("0", 1.0),
    "hotpotqa": ("5a832c3455429954d2e2ec41", 1.0), "rewoo": ("hotpot_qa/5a77bd595542995d83181291", 1.0),
    "dcg": ("dev-baseline1-agent0-000", 0.0),
}


@pytest.fixture(scope="module")
def web_shop():
    import importlib.util

    spec = importlib.util.spec_from_file_location("webarena_site", ENV_TESTS / "webarena_site" / "shop.py")
    site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(site)
    server, base = site.serve()
    yield base
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(ray_local, web_shop):
    from ray import serve

    from serve.env_server import EnvServer
    from serve.openai_api import free_port

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="envs-all-"))
    records = kg_testgraph.load_records()
    graph = kg_testgraph.build(records, kg_testonto.derive_ontology(records))
    kg_file = graph.write_nt(tmp / "freebase_excerpt.nt")
    site = ENV_TESTS / "webarena_site"
    specs = {
        "os": {"options": {"command_timeout": 30}},
        "db": {"options": {"backend": "sqlite"}},
        "kg": {"path": str(ENV_TESTS.parents[2] / "data" / "agentbench" / "kg" / "dev.json"),
               "options": {"graph_file": str(kg_file), "ontology": "store"}},
        "alfworld": {"options": {"max_engines": 1}},
        "webshop": {"path": str(webshop_testshop.write(tmp / "webshop")), "options": {"noun_tagger": "content_words"}},
        "mind2web": {"path": str(ENV_TESTS / "mind2web_data")},
        "sciworld": {"env": "scienceworld", "options": {"split": "test", "max_variations": 1, "max_jvms": 1}},
        "miniwob": {"options": {"episodes_per_task": 1, "max_browsers": 1}},
        "webarena": {"path": str(site / "tasks.json"),
                     "options": {"sites": {"shopping": web_shop}, "auth_dir": str(site / "auth"),
                                 "gold_actions": str(site / "gold_actions.json"), "max_browsers": 1,
                                 "settle_s": 0, "html_wait_s": 0}},
        "hotpotqa": {}, "rewoo": {}, "dcg": {"options": {"split": "dev"}},
    }
    serve.shutdown()  # a Serve instance keeps its first HTTP port: start one on a free port
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = EnvServer.options(ray_actor_options={"num_cpus": 0}).bind(specs, 16, 600.0)
    serve.run(app, name="envs_all", route_prefix="/all")
    yield f"http://127.0.0.1:{port}/all"
    serve.delete("envs_all")
    serve.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _task_id(name: str, prefix: str) -> str:
    """The configured id, or (ids that depend on the shuffled split, e.g. ScienceWorld) the first
    runnable id with that prefix."""
    if not prefix.endswith("/"):
        return prefix
    import serve.envs

    env = serve.envs.load("scienceworld", split="test", max_variations=1)
    return next(t for t in env.tasks() if t.startswith(prefix))


def test_all_twelve_listed_and_one_expert_episode_each_over_http(server):
    listing = requests.get(f"{server}/envs", timeout=120).json()
    served = {e["name"]: e for e in listing["envs"]}
    assert set(served) == set(EPISODES), {n: e.get("error") for n, e in served.items()}
    assert all("error" not in e and e["tasks"] > 0 for e in served.values()), served
    assert {e["env"] for e in served.values()} == set(ENVIRONMENTS)
    results = {}
    for name, (tid, min_reward) in EPISODES.items():
        tid = _task_id(name, tid)
        r = requests.post(f"{server}/envs/{name}/sessions", json={"task_id": tid}, timeout=300)
        assert r.status_code == 200, (name, r.text[:500])
        sid = r.json()["session_id"]
        out = {"done": False}
        for _ in range(400):
            action = requests.get(f"{server}/sessions/{sid}/expert", timeout=120).json()["action"]
            out = requests.post(f"{server}/sessions/{sid}/step", json={"action": action}, timeout=300).json()
            if out["done"]:
                break
        requests.delete(f"{server}/sessions/{sid}", timeout=60)
        results[name] = (out.get("status"), out.get("reward"))
        assert out["done"] and out["status"] == "completed" and out["reward"] >= min_reward, (name, out)
    assert len(results) == 12
