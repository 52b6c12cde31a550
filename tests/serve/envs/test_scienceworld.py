"""ScienceWorld through the real simulator (a JVM over loopback) under AgentTuning's protocol:
variation selection, prompt (our gold-path few-shot by default, a user-provided prompt file as an
option), closest-command matching, last-score scoring, early stops, limits."""

import json
import random
import shutil

import pytest

pytest.importorskip("scienceworld")
if shutil.which("java") is None:  # scripts/install.sh installs default-jre-headless
    pytest.skip("no Java runtime (Debian: default-jre-headless)", allow_module_level=True)

import serve.envs  # noqa: E402
from serve.envs import scienceworld_protocol as proto  # noqa: E402
from serve.envs.base import EnvError, Status, run_episode  # noqa: E402
from serve.envs import scienceworld as sciworld  # noqa: E402
from serve.envs.scienceworld import SPLIT_SIZES, hint_sample, split_of, split_variations  # noqa: E402

TASKS = ["lifespan-longest-lived", "power-component"]  # short gold paths (8 and 15 actions)
# A small prompt file in the format of AgentTuning's prompts/prompt.json, written for these tests.
HAND_PROMPTS = {
    "17": ["This outside location is called the outside.\nYour task is to find the animal with the longest life span.",
           "Think: The animals are outside; I should compare their life spans.", "OK.", "Action: look around"],
    "25": ["This room is called the workshop.\nYour task is to turn on the blue light bulb.",
           "Action: focus on blue light bulb"],
}


@pytest.fixture(scope="module")
def env():
    # "gold" = the default when no paper prompt file is found (test_fewshot_option_errors); named
    # here so a user's copy under $AGENTTUNING_DATA_DIR does not change what these tests see
    e = serve.envs.load("sciworld", task_names=TASKS, max_variations=2, max_jvms=1, fewshot="gold")
    yield e
    e.shutdown()


def test_default_selection_is_agenttuning_load_variation():
    e = serve.envs.load("scienceworld")
    assert len(e.tasks()) == 270 and set(e.splits()) == {"test"}
    for number, name in enumerate(proto.TASK_ORDER):
        # eval_utils.load_variation, set "test", as the script runs it
        variations = list(range(sum(SPLIT_SIZES[name][:2]), sum(SPLIT_SIZES[name])))
        test_len = min(10, len(variations))
        test_len = 5 if number == 25 else 9 if number == 15 else test_len
        random.seed(1)
        random.shuffle(variations)
        assert [t for t in e.tasks() if t.rpartition("/")[0] == name] == \
            [f"{name}/{v}" for v in variations[:test_len]], name
    assert [t for t in e.tasks() if t.startswith("boil/")] == [
        "boil/26", "boil/27", "boil/28", "boil/25", "boil/24", "boil/21", "boil/29", "boil/22", "boil/23"]


def test_other_selections_and_bad_options():
    e = serve.envs.load("scienceworld", task_names=["boil"], split="dev", max_variations=None, sample_seed=None)
    assert e.tasks() == [f"boil/{v}" for v in range(14, 21)] and set(e.splits()) == {"dev"}
    assert split_of("boil", 13) == "train" and split_of("boil", 21) == "test"
    assert split_variations("power-component", "test") == [15, 16, 17, 18, 19]
    with pytest.raises(EnvError, match="unknown task_names"):
        serve.envs.load("scienceworld", task_names=["bake-a-cake"])
    with pytest.raises(EnvError, match="split"):
        serve.envs.load("scienceworld", split="validation")
    with pytest.raises(EnvError, match="action_matching"):
        serve.envs.load("scienceworld", action_matching="fuzzy")


def test_prompt_file_format_is_keyed_by_the_scripts_task_numbers(tmp_path):
    good = tmp_path / "prompt.json"
    good.write_text(json.dumps(HAND_PROMPTS))
    shots = proto.load_fewshot(str(good))
    assert proto.TASK_ORDER[17] == "lifespan-longest-lived" and proto.TASK_ORDER[25] == "power-component"
    assert shots == {"lifespan-longest-lived": HAND_PROMPTS["17"], "power-component": HAND_PROMPTS["25"]}
    for bad, problem in (({"30": []}, "not a task number"), ({"boil": []}, "not a task number"),
                         ({"0": ["user only"]}, "even-length"), ([["a", "b"]], "JSON object")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=problem):
            proto.load_fewshot(str(tmp_path / "bad.json"))


