"""MiniWoB++ (held-out): the PyPI ``miniwob`` task pages in headless Chromium, driven by element refs.

Tasks are ``<task-name>/<seed>``: ``task_names`` (default: the 46 task names listed by
AgentTuning's held-out MiniWoB++ evaluation, ``available_tasks.txt``) × ``episodes_per_task`` seeds;
``path`` may instead name a JSON list of such ids. Each episode loads the task page from the
package, seeds its generator (``Math.seedrandom``), uses the package's ``test`` data mode and lifts
the page's 10-second episode timer (an LLM turn takes longer; ``episode_time_limit_s``).

Observation: the task's instruction and a text rendering of the task area's DOM, one element per
line, indented by depth::

    [5] input_text #tt value=""
    [6] button #subbtn .secondary-action "Submit"

Actions (one per turn, after ``Action:``; a bare action line is accepted too):
``click(<ref>)`` clicks the element; ``type(<ref>, "<text>")`` clicks it, selects its content
(Ctrl+A) and types the text, so it replaces what was there;
``press("<key>")`` presses a key (``Enter``, ``Tab``, ``Backspace``, ... or ``C-a`` style
combinations). Reward: the task's own raw reward clipped to [0, 1] (MiniWoB gives -1 for a
failed episode); ``info["raw_reward"]`` keeps it unclipped.

Needs Debian's ``chromium`` and ``chromium-driver`` (or ``MINIWOB_CHROME_BINARY`` and
``MINIWOB_CHROMEDRIVER``). Browsers are pooled per replica (``max_browsers``), reused across
episodes, replaced when dead, and a step over ``step_timeout_s`` ends the episode with
``task_error`` and discards that browser. The scripted expert solves the tasks in
``serve.envs.miniwob_expert.SOLVERS``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from serve.envs.pool import BackendPool, PooledBackendMixin
from serve.envs.base import Env, EnvError, InvalidAction, InvalidFormat, StepResult, Task, read_json, register
from serve.envs.miniwob_expert import SOLVERS, expert_action_for

log = logging.getLogger(__name__)

# AgentTuning eval_heldout/miniwob++/available_tasks.txt
AGENTTUNING_TASKS = (
    "choose-list click-button-sequence click-button click-checkboxes-large click-checkboxes-soft "
    "click-checkboxes-transfer click-checkboxes click-collapsible-2 click-collapsible click-color "
    "click-dialog-2 click-dialog click-link click-menu click-option click-scroll-list click-shades "
    "click-shape click-tab-2-hard click-tab-2 click-tab click-test-2 click-test click-widget count-shape "
    "email-inbox-forward-nl-turk email-inbox-forward-nl email-inbox-nl-turk email-inbox enter-date "
    "enter-password enter-text-dynamic enter-text enter-time focus-text-2 focus-text grid-coordinate "
    "login-user navigate-tree search-engine simple-algebra social-media-all social-media-some "
    "social-media terminal use-spinner"
).split()

INSTRUCTION = """You operate a web page to complete a task. Each turn you see the task and the page's elements, one per line as "[ref] tag #id .class "text" value=..." (indented by nesting).
Answer with one line "Thought: <your reasoning>" and one line "Action: <action>", where the action is one of:
click(<ref>)            click the element with that ref
type(<ref>, "<text>")   click the element and type the text into it (replacing its content)
press("<key>")          press a key: Enter, Tab, Backspace, Delete, Escape, Up, Down, Left, Right, or a combination like C-a (Ctrl+A)
Example: Action: type(5, "hello")"""

_ACTION = re.compile(r"Action\s*:\s*(.+)", re.I)
_CALL = re.compile(r'^(click|type|press)\s*\(\s*(.*?)\s*\)\s*$', re.I | re.S)
_TYPE_ARGS = re.compile(r'^\[?(\d+)\]?\s*,\s*(["\'])(.*)\2$', re.S)
_SPECIAL_KEYS = {"enter", "tab", "backspace", "delete", "escape", "up", "down", "left", "right",
                 "home", "end", "pageup", "pagedown", "space"}


# ---------------------------------------------------------------------- observation


def render_dom(node: Dict[str, Any], depth: int = 0, out: Optional[List[str]] = None) -> List[str]:
    """``core.getDOMInfo()`` tree → one line per element: ref, tag, id, classes, text, value."""
    out = [] if out is None else out
    parts = [f"[{node['ref']}]", str(node["tag"]).lower()]
    if node.get("id"):
        parts.append("#" + str(node["id"]))
    classes = str(node.get("classes") or "").split()
    parts += ["." + c for c in classes[:3]]
    text = node.get("text")
    if text and not node.get("children"):
        parts.append(json.dumps(str(text)[:200], ensure_ascii=False))
    if node.get("value") is not None and str(node["tag"]).upper().startswith(("INPUT", "TEXTAREA", "SELECT")):
        parts.append(f"value={json.dumps(str(node['value']), ensure_ascii=False)}")
    if node.get("focused"):
        parts.append("(focused)")
    out.append("  " * depth + " ".join(parts))
    for child in node.get("children") or []:
        render_dom(child, depth + 1, out)
    return out


def find(node: Dict[str, Any], pred: Any) -> List[Dict[str, Any]]:
    """All elements of the DOM tree (pre-order) satisfying ``pred``."""
    hits = [node] if pred(node) else []
    for child in node.get("children") or []:
        hits += find(child, pred)
    return hits


def task_area(dom: Dict[str, Any]) -> Dict[str, Any]:
    """The ``#area`` element (the task itself; the instruction is shown separately)."""
    area = find(dom, lambda n: n.get("id") == "area")
    return area[0] if area else dom


