"""General tasks of the eval job: each kind loaded from its config and scored for a policy served on
127.0.0.1 (the tiny model through serve.llm's OpenAI server), the MT-Bench judge a real HTTP server."""

import pytest

from agenttuning.config import load_config, to_object
from agenttuning.paths import data_file
from pipelines.general_client import Endpoint
from pipelines.general_eval import load_task, score_task
from pipelines.scorers import RecordError


def _tasks(*tasks):
    cfg = load_config(None, [f"eval.general={list(tasks)}"])
    return to_object(cfg.eval.general)


@pytest.fixture(scope="module")
def general_dir(tmp_path_factory):
    from pipelines.general import build_general

    out = tmp_path_factory.mktemp("general")
    build_general(str(out), load_config(None, ["general.mmlu_train=0", "general.gsm_train=0", "general.mmlu_eval=6",
                                               "general.gsm_eval=2", "general.humaneval_eval=2"]).general)
    return out


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from agenttuning.chat import load_tokenizer
    from serve.llm import HFBackend
    from serve.openai_api import build_openai_app, run_local_server

    backend = HFBackend(str(tiny_model_dir), model_id="tiny", max_batch_size=8, torch_threads=1)
    try:
        with run_local_server(build_openai_app(backend)) as url:
            yield Endpoint(url, "tiny"), load_tokenizer(str(tiny_model_dir))
    finally:
        backend.engine.close()


def _judge_server():
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        text = "Helpful enough. Rating: [[7]]"
        return {"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    return app


def test_load_task_resolves_shots_and_defaults(general_dir, tmp_path):
    mmlu = str(general_dir / "mmlu_eval.jsonl")
    mc, math, mt = _tasks({"name": "mmlu", "kind": "mc", "path": mmlu, "limit": 4},
                          {"name": "gsm8k", "kind": "math", "path": data_file("gsm8k/test.jsonl"), "limit": 3},
                          {"name": "mt", "kind": "mtbench", "path": data_file("mt_bench/question.jsonl"),
                           "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4"}})
    t = load_task(mc, 0)
    assert len(t.records) == 4 and t.shots == 5 and t.dev_source == str(general_dir / "mmlu_dev.jsonl")
    assert len(t.dev) == 57 and all(len(v) == 5 for v in t.dev.values())
    t = load_task(math, 1)
    assert len(t.records) == 3 and t.shots == 8
    t = load_task(mt, 2)
    assert len(t.records) == 80 and "single-math-v1-multi-turn" in t.prompts and len(t.references) == 30
    # MT-Bench is sorted by category: its first 8 questions are all writing; a seeded 8 spans categories.
    mt.limit = 8
    assert {q["category"] for q in load_task(mt, 2).records} == {"writing"}
    seeded = load_task(mt, 2, sample_seed=0).records
    assert len(seeded) == 8 and len({q["category"] for q in seeded}) >= 4
    assert [q["question_id"] for q in seeded] == sorted(q["question_id"] for q in seeded)
    # Elsewhere, without a dev file beside it: the hub (offline in tests) → an error naming the key.
    alone = tmp_path / "mmlu.jsonl"
    alone.write_text((general_dir / "mmlu_eval.jsonl").read_text())
    with pytest.raises(RecordError, match=r"eval.general.0.shots_path.*unreachable"):
        load_task(_tasks({"name": "mmlu", "kind": "mc", "path": str(alone)})[0], 0)
    t = load_task(_tasks({"name": "mmlu", "kind": "mc", "path": str(alone), "few_shot": 2,
                          "shots_path": str(general_dir / "mmlu_dev.jsonl")})[0], 0)
    assert t.shots == 2 and t.dev_source.endswith("mmlu_dev.jsonl")


def test_every_kind_through_the_served_model(general_dir, served):
    from serve.openai_api import run_local_server

    endpoint, tok = served
    policy = load_config(None, []).run.eval_policy  # greedy
    tasks = _tasks({"name": "mmlu", "kind": "mc", "path": str(general_dir / "mmlu_eval.jsonl"), "limit": 2},
                   {"name": "gsm8k", "kind": "math", "path": data_file("gsm8k/test.jsonl"), "limit": 2, "max_tokens": 8},
                   {"name": "humaneval", "kind": "code", "path": str(general_dir / "humaneval_eval.jsonl"),
                    "max_tokens": 8},
                   {"name": "mt", "kind": "mtbench", "path": data_file("mt_bench/question.jsonl"), "limit": 2,
                    "max_tokens": 4, "judge": {"base_url": "http://127.0.0.1:9/v1", "model": "gpt-4"}})
    loaded = [load_task(g, i) for i, g in enumerate(tasks)]
    with run_local_server(_judge_server()) as judge_url:
        judge = Endpoint(judge_url, "gpt-4")
        res = {t.cfg.name: score_task(t, endpoint, policy, lambda: tok, judge, concurrency=4) for t in loaded}
        # An endpoint that only chats (no prompt log-probabilities) cannot score MMLU: said, not hidden.
        chat_only = score_task(loaded[0], Endpoint(judge_url, "gpt-4", max_retries=0), policy, lambda: tok)
    assert res["mmlu"]["n"] == 2 and res["mmlu"]["shots"] == 5 and len(res["mmlu"]["predictions"][0]["logprobs"]) == 4
    assert res["gsm8k"]["n"] == 2 and res["gsm8k"]["shots"] == 8
    assert res["humaneval"]["n"] == 2 and res["humaneval"]["score"] == 0.0  # 8 tokens of a random model
    assert all(p["result"].startswith("failed") for p in res["humaneval"]["predictions"])
    assert res["mt"]["n"] == 2 and res["mt"]["turn1"] == res["mt"]["turn2"] == res["mt"]["score"] == 7.0
    assert "endpoint error" in chat_only["not_applicable"] and "/completions" in chat_only["not_applicable"]
    # MMLU needs the policy's tokenizer: without one it is not applicable, with the reason.
    assert "tokenizer" in score_task(loaded[0], endpoint, policy, lambda: None)["not_applicable"]
