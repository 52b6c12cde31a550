"""The ReWOO workers (tools) of the ``rewoo`` environment, each a plain ``run(text) -> evidence``.

Tool semantics follow ReWOO (billxbf/ReWOO ``nodes/Worker.py``, as used by THUDM/AgentTuning's
``eval_heldout/rewoo``); the implementations are this project's own:

* ``Calculator``: a safe arithmetic evaluator (Python ``ast`` walk over numbers, operators and a
  fixed table of math functions; never ``eval``). ReWOO translates the input with an LLM
  (LangChain's LLMMathChain) instead, so natural-language inputs only work here when they contain
  a plain arithmetic expression.
* ``LLM``: one chat turn to an OpenAI-compatible endpoint (``/chat/completions``), temperature 0,
  prefixed with a "respond briefly" instruction (AgentTuning used gpt-3.5-turbo for this tool).
* ``Wikipedia``: offline, over the task's own paragraphs (HotpotQA distractor setting): returns
  the whole paragraph of the best matching title, else ``Could not find [x]. Similar: [...]``,
  as LangChain's Wikipedia docstore answers (first paragraph of the page, or similar titles).
* ``SearchSOTU``: the passage of the 2023 State of the Union address most related to the query
  (BM25 over ~1000-character chunks; ReWOO uses an OpenAI-embedding vector store, k=1).
* ``Google`` (Serper API) and ``WolframAlpha`` (v2 query API) need the internet and a key read
  from an environment variable; without it they answer ``tool unavailable: set $VAR ...``.

A tool failure is evidence text (``LLM tool error: ...``), never an exception: ReWOO's solver
sees whatever the workers returned.
"""

from __future__ import annotations

import ast
import difflib
import logging
import math
import operator
import os
import re
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import requests

from serve.envs.hotpotqa import normalize_answer

log = logging.getLogger(__name__)

UNAVAILABLE = "tool unavailable: "

DESCRIPTIONS: Dict[str, str] = {
    "Wikipedia": "Searches Wikipedia and returns the first paragraph of the best matching page. Useful "
                 "for general knowledge about people, places, organisations, events and other subjects. "
                 "The response can be long and contain irrelevant details. Input should be a search "
                 "query (a page title works best).",
    "LLM": "A pretrained language model like yourself. Useful for general world knowledge, common "
           "sense and reasoning over a given context. Prefer it when you are confident you can solve "
           "the step yourself. Input can be any instruction.",
    "Calculator": "Computes an arithmetic expression (+ - * / ** ^ %, parentheses, sqrt, log, ...). "
                  "Useful for math calculations. Input should be a mathematical expression only.",
    "Google": "Searches Google and returns short snippets from the top results. Useful for short, "
              "specific facts about a topic. Input should be a search query.",
    "WolframAlpha": "The WolframAlpha computational engine. Useful for solving complicated mathematical "
                    "or algebraic equations. Input should be an equation or function.",
    "SearchSOTU": "Searches the 2023 State of the Union address and returns the passage most related "
                  "to the query; it can contain irrelevant text. Input should be a search query.",
}
TOOL_NAMES: Tuple[str, ...] = tuple(DESCRIPTIONS)

LLM_TOOL_INSTRUCTION = "Answer briefly and directly, with no extra words.\n\n"


# ---------------------------------------------------------------------- OpenAI-compatible chat


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint: ``complete(prompt) -> reply text`` (temperature 0)."""

    def __init__(self, url: str, model: str, api_key_env: Optional[str] = None, *,
                 timeout: float = 60.0, max_tokens: int = 256, retries: int = 2) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout, self.max_tokens, self.retries = float(timeout), int(max_tokens), int(retries)

    def complete(self, prompt: str) -> str:
        """The model's reply to one user message; RuntimeError naming the endpoint on failure."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env or "", "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0, "max_tokens": self.max_tokens}
        error = ""
        for _ in range(self.retries + 1):
            try:
                resp = requests.post(self.url, json=body, headers=headers, timeout=self.timeout)
            except requests.RequestException as exc:  # connection refused, timeout: retry
                error = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code >= 500:
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code != 200:  # 4xx will not improve on retry
                raise RuntimeError(f"{self.url}: HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                return str(resp.json()["choices"][0]["message"]["content"] or "")
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise RuntimeError(f"{self.url}: not a chat completion response: {resp.text[:200]}") from exc
        raise RuntimeError(f"{self.url}: {error}")


# ---------------------------------------------------------------------- Calculator

_BINOPS: Dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
}


