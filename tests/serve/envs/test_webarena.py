"""WebArena in real headless Chromium against a small shop served on 127.0.0.1: WebArena-format
tasks (string_match, url_match, program_html, login state, fuzzy_match with a local judge), the
accessibility-tree observation, the action parser, WebArena's early stops, and the gold expert."""

import copy
import importlib.util
import json
import pathlib
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import serve.envs
from serve.envs.base import EnvError, Status, run_episode
from serve.envs.webarena_actions import Action, describe, early_stop, parse_reply
from serve.envs.webarena_axtree import Window, attach_boxes, in_window, layout_boxes, render
from serve.envs.webarena_eval import Judge, string_match, url_match
from serve.envs.webarena_tasks import EXAMPLES, INTRO

SITE = pathlib.Path(__file__).parent / "webarena_site"
TASKS, GOLD, AUTH = str(SITE / "tasks.json"), str(SITE / "gold_actions.json"), str(SITE / "auth")
REAL = "http://onestopmarket.com"
BROWSER = shutil.which("chromium") and shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not BROWSER, reason="no chromium/chromedriver (Debian: chromium chromium-driver)")


def _load_site():
    spec = importlib.util.spec_from_file_location("webarena_test_site", SITE / "shop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint answering WebArena's fuzzy-match question by word overlap."""

    requests: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        m = re.match(r'Given the statement "(.*)", would it be correct to infer "(.*)"\? Yes or No$',
                     body["messages"][-1]["content"], re.S)
        yes = bool(m) and set(m.group(2).lower().split()) <= set(m.group(1).lower().split())
        reply = {"choices": [{"message": {"role": "assistant", "content": "Yes" if yes else "No"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def shop():
    server, base = _load_site().serve()
    yield base
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def env(shop, judge):
    e = serve.envs.load("webarena", TASKS, sites={"shopping": shop}, auth_dir=AUTH, gold_actions=GOLD,
                        judge={"base_url": judge, "model": "judge-model"}, settle_s=0, html_wait_s=0,
                        max_browsers=1)
    yield e
    e.shutdown()


# ---------------------------------------------------------------------- tasks (no browser)


def test_tasks_sites_placeholders_and_skips(shop, tmp_path, monkeypatch):
    monkeypatch.delenv("SHOPPING", raising=False)
    e = serve.envs.load("webarena", TASKS, sites={"shopping": shop + "/"}, auth_dir=AUTH)
    assert e.tasks() == ["0", "1", "2", "3", "4"] and e.splits() == {"test": ["0", "1", "2", "3", "4"]}
    assert e.skipped == {"5": "fuzzy_match needs an LLM judge: set option judge {base_url, model} "
                              "(or fuzzy_without_judge: zero)"}
    cfg = e.task("1").data["config"]
    assert cfg["start_url"] == shop and cfg["eval"]["reference_url"] == f"{shop}/search?q=teapot |OR| {shop}/search?q=teapots"
    assert e.task("2").data["config"]["eval"]["program_html"][0]["url"] == f"{shop}/wishlist"
    assert e.task("3").data["storage_state"] == str(SITE / "auth" / "shopping_state.json")
    assert e.to_real == {shop: REAL} and e.to_local == {REAL: shop}
    assert "5" in serve.envs.load("webarena", TASKS, sites={"shopping": shop}, auth_dir=AUTH,
                                  fuzzy_without_judge="zero").tasks()

    none = serve.envs.load("webarena", TASKS)  # no URL for the site: every task says how to give one
    assert none.tasks() == [] and none.skipped["0"] == "no URL for site(s) shopping (option sites.shopping or $SHOPPING)"
    monkeypatch.setenv("SHOPPING", shop[len("http://"):])  # WebArena's environment variable, as its README writes it
    assert serve.envs.load("webarena", TASKS, auth_dir=AUTH).task("0").data["config"]["start_url"] == shop

    no_auth = serve.envs.load("webarena", TASKS, auth_dir=str(tmp_path))
    assert "3" not in no_auth.tasks() and "prepare.sh" in no_auth.skipped["3"]
    assert serve.envs.load("webarena", TASKS, auth_dir=str(tmp_path), login=False).task("3").data["storage_state"] is None

    # a config_files folder of <n>.json (WebArena's generated files), {SITE} placeholders, bad records
    records = json.loads(pathlib.Path(TASKS).read_text())
    folder = tmp_path / "config_files"
    folder.mkdir()
    good = copy.deepcopy(records[0])
    good["start_url"] = "{SHOPPING}/products"
    no_intent = {k: v for k, v in records[1].items() if k != "intent"}
    bad_type = copy.deepcopy(records[4])
    bad_type["eval"]["eval_types"] = ["string_match", "screenshot_match"]
    evil = copy.deepcopy(records[2])
    evil["eval"]["program_html"][0]["locator"] = "func:__import__('os').system('true')"
    for i, rec in enumerate([good, no_intent, bad_type, evil]):
        rec["task_id"] = i
        (folder / f"{i}.json").write_text(json.dumps(rec))
    f = serve.envs.load("webarena", str(folder), sites={"shopping": shop})
    assert f.tasks() == ["0"] and f.task("0").data["config"]["start_url"] == shop + "/products"
    assert f.skipped["1"] == "field 'intent' must be a non-empty string"
    assert "['screenshot_match'] not supported" in f.skipped["2"]
    assert "func: expressions may only call" in f.skipped["3"]
    for bad in ({"evaluator": "v2"}, {"fuzzy_without_judge": "maybe"}, {"judge": {"model": "x"}},
                {"sites": {"shoping": shop}}):
        with pytest.raises(EnvError):
            serve.envs.load("webarena", TASKS, **bad)


# ---------------------------------------------------------------------- parser, early stops (no browser)


def test_action_parser_follows_webarena():
    say = "Let's think step-by-step. In summary, the next action I will perform is ```{}```".format
    assert parse_reply(say("click [12]")) == Action("click", element_id="12", raw=say("click [12]"))
    assert parse_reply(say("type [5] [hello world]")).text == "hello world\n"  # Enter by default
    assert parse_reply(say("type [5] [a [b] c] [0]")).text == "a [b] c"
    assert parse_reply(say("press [enter]")).text == "Enter" and parse_reply(say("press [Ctrl+a]")).text == "Ctrl+a"
    assert parse_reply(say("scroll [down]")).direction == "down" and parse_reply(say("scroll up")).direction == "up"
    assert parse_reply(say("tab_focus [2]")).tab == 2 and parse_reply(say("go_back")).kind == "go_back"
    assert parse_reply(say("stop")).text == "" and parse_reply(say("stop [N/A]")).text == "N/A"
    assert parse_reply(say("goto [http://onestopmarket.com/p?q=1]"), {REAL: "http://127.0.0.1:9"}).text == \
        "http://127.0.0.1:9/p?q=1"
    for bad in ("I will click the link", "```click [abc]```", "```jump [3]```", "``````",
                "```\nclick [3]\n```", say("scroll [direction=down]"), say("type [5]")):
        assert parse_reply(bad).kind == "none", bad
    assert describe(parse_reply("oops"), {}) == (
        'The previous prediction you issued was "oops". However, the format was incorrect. Ensure that the action '
        "is wrapped inside a pair of ``` and enclose arguments within [] as follows: ```action [arg] ...```.")
    nodes = {"7": {"text": "[7] link 'Blue Mug'"}}
    assert describe(parse_reply("```click [7]```"), nodes) == "click [7] where [7] is link 'Blue Mug'"
    assert describe(parse_reply("```click [8]```"), nodes).startswith('Attempt to perfom "click" on element "[8]"')
    assert describe(parse_reply("```tab_focus [1]```"), nodes) == "page_focus [1]"

    click, none, typing = Action("click", "7"), Action("none"), Action("type", "5", "x")
    assert early_stop([click] * 29, 30, 3, 3) == "Same action for 3 times"
    assert early_stop([Action("scroll", direction=d) for d in "down up down".split()] * 10, 30, 3, 3) == \
        "Reach max steps 30"
    assert early_stop([click, none, none, none], 30, 3, 3) == "Failed to parse actions for 3 times"
    assert early_stop([typing, click, typing, click, Action("type", "5", "y")], 30, 3, 3) == \
        "Same typing action for 3 times"
    assert early_stop([click, click, Action("click", "8")], 30, 3, 3) == ""


def test_accessibility_tree_rendering():
    """Viewport filtering on subtree boxes, hidden empty nodes, StaticText de-duplication."""
    snapshot = {"documents": [{"nodes": {"parentIndex": [-1, 0, 1, 1, 3, 1], "backendNodeId": [1, 2, 3, 4, 5, 6]},
                               "layout": {"nodeIndex": [0, 1, 2, 3, 4, 5],
                                          "bounds": [[0, 0, 1280, 720], [0, 0, 1280, 2000], [8, 8, 100, 20],
                                                     [8, 40, 100, 20], [8, 40, 50, 20], [8, 1500, 100, 20]]}}]}

    def ax(i, role, name, children=(), backend=None, props=(), parent=None):
        return {"nodeId": str(i), "role": {"value": role}, "name": {"value": name}, "childIds": [str(c) for c in children],
                "backendDOMNodeId": backend, "parentId": parent,
                "properties": [{"name": k, "value": {"value": v}} for k, v in props]}

    nodes = [ax(1, "RootWebArea", "Shop", [2], 1, [("focused", True), ("url", "http://x/")]),
             ax(2, "generic", "", [3, 4, 7, 8, 6], 2, parent=1),
             ax(3, "heading", "Shop", [30], 3, [("level", 1)], parent=2),
             ax(30, "StaticText", "Shop", [31], 3, parent=3),
             ax(31, "InlineTextBox", "Shop", parent=30),
             ax(4, "link", "Mug's page", [5], 4, [("focusable", True)], parent=2),
             ax(5, "StaticText", "Mug's page", [], 5, parent=4),
             ax(6, "button", "Far away", [], 6, parent=2),
             ax(7, "image", "", [], 4, parent=2), ax(8, "image", "logo", [], 4, parent=2)]
    top = in_window(attach_boxes(nodes, layout_boxes(snapshot)), Window(0, 0, 1280, 720))
    text, info = render(top)
    assert text == "[1] RootWebArea 'Shop' focused: True\n\t[3] heading 'Shop'\n\t[4] link \"Mug's page\"\n\t[8] img 'logo'"
    assert info["4"]["bound"] == [8, 40, 100, 20] and "6" not in info
    scrolled, _ = render(in_window(attach_boxes(nodes, layout_boxes(snapshot)), Window(0, 1400, 1280, 720)))
    assert scrolled == "[1] RootWebArea 'Shop' focused: True\n\t[6] button 'Far away'"


def test_evaluators_in_both_versions():
    task = {"intent": "q", "eval": {"eval_types": ["string_match"],
                                    "reference_answers": {"exact_match": "$12.99", "must_include": []}}}
    assert string_match(task, '"$12.99"', "agenttuning", None) == 1.0
    assert string_match(task, " $12.99", "agenttuning", None) == 0.0  # AgentTuning's copy does not strip
    assert string_match(task, " $12.99", "webarena", None) == 1.0
    inc = {"intent": "q", "eval": {"reference_answers": {"must_include": ["0"]}}}
    assert string_match(inc, "10 items", "agenttuning", None) == 1.0  # substring
    assert string_match(inc, "10 items", "webarena", None) == 0.0  # one-character reference: a token
    assert string_match(inc, "0 items", "webarena", None) == 1.0
    fuzzy = {"intent": "q", "eval": {"reference_answers": {"fuzzy_match": ["x"]}}}
    with pytest.raises(RuntimeError, match="needs an LLM judge"):
        string_match(fuzzy, "x", "agenttuning", None)
    url = {"eval": {"reference_url": "http://h/search?q=mug |OR| http://h/find", "url_note": "EXACT"}}
    assert url_match(url, "http://h/search?q=mug/", "agenttuning") == 1.0
    assert url_match(url, "http://h/search?q=mug&page=2", "agenttuning") == 0.0
    assert url_match(url, "http://h/search?page=2&q=mug", "webarena") == 1.0  # base path + query parameters
    gold = {"eval": {"reference_url": "http://h/product/mug", "url_note": "GOLD in PRED"}}
    assert url_match(gold, "http://h/product/mug#reviews", "agenttuning") == 1.0
    assert Judge.from_option("http://judge/v1/", "agenttuning").model == "gpt-3.5-turbo"
    assert Judge.from_option({"base_url": "http://j"}, "webarena").model == "gpt-4-1106-preview"


# ---------------------------------------------------------------------- episodes in Chromium


@needs_browser
def test_expert_solves_every_task(env, judge):
    _Judge.requests.clear()
    episodes = {tid: run_episode(env, tid) for tid in env.tasks()}
    for tid, ep in episodes.items():
        assert (ep.reward, ep.status, ep.info["success"]) == (1.0, Status.COMPLETED, True), (tid, ep.info)
    assert {tid: ep.turns for tid, ep in episodes.items()} == {"0": 3, "1": 2, "2": 5, "3": 2, "4": 3, "5": 3}
    assert episodes["4"].info["eval_string_match"] == 1.0 and episodes["4"].info["eval_url_match"] == 1.0
    assert episodes["2"].info["eval_program_html"] == 1.0
    assert env.pool.started == 1  # one browser, reused
    # the fuzzy_match judge got AgentTuning's question about the lower-cased answer
    (req,) = _Judge.requests
    assert req["model"] == "judge-model" and req["temperature"] == 0 and req["max_tokens"] == 16
    assert req["messages"] == [{"role": "system", "content": "You are a helpful assistant"},
                               {"role": "user", "content": 'Given the statement "it has 3 reviews", would it be '
                                                           'correct to infer "3 reviews"? Yes or No'}]
    assert env.paper_score([{"task_id": t, "reward": e.reward} for t, e in episodes.items()])["score"] == 100.0

    opening = episodes["0"].messages[:7]
    assert [m["role"] for m in opening] == ["user", "assistant"] * 3 + ["user"]
    assert opening[0]["content"] == INTRO and opening[1]["content"] == "Ok." and opening[2]["content"] == EXAMPLES[0][0]
    first = opening[6]["content"]
    assert first.startswith("OBSERVATION:\nTab 0 (current): One Stop Market\n\n[") and "RootWebArea 'One Stop Market' focused: True" in first
    assert re.search(r"^\t\t\[\d+\] searchbox 'Search'$", first, re.M) and "InlineTextBox" not in first and "url:" not in first
    assert first.endswith("URL: http://onestopmarket.com/\nOBJECTIVE: What is the price of the Blue Ceramic Mug?\n"
                          "PREVIOUS ACTION: None")
    step2 = episodes["0"].messages[8]["content"]
    assert re.search(r"PREVIOUS ACTION: type \[\d+\] \[blue mug\n\] where \[\d+\] is searchbox 'Search'$", step2)
    assert "URL: http://onestopmarket.com/search?q=blue+mug" in step2
    # current-viewport observation: the last product appears only after scrolling twice
    vase = [m["content"].split("\nURL: ")[0] for m in episodes["2"].messages[6::2]]
    assert ["link 'Ceramic Vase'" in v for v in vase[:4]] == [False, False, True, False]
    assert "Tab 0 (current): My Account" in episodes["3"].messages[8]["content"]  # the login state's cookie
    assert "emma.lopez@example.com" in episodes["3"].messages[8]["content"]


@needs_browser
def test_bad_output_and_wrong_answers(env):
    env.reset("0")
    r = env.step("I think the price is on the page.")
    assert not r.done and r.info["invalid"] == "invalid_format" and r.observation.startswith("OBSERVATION:\nTab 0")
    assert 'PREVIOUS ACTION: The previous prediction you issued was "I think the price is on the page."' in r.observation
    r = env.step("In summary, the next action I will perform is ```click [987654]```")
    assert not r.done and r.info["invalid"] == "invalid_action"
    assert r.observation.endswith('PREVIOUS ACTION: Attempt to perfom "click" on element "[987654]" but no matching '
                                  "element found. Please check the observation more carefully.")
    for _ in range(2):
        assert not env.step("```scroll [direction=down]```").done  # WebArena's parser rejects this form
    r = env.step("no action here")
    assert r.done and r.status == Status.INVALID_FORMAT and r.reward == 0.0
    assert r.info["early_stop"] == "Failed to parse actions for 3 times" and r.info["answer"] == "Early stop: Failed to parse actions for 3 times"

    env.reset("0")
    r = env.step("The price is $99. In summary, the next action I will perform is ```stop [$99.00]```")
    assert (r.done, r.status, r.reward, r.info["answer"]) == (True, Status.COMPLETED, 0.0, "$99.00")
    env.reset("2")  # nothing added to the (fresh) wish list: program_html fails
    r = env.step("```stop []```")
    assert (r.reward, r.info["eval_program_html"]) == (0.0, 0.0)

    cut = env.spawn()  # observations are cut to max_obs_tokens (here 10 tokens of ~4 characters)
    cut.max_obs_tokens, cut.obs_tokenizer = 10, "chars"
    first = cut.reset("1")[-1]["content"]
    observation = first.split("\nURL: ")[0]
    assert observation.startswith("OBSERVATION:\nTab 0 (current): One Stop Market\n\n[")
    assert len(observation) == len("OBSERVATION:\n") + 40 and first.endswith("PREVIOUS ACTION: None")
    cut.close()


@needs_browser
def test_early_stops_score_the_final_state(env):
    """As run.py: an early stop is scored like a stop (answer "Early stop: ..."), so a URL task can pass."""
    env.reset("1")
    search = re.search(r"\[(\d+)\] searchbox 'Search'", env.history[-1]["content"]).group(1)
    env.step(f"```type [{search}] [teapot]```")
    assert not env.step("```scroll [down]```").done and not env.step("```scroll [down]```").done
    r = env.step("```scroll [down]```")
    assert (r.done, r.status, r.reward, r.info["early_stop"]) == (True, Status.REPETITION, 1.0, "Same action for 3 times")

    short = env.spawn()  # a copy for concurrent episodes, here with a shorter step limit
    short.max_turns = 2
    short.reset("1")
    search = re.search(r"\[(\d+)\] searchbox 'Search'", short.history[-1]["content"]).group(1)
    short.step(f"```type [{search}] [teapot]```")
    r = short.step("```go_back```")
    assert (r.status, r.reward, r.info["early_stop"]) == (Status.TURN_LIMIT, 0.0, "Reach max steps 2")
    short.close()


@needs_browser
def test_tabs_keys_and_navigation(env, shop):
    env.reset("4")
    obs = env.step("```new_tab```").observation
    assert obs.startswith("OBSERVATION:\nTab 0: One Stop Market | Tab 1 (current): \n\n") and "URL: about:blank" in obs
    obs = env.step(f"```goto [{REAL}/products]```").observation
    assert "Tab 1 (current): All Products" in obs and f"URL: {REAL}/products\n" in obs
    assert "URL: about:blank" in env.step("```go_back```").observation
    assert f"URL: {REAL}/products\n" in env.step("```go_forward```").observation
    obs = env.step("```tab_focus [0]```").observation
    assert "Tab 0 (current): One Stop Market | Tab 1: All Products" in obs and "PREVIOUS ACTION: page_focus [0]" in obs
    obs = env.step("```close_tab```").observation
    assert obs.startswith("OBSERVATION:\nTab 0 (current): All Products\n\n")
    search = re.search(r"\[(\d+)\] searchbox 'Search'", obs).group(1)
    obs = env.step(f"```type [{search}] [green teapot] [0]```").observation
    assert f"URL: {REAL}/products\n" in obs  # [0]: no Enter
    obs = env.step("```press [enter]```").observation
    assert f"URL: {REAL}/search?q=green+teapot" in obs and "PREVIOUS ACTION: press [Enter]" in obs
    link = re.search(r"\[(\d+)\] link 'Green Teapot'", obs).group(1)
    assert "PREVIOUS ACTION: hover" in env.step(f"```hover [{link}]```").observation
    env.step(f"```click [{link}]```")
    r = env.step("```stop [TEA-002]```")
    assert r.reward == 1.0 and r.info["url"] == f"{shop}/product/green-teapot"


@needs_browser
def test_judge_failure_is_a_task_error(env):
    broken = env.spawn()
    broken.judge = Judge(base_url="http://127.0.0.1:9/v1", retries=1, timeout_s=2)
    ep = run_episode(broken, "5")
    assert ep.status == Status.TASK_ERROR and ep.reward == 0.0 and "judge" in ep.messages[-1]["content"]


@needs_browser
def test_sessions_are_fresh_and_load_login_state(env, shop):
    """Each episode starts like WebArena's new browser context: no cookies or storage from before,
    then the record's Playwright storage state (cookies and localStorage)."""
    browser = env.pool.acquire()
    try:
        state = json.loads((SITE / "auth" / "shopping_state.json").read_text())
        state["origins"] = [{"origin": shop, "localStorage": [{"name": "nickname", "value": "emma_l"}]}]
        browser.new_session(state)
        browser.open([shop + "/account"])
        obs = browser.observe()
        assert "StaticText 'Welcome, Emma Lopez!'" in obs and "StaticText 'Nickname: emma_l'" in obs
        browser.new_session()
        browser.open([shop + "/account"])
        obs = browser.observe()
        assert "StaticText 'Please sign in to see your account.'" in obs and "Emma" not in obs
        assert browser.evaluate("localStorage.getItem('nickname')") is None and browser.tabs == [browser.driver.current_window_handle]
    finally:
        env.pool.release(browser)