def test_gold_fewshot_turn_format():
    steps = [("go to kitchen", "You move to the kitchen.\n"), ("focus on red light bulb", "You focus on\tit."),
             ("wait1", "You decide to wait for 1 iterations.")]
    turns = proto.gold_fewshot("Room.\n\tA door", "Your task is to turn on the red light bulb. First, focus.", steps)
    assert turns == [
        "Room.  A door\nYour task is to turn on the red light bulb. First, focus.",
        "Think: I need to turn on the red light bulb. I will act one step at a time and read each observation "
        "before the next.", "OK.",
        "Action: go to kitchen", "You move to the kitchen.",
        "Think: The red light bulb is what the task is about, so I focus on it now.", "OK.",
        "Action: focus on red light bulb", "You focus on it.",
        "Action: wait1"]  # ends on the agent's turn, as the script's examples do
    assert proto.gold_fewshot("Room.", "Measure it.", []) == [
        "Room.\nMeasure it.",
        "Think: I need to do this: Measure it. I will act one step at a time and read each observation "
        "before the next."]


def test_opening_trims_fewshot_like_the_script():
    ex = ["Room A.\nYour task is to boil water.", "Think: find water.", "OK.", "Action: go to kitchen",
          "You move to the kitchen.", "Action: pick up pot", "You pick up the pot.", "Action: wait1"]
    full = proto.opening_messages(ex, "Room.\n\tA door", "Your task is to boil water.", None)
    assert [m["content"] for m in full[:2]] == [proto.INIT_PROMPT, "Ok."] and len(full) == 2 + len(ex) + 1
    assert [m["content"] for m in full[2:-1]] == ex and [m["role"] for m in full[2:4]] == ["user", "assistant"]
    assert full[-1]["content"] == proto.NEW_TASK + "Room.  A door\nYour task is to boil water."
    assert all(m.get("loss") is False for m in full if m["role"] == "assistant")
    size = sum(proto.approx_tokens(m["content"]) for m in full)
    one_less = proto.opening_messages(ex, "Room.\n\tA door", "Your task is to boil water.", size - 1)
    # the pair after the example's first exchange goes first
    assert [m["content"] for m in one_less[2:5]] == [ex[0], ex[1], ex[4]] and len(one_less) == len(full) - 2
    assert [m["content"] for m in proto.opening_messages(ex, "Room.", "Task.", 0)] == [
        proto.INIT_PROMPT, "Ok.", proto.NEW_TASK + "Room.\nTask."]


def test_closest_valid_action_rules():
    valid = ["look around", "look at axe", "go to kitchen", "go to hallway", "focus on axe", "focus on air",
             "close door to kitchen", "pick up axe", "wait1"]
    recent = ["look around", "(go to kitchen, You move to the kitchen.)"]
    cands = proto.candidate_actions(valid, "This room is the workshop. You see an axe.", "In your inventory", recent)
    assert "open door to kitchen" in cands and "focus on air" not in cands  # script's additions/removals
    assert "close door to kitchen" not in cands  # door commands other than "open" are dropped
    assert "look around" not in cands  # among the last three records: the script's first-turns quirk
    assert "focus on axe" in cands
    assert "focus on axe" not in proto.candidate_actions(valid, "A bare room.", "In your inventory", recent)
    assert proto.closest_valid_action("go to kitchen", cands) == "go to kitchen"
    assert proto.closest_valid_action("go to green house", cands | {"go to greenhouse"}) == "go to greenhouse"
    assert proto.closest_valid_action("pick the axe up", cands) == "pick up axe"  # 2 shared words
    assert proto.closest_valid_action("look around", cands) == "look at axe"  # ties: first in sorted order
    assert proto.closest_valid_action("fly!", cands) == "fly"  # nothing shared: kept, cleaned


def test_early_stop_rules():
    assert proto.is_action_failed("No known action matches that input.")
    assert proto.is_action_failed("You can't do that.") and proto.is_action_failed("The stove is not on.")
    assert not proto.is_action_failed("You move to the kitchen.")
    assert not proto.is_loop(["look around", "a", "b", "a"])
    assert proto.is_loop(["look around", "a", "a", "a", "a"])  # the seed record makes two values
    assert proto.is_loop(["x", "a", "b", "a", "b", "a"]) and not proto.is_loop(["a"] * 6)


