"""Mind2Web environment on hand-built pages in Mind2Web's own record format.

Fixtures (``mind2web_data/``): four tasks in Mind2Web's split folders — three in
``test_task`` (restaurant booking, flight search, shoe shopping), one in ``test_website`` (car
rental) — 13 steps with CLICK / TYPE / SELECT, ``cleaned_html`` with ``backend_node_id`` on every
element and text in ``<text>`` nodes, positive and negative candidates (two steps have two gold
elements: a label and its radio button, a button and its inner span).
"""

import json
import pathlib
import pickle
import re

import numpy as np
import pytest

import serve.envs
from serve.envs.base import Status, run_episode
from serve.envs.mind2web_dom import page_and_choices, parse_page
from serve.envs.mind2web_score import DEMONSTRATIONS, action_f1, parse_answer

DATA = pathlib.Path(__file__).parent / "mind2web_data"
TASK_FILE = DATA / "test_task" / "test_task_0.json"
RESTAURANT = "a1f3c2d0-5b7e-4c61-9f0a-2e8d4b6c1a01"  # TYPE Chicago / SELECT 2 people / CLICK Let's go
FLIGHTS = "b27e9a14-0c3d-4f85-8e1b-7d6a5c3f2b02"
CAR = "d49c6f37-2a8b-4d1e-b5f6-0a1c2e4d5f04"


@pytest.fixture(scope="module")
def env():
    return serve.envs.load("mind2web", str(DATA))


def letters(question):
    return re.findall(r"^([B-Z])\. ", question, re.M)


def gold_letter(env):
    return re.search(r"Answer: ([A-Z])\.", env.expert_action()).group(1)


def other_letter(env, question):
    return next(x for x in letters(question) if x != gold_letter(env))


def records(everything=False):
    files = sorted(DATA.glob("*/*.json")) if everything else [TASK_FILE]
    return [rec for f in files for rec in json.loads(f.read_text())]


def test_loads_split_folders_and_opening_messages(env):
    assert env.splits() == {"test_task": [RESTAURANT, FLIGHTS, "c3d8b5e2-7f1a-4b90-a2c4-9e0f1d3b4c03"],
                            "test_website": [CAR]}
    assert not env.skipped
    msgs = env.reset(RESTAURANT)
    # AgentBench's three chain-of-thought demonstrations, loss-free, then the first question
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
    assert [m["content"] for m in msgs[:6]] == [x for pair in DEMONSTRATIONS for x in pair]
    assert all(m.get("loss") is False for m in msgs[1:6:2])
    assert msgs[0]["content"].startswith("'''\n<html> <div> <div> <a tock home page />")
    q = msgs[-1]["content"]
    assert "Task: Find a table for 2 at an Italian restaurant in Chicago on May 12 at 7 pm\n" \
           "Previous actions:\nNone\nWhat should be the next action?" in q
    assert "A. None of the above\n" in q and letters(q) == ["B", "C", "D", "E", "F"]  # 5 candidates


def test_question_rendering_exact():
    """The pruned page and choices, as Mind2Web's dom_utils render them (checked against it)."""
    step = records()[0]["actions"][0]
    page, choices = page_and_choices(parse_page(step["cleaned_html"]), ["124", "134", "116"])
    # wrappers without attributes are unwrapped; the time select and the button are not within
    # 3 siblings of a candidate (each input sits alone in its div), so they go
    assert page == (
        "<html> <form search> <input id=0 text date may 12, 2023 /> <select id=1 party size "
        "party_size> <option 1 person> 1 person </option> <option 2 people true> 2 people "
        "</option> <option 3 people> 3 people </option> <option 4 people> 4 people </option> "
        "</select> <input id=2 search location, restaurant, or cuisine /> </form> </html>")
    assert choices == [("116", "<input id=0 text date may 12, 2023 />"),
                       ("124", "<select id=1 party size party_size> <option 1 person> 1 person"),
                       ("134", "<input id=2 search location, restaurant, or cuisine />")]
    # siblings: "Mexican" keeps the 3 links before it but not the heading 4 places away
    page, choices = page_and_choices(parse_page(step["cleaned_html"]), ["146", "105"])
    assert page == (
        "<html> <body> <header banner> <nav main> <a id=0> Dining Rewards </a> <a> Gift Cards </a> "
        "<button button> Sign in </button> </nav> </header> <section popular cuisines> <a> Italian "
        "</a> <a> Steakhouse </a> <a> Sushi </a> <a id=1> Mexican </a> </section> </body> </html>")
    assert choices == [("105", "<a id=0> Dining Rewards </a>"), ("146", "<a id=1> Mexican </a>")]
    # depth: a product card keeps 5 levels below it, so the title nested deeper is gone
    shoes = records()[2]["actions"][1]["cleaned_html"]
    assert page_and_choices(parse_page(shoes), ["352"]) == (
        "<html> <div> <a> Nike Pegasus 40 </a> <a> Nike Invincible 3 </a> <div id=0 product card> "
        "<div> <div> <div> </div> <div product-price> $160 </div> </div> </div> </div> </div> </html>",
        [("352", "<div id=0 product card> <div> <div> <div> </div> <div product-price>")])
    # breadth: at most 50 descendants (25 options and their texts) of a 60-country select
    cars = json.loads((DATA / "test_website" / "test_website_0.json").read_text())[0]["actions"][1]
    page, choices = page_and_choices(parse_page(cars["cleaned_html"]), ["420"])
    assert page.count("<option>") == 25 and "Country 25 </option> </select>" in page


