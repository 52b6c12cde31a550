"""WebArena's evaluators: ``string_match``, ``url_match``, ``program_html`` (score 1.0 or 0.0).

Two versions of WebArena's ``evaluation_harness`` (option ``evaluator``):

* ``"agenttuning"`` (default) — the copy AgentTuning evaluated with
  (``eval_heldout/webarena/evaluation_harness/evaluators.py``): answers are lower-cased and
  unquoted but not stripped; ``exact_match`` compares, ``must_include`` tests substrings,
  ``fuzzy_match`` asks an LLM ``Given the statement "<answer>", would it be correct to infer
  "<reference>"? Yes or No`` (gpt-3.5-turbo, temperature 0; "Yes" in the reply = match);
  ``url_match`` follows ``url_note`` (``EXACT`` by default: the final URL equals a reference,
  one trailing ``/`` ignored; ``GOLD in PRED``: a reference is a substring of it);
* ``"webarena"`` — the current web-arena-x/webarena harness: answers also stripped,
  single-character ``must_include`` references matched as tokens, ``fuzzy_match`` graded by the
  LLM as correct/incorrect/partially correct and ``"N/A"`` references judged with the
  unachievable-reason prompt against ``string_note``; ``url_match`` compares base path and query
  parameters (``GOLD in PRED``); ``program_html`` un-escapes HTML entities.

``program_html`` targets: ``url`` (``last`` = stay; a URL is opened and ``html_wait_s`` waited,
as WebArena's ``time.sleep(3)``; ``func:...`` computes it), ``locator`` (empty = the page's
HTML; a JavaScript expression ``document....`` / ``[...document....``; ``func:...`` a helper
below), ``required_contents`` (a string with `` |OR| `` alternatives — AgentTuning's format — or
``{"exact_match": ...}`` / ``{"must_include": [...]}`` — the current format; both accepted in
either version). The combination of a task's ``eval_types`` is the product of their scores; it
stops at the first 0 (the product is 0 either way), which spares LLM calls and page loads.

``func:`` expressions are parsed (``ast``), never ``eval``-ed: only the helpers named in
:data:`HELPERS` with literal arguments, ``__page__`` and ``__last_url__``.
"""

from __future__ import annotations

import ast
import html
import json
import logging
import os
import re
import time
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from serve.envs.base import EnvError

log = logging.getLogger(__name__)

VERSIONS = ("agenttuning", "webarena")
EVAL_TYPES = ("string_match", "url_match", "program_html")
HELPERS = ("shopping_get_latest_order_url", "shopping_get_sku_latest_review_author",
           "shopping_get_sku_latest_review_rating", "reddit_get_post_url", "gitlab_get_project_memeber_role")
SHOPPING_API_HELPERS = HELPERS[:3]
JUDGE_MODELS = {"agenttuning": "gpt-3.5-turbo", "webarena": "gpt-4-1106-preview"}


class JudgeError(RuntimeError):
    """The LLM judge could not be reached or answered nonsense."""


# ---------------------------------------------------------------------- LLM judge


