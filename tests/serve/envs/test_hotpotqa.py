"""HotpotQA on the real held-out files (3 levels x 100): BOLAA prompt and actions, EM/F1, levels."""

import json

import pytest

import serve.envs
from serve.envs.base import EnvError, Status, run_episode
from serve.envs.hotpotqa import EXAMPLES, INSTRUCTION, exact_match, f1_score, normalize_answer


@pytest.fixture(scope="module")
def env(bench_data):
    return serve.envs.load("hotpotqa", str(bench_data / "hotpotqa" / "hotpotqa_easy.jsonl"))


@pytest.fixture(scope="module")
def all_levels():
    return serve.envs.load("hotpotqa")  # default: the shipped data/hotpotqa folder, all three levels


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


def test_default_loads_three_levels_as_splits(all_levels, bench_data, tmp_path):
    splits = all_levels.splits()
    assert {k: len(v) for k, v in splits.items()} == {"easy": 100, "medium": 100, "hard": 100}
    assert len(set(all_levels.tasks())) == 300 and not all_levels.skipped
    assert all_levels.tasks("hard")[0] == json.loads(
        (bench_data / "hotpotqa" / "hotpotqa_hard.jsonl").read_text().splitlines()[0])["id"]
    two = serve.envs.load("hotpotqa", levels=["medium", "hard"])
    assert set(two.splits()) == {"medium", "hard"} and len(two.tasks()) == 200
    files = [str(bench_data / "hotpotqa" / f"hotpotqa_{lv}.jsonl") for lv in ("hard", "easy")]
    listed = serve.envs.load("hotpotqa", files)
    assert listed.tasks()[:100] == all_levels.tasks("hard") and len(listed.tasks()) == 200
    with pytest.raises(EnvError, match="unknown levels"):
        serve.envs.load("hotpotqa", levels=["expert"])
    with pytest.raises(EnvError, match="holds no hotpotqa_<level>.jsonl"):
        serve.envs.load("hotpotqa", str(tmp_path))
    # the same id in two level files is an error naming both places
    line = (bench_data / "hotpotqa" / "hotpotqa_easy.jsonl").read_text().splitlines()[0]
    (tmp_path / "easy.jsonl").write_text(line + "\n")
    (tmp_path / "medium.jsonl").write_text(line + "\n")
    with pytest.raises(EnvError, match="appears twice"):
        serve.envs.load("hotpotqa", str(tmp_path))


def test_bolaa_prompt_and_expert_em_1_on_all_300(all_levels):
    tid = all_levels.tasks("medium")[0]
    opening = all_levels.reset(tid)
    question = all_levels.task(tid).data["question"]
    assert len(opening) == 1 and opening[0]["role"] == "user"
    assert opening[0]["content"] == INSTRUCTION.format(examples=EXAMPLES, question=question)
    assert opening[0]["content"].endswith("Action 3: Finish[yes]\n\n(END OF EXAMPLES)\nQuestion: " + question)
    all_levels.close()
    episodes = []
    for tid in all_levels.tasks():
        ep = run_episode(all_levels, tid)
        assert ep.status == Status.COMPLETED and ep.info["em"] == 1.0 and ep.reward == 1.0, tid
        # the expert searched every supporting-fact title and found each page
        titles = {t for t, _ in all_levels.task(tid).data["supporting_facts"]}
        played = [m["content"] for m in ep.messages[1:] if m["role"] == "assistant"]
        assert {a.split("Search[")[1].rstrip("]") for a in played if "Search[" in a} == titles
        observations = [m["content"] for m in ep.messages[1:] if m["role"] == "user"]
        assert [o.split(":")[0] for o in observations] == [f"Observation {i}" for i in range(1, ep.turns + 1)]
        assert not any("Could not find" in o for o in observations)
        assert observations[-1] == f"Observation {ep.turns}: Answer is CORRECT"
        episodes.append({"task_id": tid, "reward": ep.reward, "info": ep.info})
    report = all_levels.paper_score(episodes)
    assert report["metric"] == "f1" and report["score"] == 100.0 and report["em"] == 100.0 and report["n"] == 300


