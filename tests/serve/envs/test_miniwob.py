"""MiniWoB++ in real headless Chromium under AgentTuning's protocol: its task list on the miniwob
package's pages, user-provided pages (``pages_dir``, with small pages written here), success =
reward > 0, scripted solvers, DOM rendering, bad actions, limits."""

import os
import shutil

import pytest

pytest.importorskip("miniwob")
if not (shutil.which("chromium") and shutil.which("chromedriver")):  # scripts/install.sh installs both
    pytest.skip("no chromium/chromedriver (Debian: chromium chromium-driver)", allow_module_level=True)

import serve.envs  # noqa: E402
from serve.envs.base import EnvError, Status, run_episode  # noqa: E402
from serve.envs.miniwob import AGENTTUNING_TASKS, find, page_root, parse_action, render_dom, task_area  # noqa: E402
from serve.envs.miniwob_expert import SOLVERS  # noqa: E402

FIXED = ["click-button", "click-link", "enter-text"]


@pytest.fixture(scope="module")
def env():
    e = serve.envs.load("miniwob", task_names=sorted(SOLVERS) + ["click-checkboxes"], episodes_per_task=4,
                        max_browsers=1)
    yield e
    e.shutdown()


def test_agenttuning_task_list_on_the_package_pages(tmp_path):
    e = serve.envs.load("miniwob")
    assert len(AGENTTUNING_TASKS) == 46 and len(e.tasks()) == 460 and not e.skipped  # 10 episodes per task
    assert e.tasks()[:2] == ["choose-list/0", "choose-list/1"] and set(e.splits()) == {"train"}
    assert e.html_dir == os.path.join(page_root(None), "miniwob") and e.episode_time_limit_s == 3600.0
    bad = serve.envs.load("miniwob", task_names=["click-button", "no-such-task"], episodes_per_task=1)
    assert bad.tasks() == ["click-button/0"] and "no task 'no-such-task'" in bad.skipped["no-such-task/0"]
    with pytest.raises(EnvError, match="option 'pages_dir' must be a folder.*THUDM/AgentTuning"):
        serve.envs.load("miniwob", pages_dir=str(tmp_path / "absent"))
    with pytest.raises(EnvError, match="holds no <task>.html page"):
        serve.envs.load("miniwob", pages_dir=str(tmp_path))


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
            assert ep.status == Status.COMPLETED and ep.reward == 1.0 and ep.info["success"] is True, tid
            assert 0 < ep.info["env_reward"] <= 1.0 and ep.info["raw_reward"] == 1.0, tid
    assert env.pool.started == 1  # one browser, reused for every episode


def test_package_pages_get_a_fixed_timer(env):
    env.reset("click-test/0")  # the package's pages are timed for humans: 3600 s by default
    assert env._js("return core.EPISODE_MAX_TIME;") == 3600000
    env.close()
    fixed = env.spawn()
    fixed.episode_time_limit_s = 60.0
    fixed.reset("enter-password/0")
    assert fixed._js("return core.EPISODE_MAX_TIME;") == 60000
    fixed.close()


def test_package_click_checkboxes_gives_partial_credit_that_counts_as_success(env):
    # seed 3: "Select YM2l8 and click Submit." with 6 boxes; submit without clicking any
    env.reset("click-checkboxes/3")
    boxes = find(task_area(env.dom), lambda n: str(n.get("tag")).lower() == "input_checkbox")
    submit = find(task_area(env.dom), lambda n: n.get("id") == "subbtn")[0]
    assert env.utterance == "Select YM2l8 and click Submit." and len(boxes) == 6
    r = env.step(f"Action: click({submit['ref']})")
    # (5 right - 1 wrong) / 6 > 0: the script's rule (reward > 0) counts it as a success; AgentTuning's
    # page copy scores this task all-or-nothing (see the pages_dir test and the docs)
    assert r.done and r.reward == 1.0 and r.info["success"] is True
    assert r.info["raw_reward"] == pytest.approx(4 / 6)


# Two small task pages written for this test (not MiniWoB's): the page interface the environment
# needs is core.js's (startEpisode, genProblem, endEpisode, the #query and #area elements).
_HEAD = """<!DOCTYPE html>
<html><head><title>{title}</title>
<link rel="stylesheet" type="text/css" href="../core/core.css">
<script src="../core/core.js"></script>
<script src="../core/d3.v3.min.js"></script>
<script>
{script}
window.onload = function() {{ core.startEpisode(); }}
</script></head>
<body><div id="wrap"><div id="query"></div><div id="area">{area}</div></div></body></html>
"""
# replaces the package's click-test; sets no timer of its own
PAGE_PICK = _HEAD.format(title="Pick", area='<button id="left">Left</button><button id="right">Right</button>',
                         script="""var genProblem = function() {
  var want = core.randf(0, 1) < 0.5 ? 'left' : 'right';
  d3.select('#query').html('Press the ' + want + ' button.');
  d3.select('#left').on('click', function() { core.endEpisode(want === 'left' ? 1.0 : -1.0, true); });
  d3.select('#right').on('click', function() { core.endEpisode(want === 'right' ? 1.0 : -1.0, true); });
}""")
# a task the package lacks; its own 1500 s timer; all-or-nothing like AgentTuning's click-checkboxes
PAGE_TICK = _HEAD.format(title="Tick", area='<div id="boxes"></div><button id="subbtn">Submit</button>',
                         script="""core.EPISODE_MAX_TIME = 1500000;
var genProblem = function() {
  var names = ['alpha', 'beta', 'gamma'], want = {}, asked = [];
  var div = d3.select('#boxes'); div.html('');
  names.forEach(function(n) {
    div.append('label').html('<input type="checkbox" id="ch-' + n + '">' + n);
    want[n] = core.randf(0, 1) < 0.5;
    if (want[n]) asked.push(n);
  });
  d3.select('#query').html('Select ' + (asked.join(', ') || 'nothing') + ' and click Submit.');
  d3.select('#subbtn').on('click', function() {
    var right = names.every(function(n) { return d3.select('#ch-' + n)[0][0].checked === want[n]; });
    core.endEpisode(right ? 1.0 : -1.0, true);
  });
}""")