@dataclass
class Judge:
    """An OpenAI-compatible chat endpoint used for ``fuzzy_match`` (and ``ua_match``)."""

    base_url: str
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    retries: int = 3
    calls: int = 0

    @classmethod
    def from_option(cls, value: Any, version: str) -> Optional["Judge"]:
        """``judge`` option: None, a base URL, or ``{base_url, model, api_key_env, timeout_s}``."""
        if value in (None, "", False):
            return None
        if isinstance(value, str):
            value = {"base_url": value}
        if not isinstance(value, Mapping) or not value.get("base_url"):
            raise EnvError("webarena: option 'judge' must be an OpenAI-compatible base URL or "
                           "{base_url: ..., model: ..., api_key_env: ...}")
        return cls(base_url=str(value["base_url"]).rstrip("/"), model=str(value.get("model") or JUDGE_MODELS[version]),
                   api_key_env=str(value.get("api_key_env") or "OPENAI_API_KEY"),
                   timeout_s=float(value.get("timeout_s", 60.0)))

    def ask(self, user: str, max_tokens: int) -> str:
        """WebArena's judge call: system "You are a helpful assistant", temperature 0, top_p 1."""
        import requests

        body = {"model": self.model, "temperature": 0, "top_p": 1, "max_tokens": max_tokens,
                "messages": [{"role": "system", "content": "You are a helpful assistant"},
                             {"role": "user", "content": user}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url + "/chat/completions"
        last = ""
        for attempt in range(self.retries):
            try:
                resp = requests.post(url, json=body, headers=headers, timeout=self.timeout_s)
                if resp.status_code == 200:
                    self.calls += 1
                    return str(resp.json()["choices"][0]["message"]["content"])
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code != 429 and resp.status_code < 500:
                    break
            except (requests.RequestException, KeyError, IndexError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < self.retries:
                time.sleep(min(2 ** attempt, 10))
        raise JudgeError(f"webarena: the fuzzy_match judge at {url} failed: {last}")


def llm_fuzzy_match(judge: Judge, pred: str, reference: str, intent: str, version: str) -> float:
    """Does the answer mean the reference? (WebArena's ``llm_fuzzy_match``, per version)."""
    if version == "agenttuning":
        reply = judge.ask(f'Given the statement "{pred}", would it be correct to infer "{reference}"? Yes or No', 16)
        return 1.0 if "Yes" in reply else 0.0
    reply = judge.ask(
        "Help a teacher to grade the answer of a student given a question. Keep in mind that the student may use "
        "different phrasing or wording to answer the question. The goal is to evaluate whether the answer is "
        "semantically equivalent to the reference answer.\n"
        f"question: {intent}\nreference answer: {reference}\n"
        "all the string 'N/A' that you see is a special sequence that means 'not achievable'\n"
        f"student answer: {pred}\nConclude the judgement by correct/incorrect/partially correct.", 768).lower()
    if "partially correct" in reply or "incorrect" in reply:
        return 0.0
    if "correct" not in reply:
        raise JudgeError(f"webarena: the judge's grade is neither correct nor incorrect: {reply[:200]!r}")
    return 1.0


def llm_ua_match(judge: Judge, pred: str, reference: str, intent: str) -> float:
    """Does the reported reason for an unachievable task match the real one? (``llm_ua_match``)."""
    reply = judge.ask(
        f"task: {intent}\nactual unachievable reason: {reference}\nreported unachievable reason: {pred}\n"
        "The task described above is inherently unachievable due to the reason specified under 'actual unachievable "
        "reason'. An individual previously attempted this task and was unable to complete it. They provided a reason "
        "for their failure, which is listed under 'reported unachievable reason'. Your role is to review both the "
        "actual and reported reasons. Determine if the reported reason aligns with the actual reason, even if "
        "implicitly. If the stated reason is in line with the actual reason, respond with 'same'. Otherwise, respond "
        "with 'different'.", 768).lower()
    if "different" in reply:
        return 0.0
    if "same" not in reply:
        raise JudgeError(f"webarena: the judge answered neither same nor different: {reply[:200]!r}")
    return 1.0


# ---------------------------------------------------------------------- string_match


def clean_answer(answer: str, version: str) -> str:
    """Unquote and lower-case (``"webarena"`` also strips whitespace first)."""
    answer = str(answer)
    if version != "agenttuning":
        answer = answer.strip()
    for quote in ("'", '"'):
        if answer.startswith(quote) and answer.endswith(quote):
            answer = answer[1:-1]
            break
    return answer.lower()


def _tokens(text: str) -> List[str]:
    # Stands in for nltk's word_tokenize, used only to test a one-character reference as a token.
    return re.findall(r"\w+|[^\w\s]", text)


def must_include(ref: str, pred: str, version: str, tokenize: bool = False) -> float:
    """Is the reference in the answer? (AgentTuning cleans the answer once, before; WebArena again here.)"""
    ref = clean_answer(ref, version)
    pred = pred if version == "agenttuning" else clean_answer(pred, version)
    if tokenize and len(ref) == 1 and len(_tokens(ref)) == 1:
        return float(ref in _tokens(pred))
    return float(ref in pred)


def string_match(task: Mapping[str, Any], answer: str, version: str, judge: Optional[Judge]) -> float:
    """Score of the ``stop`` answer against ``eval.reference_answers``."""
    ev = task["eval"]
    pred = clean_answer(answer, version)
    score = 1.0
    for approach, value in (ev.get("reference_answers") or {}).items():
        if score == 0.0 and version == "agenttuning":  # later factors cannot raise it (spares LLM calls)
            break
        if approach == "exact_match":
            ours = pred if version == "agenttuning" else clean_answer(pred, version)
            score *= float(ours == clean_answer(value, version))
        elif approach == "must_include":
            for ref in value:
                score *= must_include(ref, pred, version, tokenize=version != "agenttuning" and len(value) == 1)
        elif approach == "fuzzy_match":
            if judge is None:
                raise JudgeError("webarena: fuzzy_match needs an LLM judge (option 'judge')")
            if version != "agenttuning" and value == "N/A":
                score *= float(clean_answer(pred, version) == "n/a")
                if score != 1.0:  # the reason given for an unachievable task, judged by the LLM
                    score = llm_ua_match(judge, pred, str(ev.get("string_note", "")), str(task["intent"]))
            else:
                for ref in ([value] if isinstance(value, str) else value):
                    score *= llm_fuzzy_match(judge, pred, ref, str(task["intent"]), version)
        else:
            raise EnvError(f"webarena: unknown reference_answers approach {approach!r}")
    return score


# ---------------------------------------------------------------------- url_match


def url_match(task: Mapping[str, Any], url: str, version: str) -> float:
    """Score of the final page's URL against ``eval.reference_url`` (`` |OR| `` alternatives)."""
    ev = task["eval"]
    refs = [r for r in str(ev.get("reference_url", "")).split(" |OR| ")]
    if version == "agenttuning":
        def clean(u: str) -> str:
            return u[:-1] if u.endswith("/") else u

        pred, refs = clean(url), [clean(r) for r in refs]
        rule = ev.get("url_note") or "EXACT"
        if rule == "EXACT":
            return float(pred in refs)
        if rule == "GOLD in PRED":
            return float(any(r in pred for r in refs))
        raise EnvError(f"webarena: unknown url_note {rule!r}")

    def split(u: str) -> Tuple[str, Dict[str, List[str]]]:
        parts = urllib.parse.urlparse(u.rstrip("/"))
        return parts.netloc + parts.path, urllib.parse.parse_qs(parts.query)

    pred_base, pred_query = split(url)
    ref_bases, ref_queries = [], defaultdict(set)
    for r in refs:
        base, query = split(r)
        ref_bases.append(base)
        for k, v in query.items():
            ref_queries[k].update(v)
    score = float(any(b in pred_base for b in ref_bases))
    for k, values in ref_queries.items():
        score *= float(any(v in pred_query.get(k, []) for v in values))
    return score


# ---------------------------------------------------------------------- program_html


@dataclass
class Helpers:
    """WebArena's evaluation helper functions; the shopping ones call the shop's REST API."""

    shopping: str = ""  # the shopping site's base URL
    admin_user: str = ""
    admin_password: str = ""
    _token: str = field(default="", repr=False)

    def _shop(self, path: str, params: Optional[Dict[str, str]] = None) -> Any:
        import requests

        if not (self.shopping and self.admin_user and self.admin_password):
            raise EnvError("webarena: this check calls the shopping site's REST API: configure site 'shopping' and "
                           "option accounts.shopping_site_admin {username, password}")
        if not self._token:
            resp = requests.post(f"{self.shopping}/rest/default/V1/integration/admin/token", timeout=60,
                                 json={"username": self.admin_user, "password": self.admin_password})
            resp.raise_for_status()
            self._token = str(resp.json())
        resp = requests.get(f"{self.shopping}{path}", params=params, timeout=60,
                            headers={"Authorization": f"Bearer {self._token}"})
        resp.raise_for_status()
        return resp.json()

    def shopping_get_latest_order_url(self) -> str:
        items = self._shop("/rest/V1/orders", {"searchCriteria[sortOrders][0][field]": "created_at",
                                               "searchCriteria[sortOrders][0][direction]": "DESC",
                                               "searchCriteria[pageSize]": "1"})["items"]
        return f"{self.shopping}/sales/order/view/order_id/{int(items[0]['increment_id'])}/"

    def shopping_get_sku_latest_review_author(self, sku: str) -> str:
        reviews = self._shop(f"/rest/V1/products/{sku}/reviews")
        return str(reviews[-1]["nickname"]) if reviews else ""

    def shopping_get_sku_latest_review_rating(self, sku: str) -> str:
        reviews = self._shop(f"/rest/V1/products/{sku}/reviews")
        return str(reviews[-1]["ratings"][0]["percent"]) if reviews else ""

    @staticmethod
    def reddit_get_post_url(url: str) -> str:
        """``http://host/f/<forum>/<post>/...`` → the post's URL; other URLs unchanged."""
        parts = urllib.parse.urlparse(url)
        path = parts.path.split("/")
        if len(path) < 4 or path[1] != "f":
            return url
        return f"{parts.scheme}://{parts.netloc}/f/{path[2]}/{path[3]}/"

    @staticmethod
    def gitlab_get_project_memeber_role(page: Any, account_name: str) -> str:
        """The role shown for ``@account_name`` on a GitLab project-members page ("" if absent)."""
        script = ("(() => { const a = [...document.querySelectorAll(\"td[data-label='Account'] "
                  "span.gl-avatar-labeled-sublabel\")].findIndex(e => e.outerText === " + json.dumps("@" + account_name)
                  + "); return document.querySelectorAll('td.col-max-role span')[a].outerText; })()")
        try:
            return str(page.evaluate(script))
        except Exception:  # noqa: BLE001 — WebArena: a page without the member gives an empty role
            return ""


def helper_calls(expr: str) -> str:
    """The helper name of a ``func:`` expression (EnvError for anything but a known helper call)."""
    return _parse_call(expr)[0]


def _parse_call(expr: str) -> Tuple[str, List[Any]]:
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError as exc:
        raise EnvError(f"webarena: cannot parse func: expression {expr!r}: {exc}") from None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in HELPERS
            and not node.keywords):
        raise EnvError(f"webarena: func: expressions may only call {HELPERS}; got {expr!r}")
    args: List[Any] = []
    for a in node.args:
        if isinstance(a, ast.Constant):
            args.append(a.value)
        elif isinstance(a, ast.Name) and a.id == "__page__":
            args.append(_PAGE)
        else:
            raise EnvError(f"webarena: func: arguments must be literals or __page__; got {expr!r}")
    return node.func.id, args


_PAGE = object()  # stands for the browser page in a parsed call


def call_helper(expr: str, helpers: Helpers, page: Any, last_url: str) -> Any:
    """Run a ``func:`` expression (``__last_url__`` replaced by the page's URL, as WebArena does)."""
    name, args = _parse_call(expr.replace("__last_url__", last_url))
    return getattr(helpers, name)(*[page if a is _PAGE else a for a in args])


def program_html(task: Mapping[str, Any], browser: Any, version: str, helpers: Helpers, wait_s: float) -> float:
    """Score of the pages named by ``eval.program_html`` (``browser``: url, goto, content, evaluate)."""
    score = 1.0
    for target in task["eval"].get("program_html") or []:
        if score == 0.0:
            break
        url = str(target["url"])
        if url.startswith("func"):
            url = str(call_helper(url.split("func:", 1)[1], helpers, browser, browser.url))
        if url != "last":
            browser.goto(url)
            time.sleep(wait_s)
        locator = str(target.get("locator", ""))
        if not locator.strip():
            selected: Any = browser.content()
        elif locator.startswith("document.") or locator.startswith("[...document."):
            for prep in target.get("prep_actions") or []:
                try:
                    browser.evaluate(f"(() => {prep})()")
                except Exception as exc:  # noqa: BLE001 — WebArena ignores failing preparations
                    log.debug("webarena: prep action failed: %s", exc)
            try:
                selected = browser.evaluate(locator)
            except Exception:  # noqa: BLE001 — WebArena: a locator that fails selects nothing
                selected = ""
            selected = "" if not selected else selected
        elif locator.startswith("func:"):
            selected = call_helper(locator.split("func:", 1)[1], helpers, browser, browser.url)
        else:
            raise EnvError(f"webarena: unknown program_html locator {locator!r}")
        selected = str(selected)
        if version != "agenttuning":
            selected = html.unescape(selected)
        score *= _required(target["required_contents"], selected, version)
    return score


def _required(required: Any, selected: str, version: str) -> float:
    if isinstance(required, str):  # AgentTuning's format: alternatives, case-insensitive substring
        page = selected.strip().lower()
        return float(any(alt.strip().lower() in page for alt in required.split(" |OR| ")))
    if "exact_match" in required:
        return float(clean_answer(selected, "webarena") == clean_answer(required["exact_match"], "webarena"))
    if "must_include" in required:
        score = 1.0
        for content in required["must_include"]:
            score *= float(any(must_include(alt, selected, "webarena") for alt in content.split(" |OR| ")))
        return score
    raise EnvError(f"webarena: unknown required_contents {sorted(required)}")


# ---------------------------------------------------------------------- all together


def evaluate(task: Mapping[str, Any], answer: str, browser: Any, *, version: str, judge: Optional[Judge],
             helpers: Helpers, html_wait_s: float) -> Tuple[float, Dict[str, float]]:
    """(score, per-eval-type scores) of a finished episode: the product over ``eval.eval_types``."""
    checks: Dict[str, Callable[[], float]] = {
        "string_match": lambda: string_match(task, answer, version, judge),
        "url_match": lambda: url_match(task, browser.url, version),
        "program_html": lambda: program_html(task, browser, version, helpers, html_wait_s),
    }
    score, parts = 1.0, {}
    for eval_type in task["eval"]["eval_types"]:
        parts[eval_type] = checks[eval_type]()
        score *= parts[eval_type]
        if score == 0.0:
            break
    return score, parts