def test_search_lookup_as_langchain_docstore(env):
    tid = env.tasks()[0]  # "Who was once considered the best kick boxer ...", answer Badr Hari
    sentences = [s.strip() for s in dict(env.task(tid).data["context"])["Badr Hari"]]
    env.reset(tid)
    obs = env.step("Thought 1: x\nAction 1: Search[Badr Hari]").observation
    assert obs == "Observation 1: " + " ".join(sentences)  # the whole (first) paragraph
    # sentences 0 and 2 mention "kickboxer"; the same keyword again moves to the next hit
    assert env.step("Action 2: Lookup[kickboxer]").observation == f"Observation 2: (Result 1/2) {sentences[0]}"
    assert env.step("Action 3: Lookup[Kickboxer]").observation == f"Observation 3: (Result 2/2) {sentences[2]}"
    assert env.step("Action 4: Lookup[kickboxer]").observation == "Observation 4: No More Results"
    assert env.step("Action 5: Lookup[zzqq]").observation == "Observation 5: No Results"
    miss = env.step("Action 6: Search[Nonexistent page qq]").observation
    assert miss.startswith("Observation 6: Could not find [Nonexistent page qq]. Similar: [")
    # LangChain forgets the page after a failed search
    assert env.step("Action 7: Lookup[Hari]").observation == (
        "Observation 7: The last page Searched was not found, so you cannot Lookup a keyword in it. "
        "Please try one of the similar pages given.")
    res = env.step("Thought 8: the surname is enough\nAction 8: Finish[Hari]")
    # precision 1/1, recall 1/2 -> F1 = 2/3; EM 0
    assert res.done and res.status == Status.COMPLETED and res.observation == "Observation 8: Answer is INCORRECT"
    assert res.reward == pytest.approx(2 / 3) and res.info["em"] == 0.0 and res.info["level"] == "easy"


def test_invalid_actions_cost_a_step_with_bolaa_feedback(env):
    tid = env.tasks()[1]
    env.reset(tid)
    res = env.step("I think the answer is obvious.")
    assert not res.done and res.info["invalid"] == "invalid_format"
    assert res.observation == ("Observation 1: Invalid Action. Valid Actions are Lookup[<topic>] "
                               "Search[<topic>] and Finish[<answer>].")
    res = env.step("Action 2: Fly[to the moon]")
    assert not res.done and res.info["invalid"] == "invalid_action"
    res = env.step("Action 3: search[lower case]")  # BOLAA matches the action type case-sensitively
    assert res.info["invalid"] == "invalid_action"
    res = env.step("Action 4: Finish[]")  # an empty argument does not parse
    assert res.info["invalid"] == "invalid_format"
    # only the first action line counts, as BOLAA stops generating at the newline
    res = env.step("Action 5: Search[Nowhere]\nObservation 5: made up\nAction 6: Finish[x]")
    assert not res.done and "Could not find [Nowhere]" in res.observation
    strict = serve.envs.load("hotpotqa", env.path, max_invalid=0)
    strict.reset(tid)
    res = strict.step("no action here")
    assert res.done and res.status == Status.INVALID_FORMAT and res.reward == 0.0


def test_ten_steps_then_halted_with_reward_0(env):
    env.reset(env.tasks()[2])
    for n in range(1, 11):
        res = env.step(f"Action {n}: Search[page {n}]")
    assert res.done and res.status == Status.TURN_LIMIT and res.reward == 0.0 and env.turns == 10


def test_paper_score_is_the_mean_of_level_means(all_levels):
    easy, medium = all_levels.tasks("easy"), all_levels.tasks("medium")
    eps = [{"task_id": easy[0], "reward": 1.0, "info": {"em": 1.0}},
           {"task_id": easy[1], "reward": 0.5, "info": {"em": 0.0}},
           {"task_id": medium[0], "reward": 0.0, "info": {"em": 0.0}}]
    report = all_levels.paper_score(eps)
    assert report["levels"] == {"easy": {"n": 2, "f1": 75.0, "em": 50.0}, "medium": {"n": 1, "f1": 0.0, "em": 0.0}}
    assert report["score"] == 37.5 and report["em"] == 25.0 and report["n"] == 3


def test_bad_records_are_skipped_with_reason(tmp_path, bench_data):
    good = (bench_data / "hotpotqa" / "hotpotqa_easy.jsonl").read_text().splitlines()[0]
    f = tmp_path / "q.jsonl"
    f.write_text(good + "\n" + json.dumps({"id": "bad1", "question": "q?"}) + "\n")
    env = serve.envs.load("hotpotqa", str(f))
    assert len(env.tasks()) == 1 and env.splits() == {"easy": env.tasks()}
    assert "answer" in env.skipped["bad1"] and "context" in env.skipped["bad1"]
    with pytest.raises(serve.envs.UnknownTask, match="skipped"):
        env.reset("bad1")