def _log(x: float, base: float = math.e) -> float:
    return math.log(x, base)


def _factorial(x: float) -> int:
    if x != int(x) or not 0 <= x <= 1000:  # bounded: factorial(10**9) would hang the worker
        raise ValueError("factorial needs an integer between 0 and 1000")
    return math.factorial(int(x))


_FUNCS: Dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "log": _log, "ln": math.log, "log10": math.log10, "log2": math.log2,
    "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin,
    "acos": math.acos, "atan": math.atan, "abs": abs, "round": round, "floor": math.floor,
    "ceil": math.ceil, "min": min, "max": max, "factorial": _factorial,
    "radians": math.radians, "degrees": math.degrees,
}
_CONSTS = {"pi": math.pi, "e": math.e}
_MAX_INT_BITS = 4096  # integer results above this are refused (no multi-second bignum powers)


def _power(base: Any, exp: Any) -> Any:
    if isinstance(base, int) and isinstance(exp, int) and exp >= 0:
        if base not in (0, 1, -1) and exp * max(abs(base).bit_length(), 1) > _MAX_INT_BITS:
            raise OverflowError("result too large")
        return base ** exp
    result = float(base) ** float(exp)
    if isinstance(result, complex):
        raise ValueError("result is not a real number")
    return result


def _eval_node(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in _CONSTS:
            return _CONSTS[node.id]
        raise ValueError(f"unknown name {node.id!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        val = _eval_node(node.operand)
        return val if isinstance(node.op, ast.UAdd) else -val
    if isinstance(node, ast.BinOp):
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        if type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
            and not node.keywords:
        return _FUNCS[node.func.id](*[_eval_node(a) for a in node.args])
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else "?"
        raise ValueError(f"unknown function {name!r}; known: {', '.join(sorted(_FUNCS))}")
    raise ValueError(f"unsupported {type(node).__name__} element")


def _prepare(expr: str) -> str:
    text = expr.strip()
    for old, new in (("^", "**"), ("×", "*"), ("÷", "/"), ("−", "-"), ("[", "("), ("]", ")"),
                     ("{", "("), ("}", ")"), ("$", ""), ("€", ""), ("£", "")):
        text = text.replace(old, new)
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators: 1,000 -> 1000
    text = re.sub(r"(\d+(?:\.\d+)?)%(?![\d(])", r"(\1/100)", text)  # 15% -> (15/100); 7%3 stays mod
    text = re.sub(r"[=?]+\s*$", "", text).strip()  # "2+2 =" / "2+2?"
    return text


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("result is not a number")
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError("result is not a finite number")
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.10g}"
    return str(value)


_ARITH_SPAN = re.compile(r"[\d.\s+\-*/^()%\[\]]+")


def evaluate_arithmetic(expr: str) -> str:
    """The value of an arithmetic expression as text; ValueError saying why it cannot be computed.

    Accepts ``^`` for powers, ``[..]`` as parentheses (ReWOO wraps substituted evidence in
    brackets), thousands separators, ``15%`` as 0.15 and a trailing ``=``/``?``. When the whole
    input does not parse, the longest arithmetic span inside it is tried ("What is 12 * 4?").
    """
    if len(expr) > 1000:
        raise ValueError("expression longer than 1000 characters")
    candidates = [_prepare(expr)]
    spans = [s.strip() for s in _ARITH_SPAN.findall(expr)]
    spans = [s for s in spans if re.search(r"\d", s) and re.search(r"\d\s*[-+*/^%]\s*[\d.(\[]", s)]
    candidates += [_prepare(s) for s in sorted(spans, key=len, reverse=True)[:1]]
    reason = "empty input"
    for text in candidates:
        if not text:
            continue
        try:
            return _format_number(_eval_node(ast.parse(text, mode="eval")))
        except SyntaxError:
            reason = "not an arithmetic expression"
        except (ValueError, TypeError, ZeroDivisionError, OverflowError, ArithmeticError) as exc:
            reason = str(exc) or type(exc).__name__
    raise ValueError(reason)


def calculator(expr: str) -> str:
    """The Calculator tool: the value, or a message saying what input it expects."""
    try:
        return evaluate_arithmetic(expr)
    except ValueError as exc:
        return (f"Calculator could not evaluate {expr.strip()[:200]!r}: {exc}. Input should be an "
                f"arithmetic expression such as (2 * 37 - 10) - 8.")


# ---------------------------------------------------------------------- Wikipedia (offline)


class LocalWikipedia:
    """The Wikipedia tool over one task's paragraphs: ``{title: paragraph}``."""

    def __init__(self, context: Sequence[Sequence[Any]]) -> None:
        self.pages: Dict[str, str] = {}
        for title, sentences in context:
            text = " ".join(str(s).strip() for s in sentences if str(s).strip())
            self.pages[str(title)] = text

    def find(self, query: str) -> Optional[str]:
        """The best matching title: exact, then normalised, containment, then near-spelling."""
        q = query.strip().strip("[]").strip()
        if q in self.pages:
            return q
        key = normalize_answer(q)
        if not key:
            return None
        norm = {t: normalize_answer(t) for t in self.pages}
        for title, n in norm.items():
            if n == key:
                return title
        # Live Wikipedia auto-suggests ("Milhouse" -> "Milhouse Van Houten"): accept a title that
        # contains the query or is contained in it, preferring the most shared words.
        qwords = set(key.split())
        contained = [t for t, n in norm.items() if n and (f" {n} " in f" {key} " or f" {key} " in f" {n} ")]
        if contained:
            return max(contained, key=lambda t: (len(qwords & set(norm[t].split())), -len(norm[t])))
        close = difflib.get_close_matches(key, list(norm.values()), n=1, cutoff=0.85)
        if close:
            return next(t for t, n in norm.items() if n == close[0])
        return None

    def search(self, query: str) -> str:
        title = self.find(query)
        if title is None:
            similar = difflib.get_close_matches(query.strip(), list(self.pages), n=5, cutoff=0.0)
            return f"Could not find [{query.strip()}]. Similar: {similar}"
        return self.pages[title]


# ---------------------------------------------------------------------- SearchSOTU (BM25)


def _tokens(text: str) -> List[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


class PassageSearch:
    """BM25 over ~``chunk_chars``-character passages of one document; ``search`` returns the best."""

    def __init__(self, text: str, chunk_chars: int = 1000) -> None:
        self.chunks: List[str] = []
        current = ""
        for para in re.split(r"\n\s*\n", text):
            para = para.strip()
            if not para:
                continue
            if current and len(current) + len(para) + 2 > chunk_chars:
                self.chunks.append(current)
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if current:
            self.chunks.append(current)
        self._tf = [Counter(_tokens(c)) for c in self.chunks]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = sum(self._len) / max(len(self._len), 1)
        df: Counter = Counter()
        for tf in self._tf:
            df.update(tf.keys())
        n = len(self.chunks)
        self._idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    def search(self, query: str, k1: float = 1.5, b: float = 0.75) -> str:
        if not self.chunks:
            return "No passage found: the document is empty."
        words = _tokens(query)

        def score(i: int) -> float:
            tf, length = self._tf[i], self._len[i]
            return sum(self._idf.get(w, 0.0) * tf[w] * (k1 + 1)
                       / (tf[w] + k1 * (1 - b + b * length / max(self._avg, 1e-9))) for w in words)

        return self.chunks[max(range(len(self.chunks)), key=lambda i: (score(i), -i))]


# ---------------------------------------------------------------------- internet tools


def serper_search(url: str, key: str, query: str, timeout: float) -> str:
    """Google through the Serper API: answer box, knowledge graph, then organic snippets."""
    resp = requests.post(url, json={"q": query}, headers={"X-API-KEY": key}, timeout=timeout)
    resp.raise_for_status()
    data = resp.json()
    box = data.get("answerBox") or {}
    for field in ("answer", "snippet", "snippetHighlighted"):
        if box.get(field):
            val = box[field]
            return " ".join(val) if isinstance(val, list) else str(val)
    parts: List[str] = []
    graph = data.get("knowledgeGraph") or {}
    if graph.get("title") and graph.get("type"):
        parts.append(f"{graph['title']}: {graph['type']}.")
    if graph.get("description"):
        parts.append(str(graph["description"]))
    for name, value in (graph.get("attributes") or {}).items():
        parts.append(f"{graph.get('title', '')} {name}: {value}.".strip())
    parts += [str(r["snippet"]) for r in (data.get("organic") or [])[:10] if r.get("snippet")]
    return " ".join(parts) if parts else "No good Google Search result was found."


def wolfram_query(url: str, appid: str, query: str, timeout: float) -> str:
    """WolframAlpha's v2 query API (JSON): the plaintext of the primary result pod."""
    resp = requests.get(url, params={"appid": appid, "input": query, "output": "json",
                                     "format": "plaintext"}, timeout=timeout)
    resp.raise_for_status()
    pods = (resp.json().get("queryresult") or {}).get("pods") or []
    for pod in pods:
        if pod.get("primary") or pod.get("title") == "Result":
            for sub in pod.get("subpods") or []:
                if sub.get("plaintext"):
                    return str(sub["plaintext"])
    return "WolframAlpha was not able to answer it."


# ---------------------------------------------------------------------- the toolbox


class Toolbox:
    """Runs any ReWOO tool by name with this environment's configuration (shared by episodes).

    ``unavailable(tool, has_pages)`` says why a tool cannot run here (None when it can), which
    the environment uses both for the observation and to skip tasks that need the tool.
    """

    def __init__(self, *, llm_url: Optional[str] = None, llm_model: str = "gpt-3.5-turbo",
                 llm_api_key_env: str = "OPENAI_API_KEY", google_key_env: str = "SERPER_API_KEY",
                 google_url: str = "https://google.serper.dev/search",
                 wolfram_key_env: str = "WOLFRAM_ALPHA_APPID",
                 wolfram_url: str = "https://api.wolframalpha.com/v2/query",
                 sotu_doc: Optional[str] = None, tool_timeout: float = 60.0) -> None:
        self.llm = ChatEndpoint(llm_url, llm_model, llm_api_key_env, timeout=tool_timeout) if llm_url else None
        self.google_key_env, self.google_url = google_key_env, google_url
        self.wolfram_key_env, self.wolfram_url = wolfram_key_env, wolfram_url
        self.timeout = float(tool_timeout)
        self.sotu: Optional[PassageSearch] = None
        self.sotu_doc = sotu_doc
        if sotu_doc:
            try:
                with open(sotu_doc, encoding="utf-8") as fh:
                    self.sotu = PassageSearch(fh.read())
            except OSError as exc:
                raise ValueError(f"option 'sotu_doc': cannot read {sotu_doc}: {exc}") from None

    def unavailable(self, tool: str, has_pages: bool) -> Optional[str]:
        """Why ``tool`` cannot run for a task (``has_pages``: the task carries paragraphs), or None."""
        if tool == "LLM" and self.llm is None:
            return "set option llm_url (an OpenAI-compatible endpoint) and llm_model"
        if tool == "Google" and not os.environ.get(self.google_key_env):
            return f"set ${self.google_key_env} (a Serper API key; option google_key_env names the variable)"
        if tool == "WolframAlpha" and not os.environ.get(self.wolfram_key_env):
            return f"set ${self.wolfram_key_env} (a WolframAlpha AppID; option wolfram_key_env names the variable)"
        if tool == "SearchSOTU" and self.sotu is None:
            return "set option sotu_doc to the State of the Union text (ReWOO data/docs/state_of_the_union.txt)"
        if tool == "Wikipedia" and not has_pages:
            return ("Wikipedia runs offline over a task's own 'context' paragraphs and this task has "
                    "none (live Wikipedia is not supported)")
        if tool not in DESCRIPTIONS:
            return f"unknown tool; known: {', '.join(TOOL_NAMES)}"
        return None

    def run(self, tool: str, tool_input: str, wiki: Optional[LocalWikipedia]) -> Tuple[str, Optional[str]]:
        """(evidence, error): error is set when the tool was unavailable or failed."""
        why = self.unavailable(tool, wiki is not None)
        if why:
            return f"{UNAVAILABLE}{tool}: {why}", why
        try:
            if tool == "Calculator":
                return calculator(tool_input), None
            if tool == "Wikipedia":
                assert wiki is not None  # unavailable() returned a reason otherwise
                return wiki.search(tool_input), None
            if tool == "SearchSOTU":
                assert self.sotu is not None
                return self.sotu.search(tool_input), None
            if tool == "LLM":
                assert self.llm is not None
                return self.llm.complete(LLM_TOOL_INSTRUCTION + tool_input).strip("\n"), None
            if tool == "Google":
                return serper_search(self.google_url, os.environ[self.google_key_env], tool_input, self.timeout), None
            if tool == "WolframAlpha":
                return wolfram_query(self.wolfram_url, os.environ[self.wolfram_key_env], tool_input,
                                     self.timeout), None
        except (requests.RequestException, RuntimeError, ValueError, KeyError) as exc:
            # A broken tool is evidence, as in ReWOO: the solver still gets to answer.
            log.warning("rewoo: tool %s failed: %s", tool, exc)
            return f"{tool} tool error: {exc}", str(exc)
        raise AssertionError(f"unhandled tool {tool}")  # every DESCRIPTIONS name is handled above
