"""MT-Bench: FastChat's judge-prompt selection and rating parser on the shipped data, and a whole run
with the tiny model answering (served on 127.0.0.1) and a real HTTP judge server grading."""

import threading
from collections import Counter

import pytest

from agenttuning.paths import data_file
from pipelines import mtbench
from pipelines.general_client import Endpoint
from pipelines.scorers import RecordError


@pytest.fixture(scope="module")
def data():
    return (mtbench.load_questions(data_file("mt_bench/question.jsonl")), mtbench.load_judge_prompts(),
            mtbench.load_references())


def test_shipped_questions_and_references(data):
    questions, prompts, refs = data
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    cats = Counter(q["category"] for q in questions)
    assert cats == {c: 10 for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                                    "humanities")}
    # Every question of a reference category has a two-turn GPT-4 reference; 30 in all.
    need = [q["question_id"] for q in questions if q["category"] in mtbench.NEED_REF_CATS]
    assert len(need) == 30 and all(len(refs[i]) == 2 for i in need)


@pytest.mark.parametrize("judgment,rating", [
    ("The answer is helpful and accurate.\n\nRating: [[8]]", 8.0),
    ("[[7.5]]", 7.5),
    ("Overall a fair answer, rating [8]", 8.0),  # the backup pattern
    ("Rating: [[3]] ... on reflection [[9]]", 3.0),  # the first match
    ("Rating: [[10]]", 10.0),
    ("Rating: [[8/10]]", -1.0),  # neither pattern: FastChat gives -1
    ("I cannot evaluate this response.", -1.0),
    ("", -1.0),
])
def test_rating_parser(judgment, rating):
    assert mtbench.parse_rating(judgment) == rating


