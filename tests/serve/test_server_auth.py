"""API keys on Ray Serve: the environment server and the model server built from config
(``serve.api_key_file`` / ``serve.api_key_env``), reached over HTTP through Serve's proxy under a
route prefix. 401 without or with a wrong key, 200 with it; /health stays open."""

import socket

import pytest
import requests

from agenttuning.config import load_config, to_object
from agenttuning.schema import EnvsConfig, EnvServerSection, EnvSpec, ServeConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(ray_local, tmp_path_factory):
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_env_server_requires_the_key(base, bench_data, tmp_path):
    from ray import serve

    from serve.env_server import build_env_app

    secret = tmp_path / "key"  # a mounted secret: read by the replica, never part of the config
    secret.write_text("env-key-123\n")
    envs = EnvsConfig(server=EnvServerSection(num_cpus=0),
                      tasks={"db": EnvSpec(path=str(bench_data / "agentbench/dbbench_dev.jsonl"),
                                           options={"backend": "sqlite"})})
    serve.run(build_env_app(envs, ServeConfig(api_key_file=str(secret))), name="envs_auth", route_prefix="/secured")
    try:
        url = f"{base}/secured"
        r = requests.get(f"{url}/envs", timeout=30)
        assert r.status_code == 401 and r.json() == {"error": {"reason": "missing API key: send the header "
                                                               "'Authorization: Bearer <key>'", "status": 401}}
        r = requests.post(f"{url}/envs/db/sessions", json={"task_id": "0"},
                          headers={"Authorization": "Bearer env-key-12"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["reason"] == "invalid API key"
        assert requests.get(f"{url}/health", timeout=30).json()["status"] == "ok"  # open for probes
        auth = {"Authorization": "Bearer env-key-123"}
        assert requests.get(f"{url}/envs", headers=auth, timeout=30).json()["envs"][0]["tasks"] == 60
        r = requests.post(f"{url}/envs/db/sessions", json={"task_id": "0"}, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        sid = r.json()["session_id"]
        assert requests.delete(f"{url}/sessions/{sid}", timeout=30).status_code == 401
        assert requests.delete(f"{url}/sessions/{sid}", headers=auth, timeout=30).json()["closed"]
    finally:
        serve.delete("envs_auth")


# A model replica on Serve (loads torch and the model: ~35 s on the loaded 2-core machine); the
# same HTTP app with a key is tested fast in test_openai_api.py::test_api_key.
@pytest.mark.slow
def test_model_server_from_config_requires_the_key(base, tiny_model_dir):
    """`serve.api_key_env`: the replica reads the variable (on a cluster every node that hosts a
    replica needs it)."""
    import openai
    from ray import serve

    from serve.llm import LLMServer

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "serve.api_key_env=AGENTTUNING_TEST_SERVE_KEY",
                             "serve.torch_threads=1", "serve.model_id=tiny"])
    # The replica reads the variable where it runs; a local Ray started before this test does not
    # see variables set now, so the app's runtime environment carries it (a cluster: the pods' env).
    env = {"env_vars": {"AGENTTUNING_TEST_SERVE_KEY": "model-key-456"}}
    app = LLMServer.options(ray_actor_options={"num_cpus": 0, "runtime_env": env}).bind(
        to_object(cfg.serve), to_object(cfg.model))
    serve.run(app, name="llm_auth", route_prefix="/llm-secured")
    try:
        url = f"{base}/llm-secured/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
        assert requests.post(f"{url}/chat/completions", json={}, timeout=30).status_code == 401
        assert requests.get(f"{base}/llm-secured/health", timeout=30).status_code == 200
        client = openai.OpenAI(base_url=url, api_key="model-key-456", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens >= 1
    finally:
        serve.delete("llm_auth")
