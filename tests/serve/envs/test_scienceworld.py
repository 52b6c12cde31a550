"""ScienceWorld through the real simulator (a JVM over loopback): gold-path expert, bad input, limits."""

import shutil

import pytest

pytest.importorskip("scienceworld")
if shutil.which("java") is None:  # scripts/install.sh installs default-jre-headless
    pytest.skip("no Java runtime (Debian: default-jre-headless)", allow_module_level=True)

import serve.envs  # noqa: E402
from serve.envs.base import EnvError, Status, run_episode  # noqa: E402
from serve.envs.scienceworld import SPLIT_SIZES, hint_sample, split_of  # noqa: E402

TASKS = ["lifespan-longest-lived", "power-component"]  # short gold paths (4 and 9 actions)


@pytest.fixture(scope="module")
def env():
    e = serve.envs.load("sciworld", task_names=TASKS, max_variations=2, max_jvms=1)
    yield e
    e.shutdown()


def test_task_selection_and_splits():
    e = serve.envs.load("scienceworld", task_names=["boil"], split="dev", max_variations=None)
    assert e.tasks() == [f"boil/{v}" for v in range(14, 21)] and set(e.splits()) == {"dev"}
    assert split_of("boil", 13) == "train" and split_of("boil", 21) == "test"
    with pytest.raises(EnvError, match="unknown task_names"):
        serve.envs.load("scienceworld", task_names=["bake-a-cake"])
    with pytest.raises(EnvError, match="split"):
        serve.envs.load("scienceworld", split="validation")


def test_gold_expert_scores_full_and_reuses_one_jvm(env):
    assert env.tasks() == ["lifespan-longest-lived/93", "lifespan-longest-lived/94",
                           "power-component/15", "power-component/16"]
    for tid in (env.tasks()[0], env.tasks()[2]):
        ep = run_episode(env, tid)
        assert ep.status == Status.COMPLETED and ep.reward == 1.0 and ep.info["score"] == 100, tid
    assert "Your task is to turn on the electric motor" in ep.messages[2]["content"]
    assert env.pool.started == 1  # one JVM served both episodes


def test_invalid_and_wrong_actions(env):
    env.reset("lifespan-longest-lived/93")
    r = env.step("Thought: hm\nAction: fly to the moon")
    assert not r.done and r.info["invalid"] == "invalid_action"
    assert r.observation.startswith("No known action matches that input.")  # the simulator's words
    assert "look around" in r.observation  # valid-action hint
    r = env.step("I am not sure\nwhat to do")
    assert not r.done and r.info["invalid"] == "invalid_format"
    r = env.step("look around")  # a bare command is accepted
    assert "greenhouse" in r.observation and "invalid" not in r.info
    r = env.step("Action: focus on bee hive")  # focusing on the wrong object fails the task
    assert r.done and r.status == Status.COMPLETED and r.reward == 0.0 and r.info["score"] < 0


def test_stuck_step_becomes_task_error_and_jvm_is_replaced(env):
    tight = env.spawn()
    tight.reset("lifespan-longest-lived/94")
    tight.step_timeout_s = 1e-4  # no simulator step returns this fast: it counts as stuck
    r = tight.step("Action: look around")
    assert r.done and r.status == Status.TASK_ERROR and "took over" in r.observation
    assert env.pool.size == 0  # the stuck JVM was discarded, not reused
    ep = run_episode(env, "lifespan-longest-lived/94")  # a fresh JVM takes over
    assert ep.reward == 1.0 and env.pool.size == 1


def test_missing_java_names_the_debian_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    e = serve.envs.load("scienceworld", task_names=["boil"], max_variations=1)
    with pytest.raises(EnvError, match="default-jre-headless"):
        e.reset("boil/21")


def test_hint_sample_covers_verbs():
    valid = ["connect agent to air", "open door", "open box", "look around", "pick up cup", "pick up pot"]
    assert hint_sample(valid, 3) == ["look around", "open box", "pick up cup"]


@pytest.mark.slow
def test_gold_expert_on_first_test_variation_of_every_task():
    e = serve.envs.load("scienceworld", max_variations=1, step_timeout_s=120)
    try:
        rewards = {tid: run_episode(e, tid).reward for tid in e.tasks()}
    finally:
        e.shutdown()
    assert len(rewards) == 30
    assert all(r == 1.0 for r in rewards.values()), rewards  # measured: 30/30


@pytest.mark.slow
def test_split_table_matches_installed_package():
    from scienceworld import ScienceWorldEnv

    sw = ScienceWorldEnv("")
    try:
        for name in sw.get_task_names():
            sw.load(name, 0, "")
            sizes = (len(sw.get_variations_train()), len(sw.get_variations_dev()), len(sw.get_variations_test()))
            assert SPLIT_SIZES[name] == sizes, name
            assert min(sw.get_variations_test()) == sizes[0] + sizes[1], name
    finally:
        sw.close()