def parse_action(text: str) -> Tuple[str, Any]:
    """(kind, argument): ``("click", ref)``, ``("type", (ref, text))``, ``("press", key)``."""
    matches = _ACTION.findall(text)
    line = matches[-1].strip() if matches else text.strip()
    call = _CALL.match(line)
    if not call:
        raise InvalidFormat('Write one action: Action: click(<ref>), Action: type(<ref>, "<text>") '
                            'or Action: press("<key>").')
    kind, arg = call.group(1).lower(), call.group(2)
    if kind == "click":
        if not arg.strip("[]").isdigit():
            raise InvalidFormat(f"click needs an element ref number, got {arg!r}.")
        return kind, int(arg.strip("[]"))
    if kind == "type":
        m = _TYPE_ARGS.match(arg)
        if not m:
            raise InvalidFormat(f'type needs a ref and a quoted text, like type(5, "hello"); got {arg!r}.')
        return kind, (int(m.group(1)), m.group(3))
    key = arg.strip().strip("\"'")
    if not key:
        raise InvalidFormat("press needs a key, like press(\"Enter\").")
    return kind, key


def _selenium_key(key: str) -> str:
    """Our key names → miniwob's syntax (``<Enter>``, ``C-a``)."""
    mods = ""
    while len(key) > 2 and key[1] == "-" and key[0] in "CSAM":
        mods, key = mods + key[:2], key[2:]
    if key.lower() in _SPECIAL_KEYS:
        names = {"pageup": "PageUp", "pagedown": "PageDown"}
        key = "<" + names.get(key.lower(), key.capitalize()) + ">"
    return mods + key


# ---------------------------------------------------------------------- browser


def _browser_paths() -> Tuple[str, str]:
    binary = os.environ.get("MINIWOB_CHROME_BINARY") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver")
    if not binary or not driver:
        raise EnvError("miniwob needs a headless Chromium and its driver: install the Debian packages "
                       "chromium and chromium-driver (apt-get install -y chromium chromium-driver), or set "
                       "MINIWOB_CHROME_BINARY and MINIWOB_CHROMEDRIVER")
    return binary, driver


def _start_browser() -> Any:
    binary, driver_path = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise EnvError(f"miniwob needs the PyPI package 'miniwob' (pip install miniwob): {exc}") from None
    opts = webdriver.ChromeOptions()
    for arg in ("headless=new", "disable-gpu", "no-sandbox", "disable-dev-shm-usage", "window-size=500,500",
                "disable-extensions", "no-first-run"):
        opts.add_argument(arg)
    opts.binary_location = binary
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_script_timeout(10)
    driver.set_page_load_timeout(20)
    return driver


def _browser_alive(driver: Any) -> bool:
    driver.execute_script("return 1;")
    return True