def test_pages_dir_serves_user_pages_over_the_package(env, tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "click-test.html").write_text(PAGE_PICK)
    (pages / "tick-all.html").write_text(PAGE_TICK)
    e = serve.envs.load("miniwob", pages_dir=str(pages), task_names=["click-test", "tick-all", "click-button"],
                        episodes_per_task=3)
    e.pool = env.pool  # reuse the module's browser
    assert len(e.tasks()) == 9 and not e.skipped and e.episode_time_limit_s is None
    plain = serve.envs.load("miniwob", task_names=["tick-all"], episodes_per_task=1)
    assert plain.tasks() == [] and "no page tick-all.html in the miniwob package" in plain.skipped["tick-all/0"]
    root, package = page_root(str(pages)), page_root(None)
    real = lambda *parts: os.path.realpath(os.path.join(root, *parts))  # noqa: E731
    assert real("miniwob", "click-test.html") == str((pages / "click-test.html").resolve())
    assert real("miniwob", "click-button.html") == os.path.join(package, "miniwob", "click-button.html")
    assert real("core", "core.js") == os.path.join(package, "core", "core.js")
    assert page_root(str(pages)) == root  # built once per process

    e.reset("click-test/0")  # the user's page, not the package's; no timer of its own: RCI's 1000 s
    assert e._js("return core.EPISODE_MAX_TIME;") == 1000000
    assert e.utterance == "Press the right button."  # seeded: the same problem every run
    wrong = find(task_area(e.dom), lambda n: n.get("id") == "left")[0]
    r = e.step(f"Action: click({wrong['ref']})")
    assert r.done and r.reward == 0.0 and r.info["success"] is False and r.info["raw_reward"] == -1.0

    e.reset("tick-all/1")  # the page's own timer is kept
    assert e._js("return core.EPISODE_MAX_TIME;") == 1500000
    assert e.utterance == "Select alpha, beta and click Submit."
    for n in ("alpha", "beta"):
        box = find(task_area(e.dom), lambda node, n=n: node.get("id") == f"ch-{n}")[0]
        assert not e.step(f"Action: click({box['ref']})").done
    submit = find(task_area(e.dom), lambda n: n.get("id") == "subbtn")[0]
    r = e.step(f"Action: click({submit['ref']})")
    assert r.done and r.reward == 1.0 and r.info["success"] is True and r.info["raw_reward"] == 1.0

    e.reset("tick-all/2")  # all-or-nothing: ticking one box too many is a failure, not partial credit
    assert e.utterance == "Select beta, gamma and click Submit."
    for n in ("alpha", "beta", "gamma"):  # two right, one wrong: partial credit would be > 0
        e.step(f"Action: click({find(task_area(e.dom), lambda node, n=n: node.get('id') == f'ch-{n}')[0]['ref']})")
    r = e.step(f"Action: click({find(task_area(e.dom), lambda n: n.get('id') == 'subbtn')[0]['ref']})")
    assert r.done and r.reward == 0.0 and r.info["raw_reward"] == -1.0

    assert run_episode(e, "click-button/0").reward == 1.0  # the package's page through the overlay
    assert env.pool.started == 1


def test_bad_actions_get_feedback_and_wrong_answer_fails(env):
    env.reset("enter-text/0")
    r = env.step("Action: click(999)")
    assert not r.done and r.info["invalid"] == "invalid_action" and "no element [999]" in r.observation
    r = env.step("I will type now")
    assert not r.done and r.info["invalid"] == "invalid_format"
    r = env.step('Action: type(5, "surely wrong")')
    assert not r.done and 'value="surely wrong"' in r.observation
    r = env.step("Action: click(6)")  # submit the wrong text
    assert r.done and r.status == Status.COMPLETED and r.reward == 0.0
    assert r.info["success"] is False and r.info["raw_reward"] == -1.0 and r.info["env_reward"] <= 0


def test_turn_limit_is_a_failure(env):
    short = env.spawn()
    short.max_turns = 1
    short.reset("enter-text/1")
    r = short.step('Action: type(5, "x")')
    assert r.done and r.status == Status.TURN_LIMIT and r.reward == 0.0


def test_paper_score_counts_successful_episodes(env):
    eps = [{"task_id": "click-test/0", "reward": 1.0}, {"task_id": "click-test/1", "reward": 0.0},
           {"task_id": "enter-text/0", "reward": 1.0}, {"task_id": "login-user/0", "reward": 1.0}]
    report = env.paper_score(eps)
    assert report["metric"] == "success_rate" and report["score"] == 75.0 and report["successes"] == 3
    assert report["tasks"]["click-test"] == {"n": 2, "success_rate": 50.0} and report["n"] == 4


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
