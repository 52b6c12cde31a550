"""MiniWoB++ in real headless Chromium: scripted solvers, DOM rendering, bad actions, limits."""

import shutil

import pytest

pytest.importorskip("miniwob")
if not (shutil.which("chromium") and shutil.which("chromedriver")):  # scripts/install.sh installs both
    pytest.skip("no chromium/chromedriver (Debian: chromium chromium-driver)", allow_module_level=True)

import serve.envs  # noqa: E402
from serve.envs.base import EnvError, Status, run_episode  # noqa: E402
from serve.envs.miniwob import AGENTTUNING_TASKS, parse_action, render_dom  # noqa: E402
from serve.envs.miniwob_expert import SOLVERS  # noqa: E402

FIXED = ["click-button", "click-link", "enter-text"]


@pytest.fixture(scope="module")
def env():
    e = serve.envs.load("miniwob", task_names=sorted(SOLVERS), episodes_per_task=2, max_browsers=1)
    yield e
    e.shutdown()


def test_agenttuning_task_list_is_selectable():
    e = serve.envs.load("miniwob", episodes_per_task=1)
    assert len(AGENTTUNING_TASKS) == 46 and not e.skipped  # the package ships every listed task
    assert "click-button/0" in e.tasks() and "terminal/0" in e.tasks()
    bad = serve.envs.load("miniwob", task_names=["click-button", "no-such-task"], episodes_per_task=1)
    assert bad.tasks() == ["click-button/0"] and "no task 'no-such-task'" in bad.skipped["no-such-task/0"]


def test_parse_action_and_render():
    assert parse_action("Thought: x\nAction: click(12)") == ("click", 12)
    assert parse_action('Action: type(5, "a, b")') == ("type", (5, "a, b"))
    assert parse_action('press("Enter")') == ("press", "Enter")
    with pytest.raises(Exception, match="Write one action"):
        parse_action("Action: scroll down")
    dom = {"ref": 3, "tag": "DIV", "id": "area", "classes": "", "children": [
        {"ref": 5, "tag": "INPUT_text", "id": "tt", "classes": "", "text": "", "value": "hi", "children": []},
        {"ref": 6, "tag": "BUTTON", "id": "", "classes": "secondary-action", "text": "Submit", "children": []}]}
    assert render_dom(dom) == ['[3] div #area', '  [5] input_text #tt value="hi"',
                               '  [6] button .secondary-action "Submit"']


def test_scripted_solvers_succeed_on_fixed_tasks(env):
    for task in FIXED + ["enter-password", "login-user"]:
        for tid in (f"{task}/0", f"{task}/1"):
            ep = run_episode(env, tid)
            assert ep.status == Status.COMPLETED and ep.reward == 1.0 and ep.info["raw_reward"] > 0, tid
    assert env.pool.started == 1  # one browser, reused for every episode


def test_bad_actions_get_feedback_and_wrong_answer_fails(env):
    env.reset("enter-text/0")
    r = env.step("Action: click(999)")
    assert not r.done and r.info["invalid"] == "invalid_action" and "no element [999]" in r.observation
    r = env.step("I will type now")
    assert not r.done and r.info["invalid"] == "invalid_format"
    r = env.step('Action: type(5, "surely wrong")')
    assert not r.done and 'value="surely wrong"' in r.observation
    r = env.step("Action: click(6)")  # submit the wrong text
    assert r.done and r.status == Status.COMPLETED and r.reward == 0.0 and r.info["raw_reward"] < 0


def test_expert_refuses_unsupported_task(env):
    e = serve.envs.load("miniwob", task_names=["terminal"], episodes_per_task=1, max_browsers=1)
    e.pool = env.pool  # reuse the module's browser
    e.reset("terminal/0")
    with pytest.raises(EnvError, match="no scripted expert"):
        e.expert_action()
    e.close()


def test_stuck_step_becomes_task_error_and_browser_is_discarded(env):
    tight = env.spawn()
    tight.reset("click-button/0")
    before = env.pool.size
    tight.step_timeout_s = 1e-4  # no browser round trip is this fast: the step counts as stuck
    r = tight.step("Action: click(4)")
    assert r.done and r.status == Status.TASK_ERROR and "took over" in r.observation
    assert env.pool.size == before - 1  # discarded, never handed to the next episode
    assert run_episode(env, "click-button/1").reward == 1.0  # a fresh browser takes over


def test_missing_chromium_names_debian_packages(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("MINIWOB_CHROME_BINARY", raising=False)
    monkeypatch.delenv("MINIWOB_CHROMEDRIVER", raising=False)
    e = serve.envs.load("miniwob", task_names=["click-test"], episodes_per_task=1)
    with pytest.raises(EnvError, match="chromium and chromium-driver"):
        e.reset("click-test/0")