@register("miniwob")
class MiniWoBEnv(PooledBackendMixin, Env):
    """MiniWoB++ tasks in pooled headless Chromium browsers."""

    default_max_turns = 15

    def __init__(self, path: Optional[str] = None, *, task_names: Optional[Sequence[str]] = None,
                 episodes_per_task: int = 5, first_seed: int = 0, data_mode: str = "test",
                 episode_time_limit_s: float = 3600.0, max_browsers: int = 4,
                 step_timeout_s: float = 30.0, **options: Any) -> None:
        from miniwob.selenium_instance import HTML_DIR  # only the page files; no browser yet

        self.html_dir = os.path.join(str(HTML_DIR), "miniwob")
        self.task_names = list(task_names or AGENTTUNING_TASKS)
        self.episodes_per_task, self.first_seed = int(episodes_per_task), int(first_seed)
        self.data_mode, self.episode_time_limit_s = data_mode, float(episode_time_limit_s)
        self.step_timeout_s = step_timeout_s
        options.setdefault("max_invalid", options.get("max_turns") or self.default_max_turns)
        super().__init__(path, **options)
        self.pool: BackendPool = BackendPool("miniwob", _start_browser, lambda d: d.quit(),
                                             alive=_browser_alive, max_size=int(max_browsers))

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        if path:
            ids = read_json(path, "miniwob", "task list")
            if not isinstance(ids, list):
                raise EnvError(f"miniwob: {path} must hold a JSON list of '<task>/<seed>' ids")
            ids = [str(i) for i in ids]
        else:
            seeds = range(self.first_seed, self.first_seed + self.episodes_per_task)
            ids = [f"{name}/{seed}" for name in self.task_names for seed in seeds]
        tasks = []
        for tid in ids:
            name, _, seed = tid.rpartition("/")
            if not name or not seed.lstrip("-").isdigit():
                self.skip(tid, "not '<task-name>/<seed>'")
            elif not os.path.isfile(os.path.join(self.html_dir, name + ".html")):
                self.skip(tid, f"the installed miniwob package has no task {name!r}")
            else:
                tasks.append(Task(tid, {"task": name, "seed": int(seed)}, split=self.data_mode))
        return tasks

    # ------------------------------------------------------------------ episode

    def _js(self, script: str) -> Any:
        return self._call(self._backend.execute_script, script)

    def _begin(self, task: str, seed: int) -> None:
        d = self._backend
        d.get(f"file://{self.html_dir}/{task}.html")
        for _ in range(100):  # the page shows its sync cover once its scripts ran
            if d.execute_script("return typeof core !== 'undefined' && !!document.getElementById('sync-task-cover');"):
                break
            time.sleep(0.05)
        d.execute_script(f"Math.seedrandom({json.dumps(str(seed))}); core.setDataMode({json.dumps(self.data_mode)});"
                         f"core.EPISODE_MAX_TIME = {int(self.episode_time_limit_s * 1000)};")
        d.execute_script("core.startEpisodeReal();")
        for _ in range(100):
            if d.execute_script("return WOB_TASK_READY;"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"miniwob task page {task} did not become ready")

    def _observe(self) -> Tuple[str, Dict[str, Any]]:
        utterance = self._js("return core.getUtterance();")
        if isinstance(utterance, dict):
            utterance = utterance.get("utterance", "")
        self.dom = self._js("return core.getDOMInfo();")
        self.utterance = str(utterance)
        return f"Task: {self.utterance}\nPage:\n" + "\n".join(render_dom(task_area(self.dom))), self.dom

    def start(self, task: Task) -> List[Dict[str, Any]]:
        self._checkout()
        self._call(self._begin, task.data["task"], task.data["seed"])
        obs, _ = self._observe()
        return [
            {"role": "user", "content": INSTRUCTION},
            {"role": "assistant", "content": "OK. I'll act on the page one action per turn.", "loss": False},
            {"role": "user", "content": obs},
        ]

    def act(self, action: str) -> StepResult:
        kind, arg = parse_action(action)
        from miniwob.selenium_actions import execute_press_key, execute_type_text

        if kind in ("click", "type"):
            ref = arg if kind == "click" else arg[0]
            if not find(self.dom, lambda n: n.get("ref") == ref):
                raise InvalidAction(f"There is no element [{ref}] on the page.")
            result = self._js(f"return core.elementClick({int(ref)});")
            if result is not True:
                raise InvalidAction(f"Clicking [{ref}] failed: {result}")
            if kind == "type":  # replace the field's content, as a user would with Ctrl+A first
                self._call(execute_press_key, "C-a", self._backend)
                self._call(execute_type_text, arg[1], self._backend)
        else:
            self._call(execute_press_key, _selenium_key(arg), self._backend)
        meta = self._js("return {done: WOB_DONE_GLOBAL, raw_reward: WOB_RAW_REWARD_GLOBAL, reason: WOB_REWARD_REASON};")
        if meta["done"]:
            raw = float(meta["raw_reward"] or 0.0)
            verdict = "succeeded" if raw > 0 else "failed"
            return StepResult(f"The episode is over: the task {verdict} (reward {raw:g}).",
                              reward=max(0.0, min(1.0, raw)), done=True,
                              info={"raw_reward": raw, "reason": str(meta.get("reason"))})
        obs, _ = self._observe()
        return StepResult(obs)

    def expert_action(self) -> str:
        """A scripted solver's next action (tasks in ``SOLVERS``); EnvError for other tasks."""
        task = self.current.data["task"]
        if task not in SOLVERS:
            raise EnvError(f"miniwob: no scripted expert for task {task!r}; have {sorted(SOLVERS)}")
        return expert_action_for(task, self.utterance, task_area(self.dom))
