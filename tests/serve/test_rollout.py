"""Rollout deployment: episodes env ↔ policy (expert, our model deployment, an OpenAI endpoint)."""

import pytest

from serve.rollout import ContextLimit, fit_context, to_agentinstruct


def _conv(n_pairs: int, size: int = 40):
    head = [{"role": "user", "content": "instruction " * 10}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "task"}]
    tail = []
    for i in range(n_pairs):
        tail += [{"role": "assistant", "content": f"action {i} " + "x" * size},
                 {"role": "user", "content": f"observation {i} " + "y" * size}]
    return head + tail


def _count(msgs):
    return sum(len(m["content"]) for m in msgs)


def test_fit_context_keeps_opening_and_newest_turns():
    msgs = _conv(6)
    assert fit_context(msgs, 3, None, _count) == msgs
    assert fit_context(msgs, 3, _count(msgs), _count) == msgs
    limit = _count(msgs) - 150
    out = fit_context(msgs, 3, limit, _count)
    assert _count(out) <= limit
    assert out[:2] == msgs[:2] and out[2]["content"].startswith("task") and "messages are omitted" in out[2]["content"]
    assert out[-1] == msgs[-1] and out[3]["role"] == "assistant"  # alternation kept
    dropped = len(msgs) - len(out)
    assert dropped % 2 == 0 and f"[NOTICE] {dropped} messages are omitted" in out[2]["content"]
    with pytest.raises(ContextLimit):
        fit_context(msgs, 3, 50, _count)


def test_agentinstruct_marks_fewshot_answers_without_loss():
    conv = to_agentinstruct(_conv(1), n_open=3)
    assert [c["from"] for c in conv] == ["human", "gpt", "human", "gpt", "human"]
    assert [c["loss"] for c in conv if c["from"] == "gpt"] == [False, True]


@pytest.fixture(scope="module")
def local_endpoint(tiny_model_dir):
    """A plain (non-Ray) OpenAI-compatible server on 127.0.0.1: the 'any endpoint' case."""
    from serve.llm import HFBackend
    from serve.openai_api import build_openai_app, run_local_server

    backend = HFBackend(str(tiny_model_dir), model_id="remote-tiny", torch_threads=1)
    with run_local_server(build_openai_app(backend)) as url:
        yield url
    backend.engine.close()


@pytest.fixture(scope="module")
def db_env(bench_data):
    from serve.envs import load

    env = load("db", str(bench_data / "agentbench/dbbench_dev.jsonl"), max_turns=3)
    yield env
    env.shutdown()


def _play(env, task_id, policy_cfg):
    import asyncio

    from agenttuning.schema import PolicyConfig
    from serve.rollout import PolicySpec, make_policy, play

    return asyncio.run(play(env.spawn(), task_id, make_policy(PolicySpec(PolicyConfig(**policy_cfg)))))


def test_expert_and_endpoint_episodes(db_env, local_endpoint, tiny_model_dir):
    """The episode loop of the rollout deployment (its Serve side runs in test_evaluate)."""
    ids = db_env.tasks()
    ep = _play(db_env, ids[0], {"kind": "expert"})
    assert ep["reward"] == 1.0 and ep["status"] == "completed"
    assert ep["conversations"][-2]["from"] == "gpt" and ep["conversations"][-2]["loss"] is True
    remote = {"kind": "openai", "base_url": local_endpoint, "model": "remote-tiny", "max_tokens": 32,
              "api_key_env": "AGENTTUNING_TEST_KEY"}
    ep = _play(db_env, ids[0], remote)
    # An untrained model does not produce "Action: ..." lines: the environment ends it as invalid.
    assert ep["reward"] == 0.0 and ep["status"] == "invalid_format" and ep["turns"] == 1
    assert ep["conversations"][-2]["loss"] is True
    ep = _play(db_env, ids[0], {**remote, "context_limit": 64, "context_policy": "end"})
    assert ep["status"] == "context_limit" and ep["turns"] == 0
    # The opening prompt alone is longer than 600 tokens: truncation cannot help -> context_limit.
    ep = _play(db_env, ids[1], {**remote, "context_limit": 600, "tokenizer": str(tiny_model_dir)})
    assert ep["status"] == "context_limit"
    ep = _play(db_env, ids[1], {**remote, "context_limit": 2000, "tokenizer": str(tiny_model_dir)})
    assert ep["status"] == "invalid_format"