def test_judge_prompt_selection(data):
    questions, prompts, refs = data
    by_id = {q["question_id"]: q for q in questions}
    writing, math = by_id[81], next(q for q in questions if q["category"] == "math")
    # General question, turn 1: single-v1 with its system prompt, the question and the answer.
    jm = mtbench.judge_messages(writing, ["ANSWER-ONE", "ANSWER-TWO"], 1, prompts, refs)
    assert jm["template"] == "single-v1" and jm["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    user = jm["messages"][1]["content"]
    assert user.startswith("[Instruction]\nPlease act as an impartial judge") and writing["turns"][0] in user
    assert "ANSWER-ONE" in user and "ANSWER-TWO" not in user and writing["turns"][1] not in user
    # Turn 2: the multi-turn prompt shows the whole conversation; its instruction is the system prompt.
    jm = mtbench.judge_messages(writing, ["ANSWER-ONE", "ANSWER-TWO"], 2, prompts, refs)
    assert jm["template"] == "single-v1-multi-turn" and "second user question" in jm["messages"][0]["content"]
    user = jm["messages"][1]["content"]
    assert all(s in user for s in (*writing["turns"], "ANSWER-ONE", "ANSWER-TWO"))
    assert user.index("ANSWER-ONE") < user.index(writing["turns"][1]) < user.index("ANSWER-TWO")
    # Math: the reference answers come in (turn 1: the first; turn 2: both).
    ref = refs[math["question_id"]]
    jm1 = mtbench.judge_messages(math, ["a1", "a2"], 1, prompts, refs)
    jm2 = mtbench.judge_messages(math, ["a1", "a2"], 2, prompts, refs)
    assert jm1["template"] == "single-math-v1" and ref[0] in jm1["messages"][1]["content"]
    assert ref[1] not in jm1["messages"][1]["content"]
    assert jm2["template"] == "single-math-v1-multi-turn"
    assert ref[0] in jm2["messages"][1]["content"] and ref[1] in jm2["messages"][1]["content"]
    with pytest.raises(RecordError, match="no reference answer"):
        mtbench.judge_messages(math, ["a1", "a2"], 1, prompts, {})


def _judge_app(log):
    """A real OpenAI-compatible HTTP server that answers like a judge: turn-1 prompts get
    'Rating: [[8]]', turn-2 prompts '[[6.5]]' and a question about Hawaii an unparseable verdict."""
    from fastapi import FastAPI

    app = FastAPI()
    lock = threading.Lock()

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        user = body["messages"][-1]["content"]
        with lock:
            log.append(body)
        if "Hawaii" in user:
            text = "The assistant tried. I will not give a number."
        elif "<|The Start of Assistant A's Conversation with User|>" in user:
            text = "The second answer follows the instruction.\n\n[[6.5]]"
        else:
            text = "The answer is relevant.\n\nRating: [[8]]"
        return {"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


def test_whole_run_with_served_model_and_http_judge(data, tiny_model_dir):
    from serve.llm import HFBackend
    from serve.openai_api import build_openai_app, run_local_server

    questions, prompts, refs = data
    # The first question of four categories (greedy, 0.1 and 0.7 answers), Hawaii (81) among them.
    picked = [next(q for q in questions if q["category"] == c) for c in ("writing", "math", "coding", "stem")]
    assert picked[0]["question_id"] == 81
    backend = HFBackend(str(tiny_model_dir), model_id="tiny", max_batch_size=8, torch_threads=1)
    judged = []
    try:
        with run_local_server(build_openai_app(backend)) as policy_url, run_local_server(_judge_app(judged)) as judge_url:
            policy, judge = Endpoint(policy_url, "tiny"), Endpoint(judge_url, "gpt-4")
            seen = []

            def chat(messages, temperature, seed):
                seen.append((len(messages), temperature))
                return policy.chat(messages, 4, temperature=temperature, seed=seed)

            res = mtbench.score_mtbench(picked, chat, lambda m: judge.chat(m, 2048), prompts, refs, concurrency=8)
    finally:
        backend.engine.close()
    # Two turns each, the second after the model's own first answer; FastChat's temperatures.
    assert sorted(n for n, _ in seen) == [1] * 4 + [3] * 4
    assert sorted({t for _, t in seen}) == [0.0, 0.1, 0.7]
    # 8 judgments: Hawaii's two are unparseable (-1) and left out of the means, as show_result does.
    assert len(judged) == 8 and res["n"] == 4 and res["failed_judgments"] == 2
    assert res["turn1"] == 8.0 and res["turn2"] == 6.5 and res["score"] == pytest.approx((3 * 8 + 3 * 6.5) / 6)
    rows = {(p["question_id"], p["turn"]): p for p in res["predictions"]}
    assert rows[(81, 1)]["rating"] == -1 and rows[(81, 1)]["judge_prompt"] == "single-v1"
    math = next(q for q in picked if q["category"] == "math")
    assert rows[(math["question_id"], 2)]["judge_prompt"] == "single-math-v1-multi-turn"
    # The judge saw the policy's real answers, and the reference for math; greedy, 2048 tokens.
    first = [b for b in judged if math["turns"][0] in b["messages"][-1]["content"]]
    assert first and all(refs[math["question_id"]][0] in b["messages"][-1]["content"] for b in first)
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 2048 for b in judged)
    for q in picked:
        user = next(b["messages"][-1]["content"] for b in judged if q["turns"][0] in b["messages"][-1]["content"]
                    and "[The Start of Assistant's Answer]" in b["messages"][-1]["content"])  # turn 1's
        assert f"[The Start of Assistant's Answer]\n{rows[(q['question_id'], 1)]['answer']}\n" in user


def test_judge_failure_is_minus_one(data):
    questions, prompts, refs = data

    def judge(messages):
        raise ConnectionError("judge unreachable")

    res = mtbench.score_mtbench(questions[:1], lambda m, t, s: "an answer", judge, prompts, refs)
    assert res["failed_judgments"] == 2 and res["n"] == 0 and "judge reachable" in res["not_applicable"]
    assert all(p["rating"] == -1 and p["judgment"].startswith("$ERROR$") for p in res["predictions"])
