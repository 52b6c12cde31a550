"""HotpotQA environment on the real 100-question held-out file: expert EM, scoring, bad input."""

import json

import pytest

import serve.envs
from serve.envs.base import Status, run_episode
from serve.envs.hotpotqa import exact_match, f1_score, normalize_answer


@pytest.fixture(scope="module")
def env(bench_data):
    return serve.envs.load("hotpotqa", str(bench_data / "hotpotqa" / "hotpotqa_easy.jsonl"))


def test_normalisation_and_f1_hand_cases():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    # precision 1/1, recall 1/2 -> F1 = 2/3
    assert f1_score("Eiffel", "Eiffel Tower") == pytest.approx(2 / 3)
    # articles dropped first: 5 predicted tokens, 2 gold; precision 2/5, recall 1 -> F1 = 4/7
    assert f1_score("a tall Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(4 / 7)
    assert f1_score("yes it is", "yes") == 0.0  # yes/no are atomic
    assert f1_score("no", "no") == 1.0
    assert f1_score("Paris", "London") == 0.0
    # repeated tokens count with multiplicity (Counter intersection)
    assert f1_score("new new york", "new york") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


def test_expert_scores_em_1_on_all_100(env):
    ids = env.tasks()
    assert len(ids) == 100
    for tid in ids:
        ep = run_episode(env, tid)
        assert ep.status == Status.COMPLETED, tid
        assert ep.info["em"] == 1.0 and ep.reward == 1.0, tid
        # the expert searched every supporting-fact title and found the page each time
        titles = {t for t, _ in env.task(tid).data["supporting_facts"]}
        opening = len(ep.messages) - 2 * ep.turns
        played = [m["content"] for m in ep.messages[opening:] if m["role"] == "assistant"]
        assert {a.split("Search[")[1].rstrip("]") for a in played if "Search[" in a} == titles
        assert not any(o["content"].startswith("Could not find") for o in ep.messages[opening:])
    assert ep.messages[1].get("loss") is False  # demonstration turns carry no loss


def test_wrong_answer_scores_zero_and_search_lookup(env):
    tid = env.tasks()[0]
    rec = env.task(tid).data
    env.reset(tid)
    title = rec["supporting_facts"][0][0]
    obs = env.step(f"Thought: x\nAction: Search[{title}]").observation
    assert obs.startswith(dict(rec["context"])[title][0].strip()[:30])
    miss = env.step("Action: Search[Nonexistent page qq]").observation
    assert miss.startswith("Could not find") and "Similar:" in miss
    first_word = dict(rec["context"])[title][0].split()[0]
    look = env.step(f"Action: Lookup[{first_word}]").observation
    assert look.startswith("(Result 1 /")
    res = env.step("Thought: guess\nAction: Finish[definitely not the answer xyz]")
    assert res.done and res.status == Status.COMPLETED
    assert res.reward == 0.0 and res.info["em"] == 0.0


def test_invalid_actions(env, tmp_path):
    tid = env.tasks()[1]
    env.reset(tid)
    res = env.step("I think the answer is obvious.")
    assert not res.done and res.info["invalid"] == "invalid_format"
    assert "Search[" in res.observation
    res = env.step("Action: Fly[to the moon]")
    assert not res.done and res.info["invalid"] == "invalid_action"
    strict = serve.envs.load("hotpotqa", env.path, max_invalid=0)
    strict.reset(tid)
    res = strict.step("no action here")
    assert res.done and res.status == Status.INVALID_FORMAT and res.reward == 0.0


def test_bad_records_are_skipped_with_reason(tmp_path, bench_data):
    good = (bench_data / "hotpotqa" / "hotpotqa_easy.jsonl").read_text().splitlines()[0]
    f = tmp_path / "q.jsonl"
    f.write_text(good + "\n" + json.dumps({"id": "bad1", "question": "q?"}) + "\n")
    env = serve.envs.load("hotpotqa", str(f))
    assert len(env.tasks()) == 1
    assert "answer" in env.skipped["bad1"] and "context" in env.skipped["bad1"]
    with pytest.raises(serve.envs.UnknownTask, match="skipped"):
        env.reset("bad1")