def test_gold_expert_scores_full_and_reuses_one_jvm(env):
    assert env.tasks() == ["lifespan-longest-lived/119", "lifespan-longest-lived/110",
                           "power-component/17", "power-component/18"]
    ep = run_episode(env, "lifespan-longest-lived/119")
    assert ep.status == Status.COMPLETED and ep.reward == 1.0 and ep.info["score"] == 100 and ep.turns == 7
    assert ep.messages[0]["content"] == proto.INIT_PROMPT and ep.messages[1]["content"] == "Ok."
    assert "\n" not in ep.messages[-1]["content"]  # observations are cleaned like the script's
    opening = env.reset("power-component/17")
    assert opening[-1]["content"].startswith(proto.NEW_TASK + "This outside location is called the outside.")
    assert opening[-1]["content"].endswith("\nYour task is to turn on the electric buzzer. First, focus on the "
                                           "electric buzzer. Then, create an electrical circuit that powers it on.")
    # the task's own few-shot: train variation 0's gold path, whose task is the red light bulb
    assert opening[2]["content"].endswith("\nYour task is to turn on the red light bulb. First, focus on the red "
                                          "light bulb. Then, create an electrical circuit that powers it on.")
    env.close()
    assert env.pool.started == 1  # one JVM served both episodes


def test_default_fewshot_is_built_from_a_train_variation_gold_path(env, bench_data):
    assert not (bench_data / "scienceworld").exists(), "the paper's prompt file must not ship in data/"
    assert env.fewshot_source == "gold" and env.fewshot_variation("lifespan-longest-lived") == 0
    assert split_of("lifespan-longest-lived", 0) == "train"  # never a test variation
    opening = env.reset("lifespan-longest-lived/119")
    example = [m["content"] for m in opening[2:-1]]
    assert example[0].startswith("This room is called the hallway. In it, you see:")
    assert example[0].endswith("\nYour task is to find the animal with the longest life span.  The animals are in "
                               "the 'outside' location.  Focus on the animal with the longest life span.")
    assert example[1:] == [
        "Think: I need to find the animal with the longest life span. I will act one step at a time and read each "
        "observation before the next.", "OK.",
        "Action: open door to kitchen", "The door is already open.",
        "Action: go to kitchen", "You move to the kitchen.",
        "Action: open door to outside", "The door is already open.",
        "Action: go to outside", "You move to the outside.",
        "Think: The baby baby brown bear is what the task is about, so I focus on it now.", "OK.",
        "Action: focus on baby baby brown bear"]
    sw = env._backend
    again = env._play_gold(sw, "lifespan-longest-lived", 0)  # deterministic: a fresh build is identical
    assert again == example
    gold = [a for a in sw.get_gold_action_sequence() if a]  # the simulator's own path for train variation 0
    # the example stops where the gold path completes the task (full score), before its trailing wait1
    assert [t[len("Action: "):] for t in example if t.startswith("Action: ")] == gold[:5] and gold[5:] == ["wait1"]
    assert sw.server.getCompleted() and sw.server.getScore() == 1.0
    env.close()


def test_prompt_file_option_and_data_dir_lookup(env, tmp_path, monkeypatch):
    prompts = tmp_path / "prompt.json"
    prompts.write_text(json.dumps(HAND_PROMPTS))
    e = serve.envs.load("scienceworld", task_names=TASKS, max_variations=1, prompt_file=str(prompts))
    e.pool = env.pool  # reuse the module's JVM
    assert e.fewshot_source == str(prompts)
    opening = e.reset("lifespan-longest-lived/119")
    assert [m["content"] for m in opening[2:-1]] == HAND_PROMPTS["17"]
    assert opening[-1]["content"].startswith(proto.NEW_TASK + "This room is called the workshop.")
    e.close()
    # placed where the data folder is looked for, the file is found without the option
    data_dir = tmp_path / "data"
    (data_dir / "scienceworld").mkdir(parents=True)
    (data_dir / "scienceworld" / "agenttuning_prompt.json").write_text(json.dumps(HAND_PROMPTS))
    monkeypatch.setenv("AGENTTUNING_DATA_DIR", str(data_dir))
    found = serve.envs.load("scienceworld", task_names=TASKS, max_variations=1)
    assert found.fewshot_source == str((data_dir / sciworld.PROMPT_FILE).resolve())
    assert found.fewshot["power-component"] == HAND_PROMPTS["25"]
    assert serve.envs.load("scienceworld", task_names=TASKS, max_variations=1, fewshot="gold").fewshot_source == "gold"
    with pytest.raises(EnvError, match=r"has no few-shot for boil \(task number 0\).*fewshot='gold'"):
        serve.envs.load("scienceworld", task_names=["boil"] + TASKS, max_variations=1)


