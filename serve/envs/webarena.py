"""WebArena (held-out): web tasks on WebArena's self-hosted sites in headless Chromium.

Protocol of AgentTuning's ``eval_heldout/webarena`` (WebArena's ``run.py`` with
``p_cot_id_actree_2s``, ``eval-tgi.sh``: all 812 tasks of ``test.raw.json``):

* Tasks: WebArena ``config_files`` records (``serve/envs/webarena_tasks.py``): a folder of
  ``<n>.json`` files, or a JSON list (``test.raw.json``), site placeholders filled from option
  ``sites`` / environment variables ``SHOPPING``, ``SHOPPING_ADMIN``, ``REDDIT``, ``GITLAB``,
  ``WIKIPEDIA``, ``MAP``, ``HOMEPAGE``. A task is skipped, with the reason, when a site it uses
  has no URL, its login state file is missing (``auth_dir``), it needs the ``fuzzy_match`` LLM
  judge and none is configured (``judge``; or ``fuzzy_without_judge: zero`` scores it 0), or it
  needs the shop's admin API without ``accounts``.
* Each step the agent sees WebArena's CoT prompt turn: ``OBSERVATION`` (tab list + accessibility
  tree of the current viewport, 1280×720, element ids = accessibility node ids, cut to
  ``max_obs_tokens`` = 1920 tokens), ``URL`` (local sites shown under their real-world names,
  e.g. ``http://onestopmarket.com``), ``OBJECTIVE`` and ``PREVIOUS ACTION`` (WebArena's
  description of the last action, or its format reminder). The opening turns are the intro, "Ok.",
  and the two examples, as AgentTuning laid them out for Llama models.
* The agent answers with reasoning and ``In summary, the next action I will perform is
  ```<action>```: ``click [id]``, ``type [id] [text] [0|1]``, ``hover [id]``, ``press [keys]``,
  ``scroll [down|up]``, ``new_tab``, ``tab_focus [i]``, ``close_tab``, ``goto [url]``,
  ``go_back``, ``go_forward``, ``stop [answer]`` (``serve/envs/webarena_actions.py``).
* The episode ends at ``stop``, or at WebArena's early stops — 30 actions (status
  ``turn_limit``), 3 unparseable replies in a row (``invalid_format``), the same action 3 times in
  a row / typing into one field 3 times (``repetition``) — and is then scored by the task's
  evaluators (``serve/envs/webarena_eval.py``) on the final browser state, with the stop answer
  (``Early stop: ...`` for early stops), exactly as ``run.py`` scores every episode. reward = 1.0
  when the score is 1, else 0.0; the reported number is the success rate over tasks ×100.

Unparseable replies and actions on element ids that are not on the page do not end the episode
(WebArena runs them as no-ops and says so in PREVIOUS ACTION); they are reported with statuses
``invalid_format`` / ``invalid_action`` in ``info["invalid"]``. The browser: see
``serve/envs/webarena_browser.py``; browsers are pooled per replica (``max_browsers``).
The scripted expert plays per-task gold action lists (option ``gold_actions``; elements named by
role and name, e.g. ``click [link 'Blue Mug']``, resolved to the current ids), else, for tasks
judged only by answer/URL, the oracle path (``goto`` the reference URL, ``stop`` with the
reference answer). Details and deviations: docs/env_webarena.md.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

from serve.envs.base import (Env, EnvError, InvalidAction, InvalidFormat, Status, StepResult, Task, data_file,
                             read_json, register)
from serve.envs.pool import BackendPool, PooledBackendMixin
from serve.envs.webarena_actions import ANSWER_PHRASE, Action, describe, early_stop, map_urls, parse_reply
from serve.envs.webarena_browser import ActionFailed, Browser
from serve.envs.webarena_eval import VERSIONS, Helpers, Judge, JudgeError, evaluate
from serve.envs.webarena_tasks import (SITE_VARS, TEMPLATE, check_record, helpers_used, load_storage_state,
                                       needs_judge, needs_shop_api, opening_messages, read_records, resolve_record,
                                       site_urls, storage_state_file, url_mappings)

log = logging.getLogger(__name__)

DEFAULT_FILE = "webarena/test.raw.json"
_GOLD_ELEMENT = re.compile(r"^(click|hover|type)\s*\[([A-Za-z]+) ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\](.*)$", re.S)
_tokenizer: Any = None  # tiktoken's cl100k_base once loaded; False when it cannot be


def _cl100k() -> Any:
    global _tokenizer
    if _tokenizer is None:
        try:
            import tiktoken

            _tokenizer = tiktoken.get_encoding("cl100k_base")
        except Exception as exc:  # noqa: BLE001 — not installed, or its BPE file cannot be downloaded
            log.warning("webarena: tiktoken's cl100k_base unavailable (%s); observations are cut at "
                        "4 characters per token", exc)
            _tokenizer = False
    return _tokenizer or None


def _truncate_tokens(text: str, limit: Optional[int], unit: str) -> str:
    """WebArena's ``tokenizer.decode(tokenizer.encode(obs)[:max_obs_length])`` with tiktoken's
    cl100k_base (GPT-4's, which AgentTuning used for its Llama models too); ``auto`` falls back
    to ~4 characters per token when tiktoken cannot load (offline)."""
    if not limit:
        return text
    tok = None if unit == "chars" else _cl100k()
    if tok is None:
        if unit == "tiktoken":
            raise EnvError("webarena: obs_tokenizer 'tiktoken' is unavailable (pip install tiktoken; it downloads "
                           "cl100k_base on first use)")
        return text[:4 * limit]
    return tok.decode(tok.encode(text)[:limit])


@register("webarena")
class WebArenaEnv(PooledBackendMixin, Env):
    """WebArena tasks in pooled headless Chromium browsers; see the module docstring."""

    default_max_turns = 30  # run.py --max_steps
    metric = "success_rate"
    # WebArena prompts with the opening turns and the current step only (each step repeats the
    # objective and names the previous action): a policy honouring this sends
    # history[:n_open - 1] + history[-(2 * k + 1):] with k = prompt_history_turns.
    prompt_history_turns: Optional[int] = 0

    def __init__(self, path: Optional[str] = None, *, sites: Optional[Mapping[str, str]] = None,
                 auth_dir: Optional[str] = None, login: bool = True, judge: Any = None,
                 fuzzy_without_judge: str = "skip", evaluator: str = "agenttuning",
                 accounts: Optional[Mapping[str, Mapping[str, str]]] = None,
                 gold_actions: Union[str, Mapping[str, List[Any]], None] = None, map_urls: bool = True,
                 viewport_width: int = 1280, viewport_height: int = 720, viewport_only: bool = True,
                 max_obs_tokens: Optional[int] = 1920, obs_tokenizer: str = "auto",
                 parsing_failure_th: int = 3, repeating_action_th: int = 3, settle_s: float = 2.5,
                 html_wait_s: float = 3.0, max_browsers: int = 4, step_timeout_s: float = 300.0,
                 eval_timeout_s: float = 900.0, page_load_timeout_s: float = 120.0, **options: Any) -> None:
        if evaluator not in VERSIONS:
            raise EnvError(f"webarena: option 'evaluator' must be one of {VERSIONS}, got {evaluator!r}")
        if fuzzy_without_judge not in ("skip", "zero"):
            raise EnvError("webarena: option 'fuzzy_without_judge' must be 'skip' or 'zero'")
        if obs_tokenizer not in ("auto", "tiktoken", "chars"):
            raise EnvError("webarena: option 'obs_tokenizer' must be 'auto', 'tiktoken' or 'chars'")
        if obs_tokenizer == "tiktoken":
            _truncate_tokens("", 1, "tiktoken")  # fail now, not in the first episode
        self.sites = site_urls(sites)
        self.to_real = url_mappings(self.sites) if map_urls else {}
        self.to_local = {real: local for local, real in self.to_real.items()}
        self.auth_dir = auth_dir or os.environ.get("WEBARENA_AUTH_DIR")
        self.login, self.version = bool(login), evaluator
        self.judge = Judge.from_option(judge, evaluator)
        self.fuzzy_without_judge = fuzzy_without_judge
        admin = dict((accounts or {}).get("shopping_site_admin") or {})
        self.helpers = Helpers(self.sites.get("shopping", ""),
                               admin.get("username") or os.environ.get("WEBARENA_SHOPPING_ADMIN_USERNAME", ""),
                               admin.get("password") or os.environ.get("WEBARENA_SHOPPING_ADMIN_PASSWORD", ""))
        if isinstance(gold_actions, str):
            gold_actions = read_json(gold_actions, "webarena", "gold action file")
        if gold_actions is not None and not isinstance(gold_actions, Mapping):
            raise EnvError("webarena: option 'gold_actions' must map task ids to lists of actions")
        self.gold = {str(k): list(v) for k, v in (gold_actions or {}).items()}
        self.viewport = (int(viewport_width), int(viewport_height))
        self.viewport_only = bool(viewport_only)
        self.max_obs_tokens, self.obs_tokenizer = max_obs_tokens, obs_tokenizer
        self.parsing_failure_th, self.repeating_action_th = int(parsing_failure_th), int(repeating_action_th)
        self.settle_s, self.html_wait_s = float(settle_s), float(html_wait_s)
        self.step_timeout_s, self.eval_timeout_s = step_timeout_s, eval_timeout_s
        # WebArena's own early stops replace the base class's text-equality repetition check, and
        # unparseable replies are no-op turns (ended after 3 in a row by early_stop, not by a count).
        options.setdefault("repetition_k", 0)
        options.setdefault("max_invalid", 10 ** 6)
        super().__init__(path, **options)
        width, height = self.viewport
        self.pool: BackendPool = BackendPool(
            "webarena", lambda: Browser(width, height, page_load_timeout_s), lambda b: b.close(),
            alive=lambda b: b.alive(), max_size=int(max_browsers))

    # ------------------------------------------------------------------ tasks

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        if path is None:
            try:
                path = data_file(DEFAULT_FILE)
            except EnvError:
                raise EnvError("webarena: no task file given and data/webarena/test.raw.json is absent: pass "
                               "WebArena's config_files folder or its test.raw.json as path "
                               "(docs/env_webarena.md)") from None
        records, task_dir = read_records(path)
        tasks = []
        for i, rec in enumerate(records):
            tid = str(rec.get("task_id", i))
            reason = check_record(rec)
            if reason:
                self.skip(tid, reason)
                continue
            config, missing = resolve_record(rec, self.sites)
            if missing:
                self.skip(tid, "no URL for site(s) " + ", ".join(f"{s} (option sites.{s} or ${SITE_VARS[s]})"
                                                                 for s in missing))
                continue
            try:
                helpers_used(config)
            except EnvError as exc:
                self.skip(tid, str(exc))
                continue
            if needs_shop_api(config) and not (self.helpers.admin_user and self.helpers.admin_password):
                self.skip(tid, "program_html calls the shop's admin REST API: set option "
                               "accounts.shopping_site_admin {username, password}")
                continue
            if needs_judge(config) and self.judge is None and self.fuzzy_without_judge == "skip":
                self.skip(tid, "fuzzy_match needs an LLM judge: set option judge {base_url, model} "
                               "(or fuzzy_without_judge: zero)")
                continue
            state = None
            if self.login and config.get("storage_state"):
                state = storage_state_file(str(config["storage_state"]), self.auth_dir, task_dir)
                if state is None:
                    self.skip(tid, f"login state {config['storage_state']} not found: create it with WebArena's "
                                   "prepare.sh and set option auth_dir (or $WEBARENA_AUTH_DIR)")
                    continue
            tasks.append(Task(tid, {"config": config, "storage_state": state}, split="test"))
        return tasks

    # ------------------------------------------------------------------ episode

    def _prompt(self, observation: str, previous: str) -> str:
        obs = _truncate_tokens(observation, self.max_obs_tokens, self.obs_tokenizer)
        return TEMPLATE.format(observation=obs, url=map_urls(self._backend.url, self.to_real),
                               objective=self.current.data["config"]["intent"], previous_action=previous)

    def _begin(self, task: Task) -> str:
        cfg, browser = task.data["config"], self._backend
        state = load_storage_state(task.data["storage_state"]) if task.data["storage_state"] else None
        browser.new_session(state, cfg.get("geolocation"))
        browser.open(u.strip() for u in str(cfg["start_url"]).split(" |AND| "))
        time.sleep(self.settle_s)
        return browser.observe(self.viewport_only)

    def start(self, task: Task) -> List[Dict[str, Any]]:
        self._checkout()
        self.actions: List[Action] = []
        observation = self._call(self._begin, task)
        return opening_messages(self._prompt(observation, "None"))

    def _run(self, action: Action) -> str:
        """Execute (a no-op for unparseable replies), wait, observe; WebArena's ``env.step``."""
        fail = ""
        if action.kind != "none":
            try:
                self._backend.execute(action)
            except ActionFailed as exc:
                fail = str(exc)
            except Exception as exc:  # noqa: BLE001 — WebArena: any failure of the action is a no-op step
                if not self._browser_ok():
                    raise
                fail = f"{type(exc).__name__}: {exc}"
        time.sleep(self.settle_s)
        self._observation = self._backend.observe(self.viewport_only)
        return fail

    def _browser_ok(self) -> bool:
        try:
            return bool(self._backend.alive())
        except Exception:  # noqa: BLE001 — a browser that cannot run a script is gone
            return False

    def act(self, action: str) -> StepResult:
        parsed = parse_reply(action, self.to_local)
        if parsed.kind == "stop":
            return self._finish(parsed.text, Status.COMPLETED, "")
        seen = self._backend.nodes
        fail = self._call(self._run, parsed)
        self.actions.append(parsed)
        prompt = self._prompt(self._observation, describe(parsed, seen))
        reason = early_stop(self.actions, self.max_turns, self.parsing_failure_th, self.repeating_action_th)
        if reason:
            status = (Status.TURN_LIMIT if reason.startswith("Reach") else
                      Status.INVALID_FORMAT if reason.startswith("Failed") else Status.REPETITION)
            return self._finish(f"Early stop: {reason}", status, reason)
        if parsed.kind == "none":
            raise InvalidFormat(prompt)
        if parsed.kind in ("click", "hover", "type") and parsed.element_id not in seen:
            raise InvalidAction(prompt)
        return StepResult(prompt, info={"fail_error": fail} if fail else {})

    def _finish(self, answer: str, status: Status, reason: str) -> StepResult:
        """Score the final state with WebArena's evaluators (every episode, early stops included)."""
        cfg = self.current.data["config"]
        unjudged = False
        try:
            score, parts = self._call(self._evaluate, cfg, answer, timeout_s=self.eval_timeout_s)
        except JudgeError:
            if self.judge is not None or not needs_judge(cfg):
                raise
            score, parts, unjudged = 0.0, {"string_match": 0.0}, True  # fuzzy_without_judge: zero
        success = score == 1.0
        ending = f"The episode is over ({reason})" if reason else "The episode is over"
        info: Dict[str, Any] = {"success": success, "score": score, "answer": answer,
                                "url": self._backend.url, "early_stop": reason}
        info.update({f"eval_{k}": v for k, v in parts.items()})
        if unjudged:
            info["fuzzy_unjudged"] = True
        return StepResult(f"{ending}: the task {'succeeded' if success else 'failed'}.",
                          reward=1.0 if success else 0.0, done=True, status=status, info=info)

    def _evaluate(self, cfg: Dict[str, Any], answer: str) -> Any:
        return evaluate(cfg, answer, self._backend, version=self.version, judge=self.judge, helpers=self.helpers,
                        html_wait_s=self.html_wait_s)

    # ------------------------------------------------------------------ expert

    def expert_action(self) -> str:
        """The next gold action as a CoT reply; the oracle path for answer/URL-only tasks."""
        tid = self.current.id
        if tid in self.gold:
            steps = self.gold[tid]
            if len(self.actions) >= len(steps):
                raise EnvError(f"webarena: the gold actions of task {tid} are used up after {len(steps)} steps")
            step = steps[len(self.actions)]
            thought, text = (step.get("thought", ""), step["action"]) if isinstance(step, Mapping) else ("", step)
        else:
            thought, text = "", self._oracle_action()
        text = self._resolve_element(map_urls(resolve_record({"a": str(text)}, self.sites)[0]["a"], self.to_real))
        return f"Let's think step-by-step. {thought or _default_thought(text)} {ANSWER_PHRASE} ```{text}```"

    def _oracle_action(self) -> str:
        ev = self.current.data["config"]["eval"]
        if "program_html" in ev["eval_types"]:
            raise EnvError(f"webarena: task {self.current.id} is checked by program_html: the expert needs its gold "
                           "actions (option gold_actions)")
        if "url_match" in ev["eval_types"] and not self.actions:
            return f"goto [{str(ev['reference_url']).split(' |OR| ')[0]}]"
        refs = ev.get("reference_answers") or {}
        if "exact_match" in refs:
            return f"stop [{refs['exact_match']}]"
        if refs.get("must_include"):
            return f"stop [{', '.join(refs['must_include'])}]"
        fuzzy = refs.get("fuzzy_match")
        if fuzzy:
            return f"stop [{fuzzy if isinstance(fuzzy, str) else fuzzy[0]}]"
        return "stop []"

    def _resolve_element(self, text: str) -> str:
        """``click [link 'Blue Mug']`` → ``click [<id>]`` with the id it has in the current observation."""
        m = _GOLD_ELEMENT.match(text.strip())
        if not m:
            return text
        kind, role, name = m.group(1), m.group(2), ast.literal_eval(m.group(3))
        head = f"{role} {name!r}"
        for node_id, node in self._backend.nodes.items():
            if str(node["text"]).split(" ", 1)[1:] and str(node["text"]).split(" ", 1)[1].startswith(head):
                return f"{kind} [{node_id}]{m.group(4)}"
        raise EnvError(f"webarena: gold action {text!r}: no {head} in the current observation of task "
                       f"{self.current.id}")

    # ------------------------------------------------------------------ reported metric

    def paper_score(self, episodes: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
        """AgentTuning's WebArena number: successful episodes / episodes ×100, with per-site rates."""
        by_site: Dict[str, List[float]] = {}
        n = wins = 0
        for ep in episodes:
            ok = 1.0 if float(ep["reward"]) > 0 else 0.0
            n, wins = n + 1, wins + ok
            sites = self.task(str(ep["task_id"])).data["config"].get("sites") or ["?"]
            by_site.setdefault("+".join(sites), []).append(ok)
        return {"metric": self.metric, "score": 100 * wins / n if n else 0.0, "n": n, "successes": int(wins),
                "sites": {s: {"n": len(v), "success_rate": 100 * sum(v) / len(v)} for s, v in sorted(by_site.items())}}


def _default_thought(action: str) -> str:
    kind = action.split("[")[0].split()[0] if action.strip() else ""
    if kind == "stop":
        return "I think I have achieved the objective. I will issue the stop action with the answer."
    if kind == "goto":
        return "The page I need can be reached directly by its URL."
    if kind == "scroll":
        return "The element I need is not in the current view, so I will scroll."
    if kind == "type":
        return "I will type the text into the field."
    return "This element leads towards the objective."