def test_gold_path_expert_succeeds_on_every_task(env):
    for tid in env.tasks():
        ep = run_episode(env, tid)
        assert ep.status == Status.COMPLETED and ep.reward == 1.0, tid
        assert ep.info["task_success"] == 1.0 and ep.info["element_acc"] == 1.0
        assert ep.info["action_f1"] == 1.0 and ep.turns == ep.info["steps"]
        assert all(m["content"].startswith("Thought: ") for m in ep.messages[7::2])
    assert ep.messages[-1]["content"] == "The task is over: 3 of 3 steps were right."
    steps = serve.envs.load("mind2web", str(DATA), episode="step")
    assert len(steps.tasks()) == 13
    assert all(run_episode(steps, t).reward == 1.0 for t in steps.tasks())


def test_mixed_answers_exact_metrics(env):
    env.reset(RESTAURANT)
    res = env.step(f"Thought: x\nAnswer: {gold_letter(env)}.\nAction: TYPE\nValue: Chicago")
    assert res.info["step"]["success"] == 1.0 and res.reward == pytest.approx(1 / 3) and not res.done
    # the next question shows the gold history
    assert "Previous actions:\n[searchbox]  Location, Restaurant, or Cuisine -> TYPE: Chicago\n" in res.observation
    # right element, wrong value: {SELECT, 3, people} vs {SELECT, 2, people} -> F1 2/3
    res = env.step(f"Answer: {gold_letter(env)}.\nAction: SELECT\nValue: 3 people")
    assert (res.info["step"]["element_acc"], res.info["step"]["success"]) == (1.0, 0.0)
    assert res.info["step"]["action_f1"] == pytest.approx(2 / 3)
    # wrong element, right operation
    res = env.step(f"Answer: {other_letter(env, res.observation)}.\nAction: CLICK")
    assert res.done and res.status == Status.COMPLETED
    step = res.info["step"]
    assert (step["element_acc"], step["action_f1"], step["success"]) == (0.0, 1.0, 0.0)
    assert res.info["element_acc"] == pytest.approx(2 / 3)
    assert res.info["action_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert res.info["step_sr"] == pytest.approx(1 / 3) and res.reward == pytest.approx(1 / 3)
    assert res.info["task_success"] == 0.0 and len(res.info["per_step"]) == 3


@pytest.mark.parametrize("answer,element,f1", [
    ("Answer: {g}.\nAction: TYPE\nValue: Chicago, IL", 1.0, 0.4),  # {TYPE} of {TYPE, Chicago,, IL} / {TYPE, Chicago}
    ("Answer: {g}.\nAction: TYPE\nValue: chicago", 1.0, 0.5),  # case matters
    ("Answer: {g}.\nAction: CLICK", 1.0, 0.0),  # wrong operation
    ("Answer: {g}.\nAction: TYPE", 1.0, 2 / 3),  # no value
    ("Answer: A.", 0.0, 0.0),  # none of the above: no prediction
])
def test_step_mode_single_question_scores(answer, element, f1):
    env = serve.envs.load("mind2web", str(TASK_FILE), episode="step")
    assert len(env.tasks()) == 10 and env.tasks()[0] == f"{RESTAURANT}:0"
    env.reset(f"{RESTAURANT}:0")
    res = env.step(answer.format(g=gold_letter(env)))
    assert res.done and res.status == Status.COMPLETED and res.reward == 0.0
    assert res.info["element_acc"] == element and res.info["action_f1"] == pytest.approx(f1)
    assert res.info["step_sr"] == 0.0


def test_click_with_a_value_line_is_not_a_clean_click():
    env = serve.envs.load("mind2web", str(TASK_FILE), episode="step")
    env.reset(f"{RESTAURANT}:2")
    res = env.step(f"Answer: {gold_letter(env)}.\nAction: CLICK\nValue: now")
    assert res.info["element_acc"] == 1.0 and res.info["action_f1"] == pytest.approx(2 / 3)
    env.reset(f"{FLIGHTS}:0")  # either gold element (the label or its radio button) counts
    res = env.step(f"Answer: {gold_letter(env)}.\nAction: CLICK")
    assert res.reward == 1.0


def test_gold_history_shows_the_last_previous_k_actions():
    env = serve.envs.load("mind2web", str(TASK_FILE), episode="step", previous_k=2)
    q = env.reset(f"{FLIGHTS}:3")[-1]["content"]
    assert "Previous actions:\n[combobox]  From -> TYPE: Denver\n[combobox]  To -> TYPE: Seattle\nWhat" in q
    full = serve.envs.load("mind2web", str(TASK_FILE), episode="step").reset(f"{FLIGHTS}:3")[-1]["content"]
    assert "Previous actions:\n[label]  One-way -> CLICK\n[combobox]  From" in full


def test_malformed_answers(env):
    env.reset(RESTAURANT)
    env.step(env.expert_action())
    res = env.step("I would pick the party size dropdown.")  # no Answer line: ends (max_invalid 0)
    assert res.done and res.status == Status.INVALID_FORMAT and res.info["invalid"] == "invalid_format"
    assert "Answer: B." in res.observation  # the feedback shows the format
    assert res.reward == pytest.approx(1 / 3) and res.info["step_sr"] == pytest.approx(1 / 3)
    assert res.info["element_acc"] == pytest.approx(1 / 3) and res.info["malformed"] == 1

    lenient = serve.envs.load("mind2web", str(DATA), max_invalid=2)
    lenient.reset(RESTAURANT)
    res = lenient.step("Answer: Z.\nAction: CLICK")  # no such choice
    assert not res.done and res.info["invalid"] == "invalid_action" and "choose A to F" in res.observation
    res = lenient.step(f"Answer: {gold_letter(lenient)}.\nAction: JUMP")
    assert not res.done and res.info["invalid"] == "invalid_format" and "'JUMP' is not an action" in res.observation
    res = lenient.step(lenient.expert_action())  # the same question again, answered right
    assert res.info["step"]["success"] == 1.0 and res.info["steps_done"] == 1


def test_agentbench_parsing_never_refuses():
    env = serve.envs.load("mind2web", str(TASK_FILE), parsing="agentbench")
    env.reset(RESTAURANT)
    res = env.step("I am not sure.")  # counts as A: no element chosen, the episode goes on
    assert not res.done and res.info["step"]["element_acc"] == 0.0 and "invalid" not in res.info
    res = env.step(f"Answer: {gold_letter(env)}.")  # element without an action: F1 0
    assert (res.info["step"]["element_acc"], res.info["step"]["action_f1"]) == (1.0, 0.0)
    assert parse_answer("Answer: F.\nAction: CLICK", 3, "agentbench").letter == "A"  # past the choices
    assert parse_answer("Thought: t\nAnswer: C.\nAction: SELECT\nValue: Pickup", 3).action == "SELECT Pickup"
    assert parse_answer("Answer: None of the above", 3).letter == "A"
    assert action_f1("CLICK ", "CLICK") == 1.0 and action_f1("", "CLICK") == 0.0


def test_candidates_are_seeded_and_deterministic():
    a = serve.envs.load("mind2web", str(DATA), episode="step")
    b = serve.envs.load("mind2web", str(DATA), episode="step")
    c = serve.envs.load("mind2web", str(DATA), episode="step", seed=1)
    qa = [a.reset(t)[-1]["content"] for t in a.tasks()]
    assert qa == [b.reset(t)[-1]["content"] for t in a.tasks()]
    qc = [c.reset(t)[-1]["content"] for t in a.tasks()]
    assert qa != qc
    for t in a.tasks():  # exactly one gold element among at most 5 choices
        a.reset(t)
        assert 2 <= len(a._choices) <= 5
        assert sum(cid in a._steps[0].pos for cid, _ in a._choices) == 1


def write_scores(path, gold_rank=0):
    """Candidate ranks in the shape of Mind2Web's scores_all_data.pkl (numpy numbers inside)."""
    scores, ranks = {}, {}
    for rec in records(everything=True):
        for act in rec["actions"]:
            key = f"{rec['annotation_id']}_{act['action_uid']}"
            cands = [c["backend_node_id"] for c in act["pos_candidates"] + act["neg_candidates"]]
            order = cands[len(act["pos_candidates"]):]
            order.insert(min(gold_rank, len(order)), cands[0])
            order += cands[1:len(act["pos_candidates"])]
            ranks[key] = {cid: np.int64(r) for r, cid in enumerate(order)}
            scores[key] = {cid: np.float32(-r) for r, cid in enumerate(order)}
    path.write_bytes(pickle.dumps({"scores": scores, "ranks": ranks}))
    return str(path)


def test_ranked_tournament_like_agentbench(tmp_path):
    scores = write_scores(tmp_path / "scores_all_data.pkl")
    env = serve.envs.load("mind2web", str(DATA), candidates="ranked", scores_file=scores, top_k=8)
    assert len(env.tasks()) == 4
    for tid in env.tasks():
        ep = run_episode(env, tid)
        assert ep.reward == 1.0, tid
        # top 8, 5 per question: the gold wins its round and the other round, or it is
        # chosen in the second round after "A" in the first
        assert all(r["rounds"] == 2 for r in ep.info["per_step"])
        assert ep.turns == sum(r["rounds"] for r in ep.info["per_step"])
    # a pool of 6: when the gold is the one left after "A" to the first five, it is asked once
    # more (AgentBench's loop would stop there and score 0); two of the 13 steps are such
    six = serve.envs.load("mind2web", str(DATA), candidates="ranked", scores_file=scores, top_k=6, episode="step")
    eps = [run_episode(six, t) for t in six.tasks()]
    assert all(ep.reward == 1.0 and ep.turns == 2 for ep in eps)
    # the gold outside the generator's top k: still asked, scores 0 (AgentBench's recall cap)
    far = serve.envs.load("mind2web", str(TASK_FILE), candidates="ranked", top_k=8,
                          scores_file=write_scores(tmp_path / "far.pkl", gold_rank=20))
    ep = run_episode(far, RESTAURANT)
    assert ep.reward == 0.0 and all(r["gold"] == [] for r in ep.info["per_step"])
    assert ep.messages[-2]["content"].endswith("Answer: A.")
    unranked = serve.envs.load("mind2web", str(TASK_FILE), candidates="ranked")  # no ranks anywhere
    assert unranked.tasks() == [] and "scores_file" in unranked.skipped[RESTAURANT]
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ranks": {}, "x": pathlib.PurePath("a")}))
    with pytest.raises(serve.envs.EnvError, match="refusing"):
        serve.envs.load("mind2web", str(TASK_FILE), scores_file=str(evil))


def test_bad_records_are_skipped_with_reasons(tmp_path):
    recs = records()
    no_task = dict(recs[0], annotation_id="no-task")
    del no_task["confirmed_task"]
    hover = json.loads(json.dumps(recs[1]))
    hover["annotation_id"] = "hover"
    hover["actions"][1]["operation"]["op"] = "HOVER"
    short = dict(recs[2], annotation_id="short", action_reprs=recs[2]["action_reprs"][:1])
    lost = json.loads(json.dumps(recs[0]))
    lost["annotation_id"] = "lost-gold"
    lost["actions"][1]["pos_candidates"][0]["backend_node_id"] = "99999"  # not in the page
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [recs[0], no_task, hover, short, lost]) + "\n")
    env = serve.envs.load("mind2web", str(f))
    assert env.tasks() == [RESTAURANT, "lost-gold"] and env.splits().keys() == {"test"}
    assert "confirmed_task" in env.skipped["no-task"]
    assert "actions[1].operation.op" in env.skipped["hover"] and "HOVER" in env.skipped["hover"]
    assert "action_reprs" in env.skipped["short"]
    ep = run_episode(env, "lost-gold")  # a step without gold is asked and scores 0 (as AgentBench)
    assert ep.reward == pytest.approx(2 / 3) and ep.info["per_step"][1]["gold"] == []
    strict = serve.envs.load("mind2web", str(f), skip_unanswerable=True, episode="step", split="test")
    assert "lost-gold:1" in strict.skipped and "lost-gold:0" in strict.tasks()
    assert "hover:1" in strict.skipped and "hover:0" in strict.tasks()  # other steps still usable
    trimmed = serve.envs.load("mind2web", str(f), skip_unanswerable=True)
    assert run_episode(trimmed, "lost-gold").info["steps"] == 2
    with pytest.raises(serve.envs.UnknownTask, match="skipped"):
        env.reset("hover")
    with pytest.raises(serve.envs.EnvError, match="episode"):
        serve.envs.load("mind2web", str(f), episode="whole")
    with pytest.raises(serve.envs.EnvError, match="no such file"):
        serve.envs.load("mind2web", str(tmp_path / "missing.json"))
    assert serve.envs.load("mind2web", str(DATA), split="test_website").tasks() == [CAR]


def test_hub_without_access_names_the_fix():
    # tests/conftest.py puts the hub libraries offline: this never reaches the network
    with pytest.raises(serve.envs.EnvError, match="osunlp/Mind2Web.*download the data and pass its folder"):
        serve.envs.load("mind2web", "osunlp/Mind2Web", split="test_domain")