def test_fewshot_option_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTTUNING_DATA_DIR", str(tmp_path))  # holds no prompt file
    assert serve.envs.load("scienceworld", task_names=TASKS, max_variations=1).fewshot_source == "gold"
    with pytest.raises(EnvError, match="does not ship.*eval_heldout/science-world/prompts/prompt.json"):
        serve.envs.load("scienceworld", task_names=TASKS, fewshot="file")
    with pytest.raises(EnvError, match="is not a file.*prompts/prompt.json"):
        serve.envs.load("scienceworld", task_names=TASKS, prompt_file=str(tmp_path / "absent.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(EnvError, match="cannot read the few-shot prompt file"):
        serve.envs.load("scienceworld", task_names=TASKS, prompt_file=str(tmp_path / "broken.json"))
    with pytest.raises(EnvError, match="drop 'prompt_file'"):
        serve.envs.load("scienceworld", task_names=TASKS, fewshot="gold", prompt_file=str(tmp_path / "broken.json"))
    with pytest.raises(EnvError, match="option 'fewshot'"):
        serve.envs.load("scienceworld", fewshot="paper")
    with pytest.raises(EnvError, match=r"fewshot_train_index 10 is not a train variation index of "
                                       r"\['power-component'\]"):
        serve.envs.load("scienceworld", task_names=TASKS, fewshot_train_index=10)


def test_think_turns_and_look_around_quirk(env):
    env.reset("lifespan-longest-lived/110")
    r = env.step("Think: I should look around first.")
    assert r.observation == "OK." and not r.done and r.info["command"] == "Think: I should look around first."
    r = env.step("Action: look around")  # turns 1-3: "look around" is not accepted by the script
    assert r.info["command"].startswith("look at ") and "invalid" not in r.info
    env.step("Think: hm")
    r = env.step("look around")  # a bare command is read as the script reads it
    assert r.info["command"] == "look around"
    assert r.observation.startswith("This outside location is called the outside.")
    env.close()


def test_failed_task_keeps_its_last_score(env):
    env.reset("lifespan-longest-lived/119")
    for command in ["open door to hallway", "go to hallway", "open door to kitchen", "go to kitchen",
                    "open door to outside", "go to outside"]:
        r = env.step("Action: " + command)
    assert r.info["score"] == 50 and r.reward == 0.5
    r = env.step("Action: focus on axe")  # the wrong animal-less object: the task fails
    assert r.done and r.status == Status.COMPLETED and r.reward == 0.5 and r.info["score"] == 50


def test_turn_limit_and_context_abort_keep_the_last_score(env):
    short = env.spawn()
    short.max_turns = 2
    short.reset("lifespan-longest-lived/119")
    short.step("Action: open door to hallway")
    r = short.step("Action: go to hallway")
    assert r.done and r.status == Status.TURN_LIMIT and r.reward == 0.25
    env.reset("lifespan-longest-lived/119")
    env.step("Action: open door to hallway")
    env.step("Action: go to hallway")
    r = env.abort(Status.CONTEXT_LIMIT, "prompt too long")
    assert r.status == Status.CONTEXT_LIMIT and r.reward == 0.25 and r.info["score"] == 25


def test_ten_failed_commands_in_a_row_and_loops_end_the_episode(env):
    env.reset("lifespan-longest-lived/119")  # starts in the workshop: no door to these rooms
    for n in range(10):
        r = env.step("Action: open door to " + ["bathroom", "bedroom", "foundry"][n % 3])
        assert r.observation == "No known action matches that input."
        assert r.done == (n == 9), n
    assert r.status == Status.INVALID_ACTION and r.info["stopped"] == "10 failed commands in a row"
    env.reset("lifespan-longest-lived/119")
    for n in range(5):
        r = env.step(f"Think: {'ab'[n % 2]}")
    assert r.done and r.status == Status.REPETITION and r.reward == 0.0
    env.reset("lifespan-longest-lived/119")  # with the seed record, 4 waits in a row are a "loop"
    results = [env.step("Action: wait1") for _ in range(4)]
    assert [r.done for r in results] == [False, False, False, True] and results[-1].status == Status.REPETITION


def test_strict_matching_gives_simulator_answer_and_hints(env):
    strict = env.spawn()
    strict.action_matching = "strict"
    strict.reset("lifespan-longest-lived/119")
    r = strict.step("Action: fly to the moon")
    assert not r.done and r.info["invalid"] == "invalid_action"
    assert r.observation.startswith("No known action matches that input.")  # the simulator's words
    assert "look around" in r.observation  # valid-action hint
    r = strict.step("I am not sure\nwhat to do")
    assert not r.done and r.info["invalid"] == "invalid_format"
    strict.close()


def test_stuck_step_becomes_task_error_and_jvm_is_replaced(env):
    tight = env.spawn()
    tight.reset("lifespan-longest-lived/110")
    tight.step_timeout_s = 1e-4  # no simulator call returns this fast: it counts as stuck
    r = tight.step("Action: look around")
    assert r.done and r.status == Status.TASK_ERROR and "took over" in r.observation
    assert env.pool.size == 0  # the stuck JVM was discarded, not reused
    env.reset("lifespan-longest-lived/119")  # a fresh JVM takes over
    r = env.step("Action: go to hallway")
    assert r.observation == "You move to the hallway." and r.info["score"] == 25
    env.close()
    assert env.pool.size == 1


def test_paper_score_is_the_mean_of_task_means(env):
    eps = [{"task_id": "lifespan-longest-lived/119", "reward": 1.0},
           {"task_id": "lifespan-longest-lived/110", "reward": 0.5},
           {"task_id": "power-component/17", "reward": 0.25}]
    report = env.paper_score(eps)
    assert report["tasks"] == {"lifespan-longest-lived": {"n": 2, "score": 75.0},
                               "power-component": {"n": 1, "score": 25.0}}
    assert report["metric"] == "mean_score" and report["score"] == 50.0 and report["n"] == 3


def test_missing_java_names_the_debian_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    e = serve.envs.load("scienceworld", task_names=["boil"], max_variations=1)
    with pytest.raises(EnvError, match="default-jre-headless"):
        e.reset("boil/26")


def test_hint_sample_covers_verbs():
    valid = ["connect agent to air", "open door", "open box", "look around", "pick up cup", "pick up pot"]
    assert hint_sample(valid, 3) == ["look around", "open box", "pick up cup"]


@pytest.mark.slow
def test_gold_expert_on_first_selected_variation_of_every_task():
    e = serve.envs.load("scienceworld", max_variations=1, step_timeout_s=120)
    try:
        eps = {tid: run_episode(e, tid) for tid in e.tasks()}
    finally:
        e.shutdown()
    print({t: (ep.status.value, ep.reward, ep.turns, ep.info.get("stopped")) for t, ep in eps.items()})
    assert len(eps) == 30
    full = {tid for tid, ep in eps.items() if ep.reward == 1.0}
    limited = {tid for tid, ep in eps.items() if ep.status == Status.TURN_LIMIT}
    # gold paths longer than the script's 100 simulator moves stop early with their partial score
    assert full | limited == set(eps), {t: (ep.status, ep.reward) for t, ep in eps.items()}
    assert all(0.0 < eps[t].reward < 1.0 and eps[t].info["stopped"] == "more than 100 simulator moves"
               for t in limited)
    # measured: 26/30 reach 100; these four gold paths need more than 100 moves
    assert {t: eps[t].info["score"] for t in limited} == {
        "boil/26": 75, "inclined-plane-friction-unnamed-surfaces/153": 20,
        "mendelian-genetics-known-plant/116": 34, "mendelian-genetics-unknown-plant/479": 34}
    report = e.paper_score([{"task_id": t, "reward": ep.reward} for t, ep in eps.items()])
    assert report["score"] == pytest.approx((26 * 100 + 75 + 20 + 34 + 34) / 30)  # 92.1


@pytest.mark.slow
def test_split_table_matches_installed_package():
    from scienceworld import ScienceWorldEnv

    sw = ScienceWorldEnv("")
    try:
        assert sorted(sw.get_task_names()) == list(proto.TASK_ORDER)
        for name in sw.get_task_names():
            sw.load(name, 0, "")
            sizes = (len(sw.get_variations_train()), len(sw.get_variations_dev()), len(sw.get_variations_test()))
            assert SPLIT_SIZES[name] == sizes, name
            assert sw.get_variations_test() == split_variations(name, "test"), name
    finally:
        sw.close()
