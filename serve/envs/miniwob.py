"""MiniWoB++ (held-out): MiniWoB++ task pages in headless Chromium, driven by element refs.

Protocol of AgentTuning's ``eval_heldout/miniwob++`` (the RCI agent's harness, ``computergym``):

* Tasks are ``<task-name>/<seed>``: ``task_names`` (default: the 46 names of AgentTuning's
  ``available_tasks.txt``) × ``episodes_per_task`` seeds (default 10, as ``eval-tgi.sh`` runs
  ``--num-episodes 10``) from ``first_seed`` (default 0); ``path`` may instead name a JSON list
  of such ids.
* Pages: by default the PyPI ``miniwob`` package's own task pages. ``pages_dir`` names a folder
  of ``<task>.html`` pages that the user provides (AgentTuning's copy of the pages, from its
  ``computergym`` folder, is the intended use; it is not shipped with this project): they are
  served over the package's ``core``/``common`` files, and tasks the folder lacks keep the
  package's page. AgentTuning's copy scores some tasks differently (e.g. click-checkboxes is
  all-or-nothing there, partial credit in the package): docs/environments_heldout.md.
* Each episode seeds the page's generator (``Math.seedrandom``) and uses data mode ``train``
  (computergym's default ``initial_mode``). Episode timer (``episode_time_limit_s``): with the
  package's pages (timed for humans, 10-30 s) the default is 3600 s; with ``pages_dir``, None
  (default) keeps each page's own timer and, where a page sets none, RCI's core.js default of
  1000 s; a number applies to every page.
* Success (``main.py``): the episode's MiniWoB reward (``WOB_REWARD_GLOBAL``, time-discounted) is
  > 0. reward = 1.0 on success else 0.0, so the mean reward is the success rate; ``info`` keeps
  ``env_reward``, ``raw_reward`` (not time-discounted, −1 … 1) and ``success``. An episode that
  ends without the page finishing (turn limit, bad output) is a failure. The reported number
  (``paper_score``, metric ``"success_rate"``) is successes / episodes over all tasks ×100, as
  ``metrics.py`` counts its episode files.

Observation: the task's instruction and a text rendering of the task area's DOM, one element per
line, indented by depth::

    [5] input_text #tt value=""
    [6] button #subbtn .secondary-action "Submit"

Actions (one per turn, after ``Action:``; a bare action line is accepted too):
``click(<ref>)`` clicks the element; ``type(<ref>, "<text>")`` clicks it, selects its content
(Ctrl+A) and types the text, so it replaces what was there;
``press("<key>")`` presses a key (``Enter``, ``Tab``, ``Backspace``, ... or ``C-a`` style
combinations). The RCI agent's multi-call loop (plan, self-critique, xpath actions) is a policy,
not part of the environment: see docs/environments_heldout.md for that deviation.

Needs Debian's ``chromium`` and ``chromium-driver`` (or ``MINIWOB_CHROME_BINARY`` and
``MINIWOB_CHROMEDRIVER``). Browsers are pooled per replica (``max_browsers``), reused across
episodes, replaced when dead, and a step over ``step_timeout_s`` ends the episode with
``task_error`` and discards that browser. The scripted expert solves the tasks in
``serve.envs.miniwob_expert.SOLVERS``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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
# Where AgentTuning's own copy of the pages lives in THUDM/AgentTuning (for error messages and docs).
AGENTTUNING_PAGES_SOURCE = ("THUDM/AgentTuning eval_heldout/miniwob++/computergym/computergym/miniwob/"
                            "miniwob_interface/html/miniwob")
PACKAGE_CORE_TIMER_MS = 10000  # the miniwob package's core.js default
RCI_CORE_TIMER_MS = 1000000  # AgentTuning's (RCI's) core.js default: 1000 s
PACKAGE_PAGES_TIMER_S = 3600.0  # package pages are timed for humans (10-30 s): far too short for a model

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


# ---------------------------------------------------------------------- pages


_overlays: Dict[str, str] = {}
_overlay_lock = threading.Lock()


def page_root(pages_dir: Optional[str] = None) -> str:
    """A folder laid out like the package's ``html/`` whose ``miniwob/<task>.html`` are the pages
    to serve: the package's own (``pages_dir`` None) or the ``<task>.html`` files of ``pages_dir``.

    A page folder is overlaid on the package's tree (symlinks in a temporary folder, built once
    per process and removed at exit), so its pages' ``../core`` and ``../common`` references
    resolve to the package's files and tasks it lacks keep the package's page.
    """
    try:
        from miniwob.selenium_instance import HTML_DIR
    except ImportError as exc:
        raise EnvError(f"miniwob needs the PyPI package 'miniwob' (pip install miniwob): {exc}") from None
    package = str(HTML_DIR)
    if pages_dir is None:
        return package
    source = os.path.expanduser(str(pages_dir))
    fix = f"(for the paper's pages: a copy of {AGENTTUNING_PAGES_SOURCE}, see docs/environments_heldout.md)"
    if not os.path.isdir(source):
        raise EnvError(f"miniwob: option 'pages_dir' must be a folder of <task>.html pages {fix}; "
                       f"{source!r} is not a folder")
    if not any(entry.endswith(".html") for entry in os.listdir(source)):
        raise EnvError(f"miniwob: option 'pages_dir' {source!r} holds no <task>.html page {fix}")
    source = os.path.realpath(source)
    with _overlay_lock:
        if source not in _overlays:
            root = tempfile.mkdtemp(prefix="agenttuning-miniwob-")
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            for entry in os.listdir(package):
                if entry != "miniwob":
                    os.symlink(os.path.join(package, entry), os.path.join(root, entry))
            os.mkdir(os.path.join(root, "miniwob"))
            for folder in (os.path.join(package, "miniwob"), source):  # the user's pages win
                for entry in os.listdir(folder):
                    link = os.path.join(root, "miniwob", entry)
                    if os.path.lexists(link):
                        os.remove(link)
                    os.symlink(os.path.join(folder, entry), link)
            _overlays[source] = root
        return _overlays[source]


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
    metric = "success_rate"  # paper_score(): successes / episodes over all tasks, x100

    def __init__(self, path: Optional[str] = None, *, task_names: Optional[Sequence[str]] = None,
                 episodes_per_task: int = 10, first_seed: int = 0, data_mode: str = "train",
                 pages_dir: Optional[str] = None, episode_time_limit_s: Optional[float] = None,
                 max_browsers: int = 4, step_timeout_s: float = 30.0, **options: Any) -> None:
        self.pages_dir = pages_dir
        self.html_dir = os.path.join(page_root(pages_dir), "miniwob")
        self.task_names = list(task_names or AGENTTUNING_TASKS)
        self.episodes_per_task, self.first_seed = int(episodes_per_task), int(first_seed)
        self.data_mode = data_mode
        if episode_time_limit_s is None and pages_dir is None:
            episode_time_limit_s = PACKAGE_PAGES_TIMER_S
        # None: each page keeps its own timer (RCI's core.js default where it sets none)
        self.episode_time_limit_s = None if episode_time_limit_s is None else float(episode_time_limit_s)
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
                self.skip(tid, f"no task {name!r}: no page {name}.html in the miniwob package"
                          + (f" or in pages_dir {self.pages_dir!r}" if self.pages_dir else ""))
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
        if self.episode_time_limit_s is not None:
            timer = f"core.EPISODE_MAX_TIME = {int(self.episode_time_limit_s * 1000)};"
        else:  # a page that sets no timer of its own gets RCI's core.js default, not the package's
            timer = (f"if (core.EPISODE_MAX_TIME === {PACKAGE_CORE_TIMER_MS}) "
                     f"core.EPISODE_MAX_TIME = {RCI_CORE_TIMER_MS};")
        d.execute_script(f"Math.seedrandom({json.dumps(str(seed))}); core.setDataMode({json.dumps(self.data_mode)});"
                         + timer)
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
        meta = self._js("return {done: WOB_DONE_GLOBAL, env_reward: WOB_REWARD_GLOBAL, "
                        "raw_reward: WOB_RAW_REWARD_GLOBAL, reason: WOB_REWARD_REASON};")
        if meta["done"]:
            env_reward, raw = float(meta["env_reward"] or 0.0), float(meta["raw_reward"] or 0.0)
            success = env_reward > 0  # main.py: `if rewards[0] > 0: success += 1`
            verdict = "succeeded" if success else "failed"
            return StepResult(f"The episode is over: the task {verdict} (reward {env_reward:g}).",
                              reward=1.0 if success else 0.0, done=True,
                              info={"success": success, "env_reward": env_reward, "raw_reward": raw,
                                    "reason": str(meta.get("reason"))})
        obs, _ = self._observe()
        return StepResult(obs)

    def expert_action(self) -> str:
        """A scripted solver's next action (tasks in ``SOLVERS``); EnvError for other tasks."""
        task = self.current.data["task"]
        if task not in SOLVERS:
            raise EnvError(f"miniwob: no scripted expert for task {task!r}; have {sorted(SOLVERS)}")
        return expert_action_for(task, self.utterance, task_area(self.dom))

    # ------------------------------------------------------------------ reported metric

    def paper_score(self, episodes: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
        """AgentTuning's MiniWoB++ number from finished episodes (``task_id``, ``reward``).

        ``score`` = successful episodes / all episodes over every task, ×100 (``metrics.py``
        counts its ``success``/``fail`` episode files); per-task success rates beside it.
        """
        by_task: Dict[str, List[float]] = {}
        for ep in episodes:
            name = self.task(str(ep["task_id"])).data["task"]
            by_task.setdefault(name, []).append(1.0 if float(ep["reward"]) > 0 else 0.0)
        n = sum(len(v) for v in by_task.values())
        wins = sum(sum(v) for v in by_task.values())
        tasks = {name: {"n": len(v), "success_rate": 100 * sum(v) / len(v)} for name, v in sorted(by_task.items())}
        return {"metric": self.metric, "score": 100 * wins / n if n else 0.0, "n": n, "successes": int(wins),
                "tasks": tasks}
