"""HotpotQA (held-out) as a ReAct environment over a local docstore (distractor setting).

Task file: JSON lines with ``id``, ``question``, ``answer``, ``supporting_facts``
(``[[title, sentence_index], ...]``) and ``context`` (``[[title, [sentences]], ...]``), i.e.
HotpotQA's own record shape; default ``hotpotqa/hotpotqa_easy.jsonl`` (AgentTuning's 100
held-out "easy" questions).

The original ReAct/AgentTuning setup searches live Wikipedia. Offline, each question's docstore
is its own ``context`` paragraphs (HotpotQA's *distractor* setting: the gold paragraphs plus
eight retrieved distractors), so ``Search`` can only find those ten titles and suggests the
closest of them otherwise. Scores are therefore not directly comparable to live-Wikipedia runs.

Agent turns: ``Thought: ...`` then ``Action: Search[entity]`` / ``Lookup[keyword]`` /
``Finish[answer]``. Reward = F1 of the finished answer; ``info["em"]``/``info["f1"]`` carry both
metrics (standard HotpotQA normalisation: lower case, no punctuation, no articles, single
spaces; yes/no/noanswer only match themselves).
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

from serve.envs.base import Env, EnvError, InvalidAction, InvalidFormat, StepResult, Task, data_file, register

DEFAULT_FILE = "hotpotqa/hotpotqa_easy.jsonl"
PAGE_SENTENCES = 5  # Search shows the first sentences of a page, like ReAct's WikiEnv

INSTRUCTION = """Answer a question by interleaving Thought, Action and Observation steps.
Every turn, write one line "Thought: <your reasoning>" and then one line "Action: <action>".
The action is one of:
(1) Search[entity]: looks up the entity in the encyclopedia and shows the first sentences of its page; if there is no such page, it lists similar titles.
(2) Lookup[keyword]: shows the next sentence that contains the keyword in the page found by the last successful Search.
(3) Finish[answer]: gives the final answer (a short phrase) and ends the task.
Take as many steps as you need."""

# A made-up demonstration of the action format (not from the evaluation data).
EXAMPLE: List[Tuple[str, str]] = [
    ("Question: Which river flows through the capital of the country where the Tatra mountains' highest peak lies?",
     "Thought: I need the highest peak of the Tatra mountains and its country.\nAction: Search[Tatra Mountains]"),
    ("Observation: The Tatra Mountains form a natural border between Slovakia and Poland. "
     "Their highest peak, Gerlachovský štít, is in Slovakia.",
     "Thought: The peak is in Slovakia, whose capital is Bratislava. I need the river there.\nAction: Search[Bratislava]"),
    ("Observation: Bratislava is the capital of Slovakia. The city lies on both banks of the Danube.",
     "Thought: The Danube flows through Bratislava.\nAction: Finish[Danube]"),
]

INVALID_FEEDBACK = ("Invalid Action. Write 'Action: ' followed by one of Search[<entity>], "
                    "Lookup[<keyword>] or Finish[<answer>].")
_ACTION = re.compile(r"Action\s*\d*\s*:\s*(.+)", re.I)
_CALL = re.compile(r"^\s*(\w+)\s*\[(.*)\]", re.S)


# ---------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """HotpotQA/SQuAD normalisation: lower case, strip punctuation, articles and extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 of normalised answers (HotpotQA's official definition)."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    # yes/no/noanswer are atomic answers: partial token overlap does not count.
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return 0.0
    pred_toks, ref_toks = pred.split(), ref.split()
    same = sum((Counter(pred_toks) & Counter(ref_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------- docstore


def _sentences(sentences: List[str]) -> List[str]:
    return [s.strip() for s in sentences if s.strip()]


def parse_action(text: str) -> Tuple[str, str]:
    """(kind, argument) from agent text; kind lower-cased. InvalidFormat when no action parses."""
    matches = _ACTION.findall(text)
    candidate = matches[-1] if matches else text.strip().splitlines()[-1] if text.strip() else ""
    call = _CALL.match(candidate.strip().strip("."))
    if not call:
        raise InvalidFormat(INVALID_FEEDBACK)
    return call.group(1).lower(), call.group(2).strip()


@register("hotpotqa")
class HotpotQAEnv(Env):
    """Multi-hop QA with Search/Lookup/Finish over each question's own context paragraphs."""

    default_max_turns = 10  # AgentTuning's ReAct agent: max_steps=10

    def __init__(self, path: Optional[str] = None, **options: Any) -> None:
        # An unparseable turn gets feedback and the episode goes on, as in ReAct's loop.
        options.setdefault("max_invalid", options.get("max_turns") or self.default_max_turns)
        super().__init__(path, **options)

    def load_tasks(self, path: Optional[str]) -> List[Task]:
        path = path or data_file(DEFAULT_FILE)
        tasks: List[Task] = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EnvError(f"hotpotqa: {path}:{lineno}: not JSON: {exc}") from None
                tid = str(rec.get("id", rec.get("_id", f"line{lineno}")))
                missing = [k for k in ("question", "answer", "context") if k not in rec]
                if missing:
                    self.skip(tid, f"record at line {lineno} lacks field(s) {missing}")
                    continue
                if not isinstance(rec["context"], list) or not all(
                        isinstance(c, list) and len(c) == 2 for c in rec["context"]):
                    self.skip(tid, f"record at line {lineno}: 'context' is not [[title, [sentences]], ...]")
                    continue
                tasks.append(Task(tid, rec, split=str(rec.get("level", "dev"))))
        return tasks

    # ------------------------------------------------------------------ episode

    def start(self, task: Task) -> List[Dict[str, Any]]:
        rec = task.data
        self._pages: Dict[str, List[str]] = {str(t): _sentences(s) for t, s in rec["context"]}
        self._page: Optional[str] = None
        self._lookup: Tuple[str, List[str], int] = ("", [], 0)
        self._expert_plan = self._make_expert_plan(rec)
        messages: List[Dict[str, Any]] = [{"role": "user", "content": INSTRUCTION + "\nHere is an example.\n" + EXAMPLE[0][0]}]
        for i, (user, assistant) in enumerate(EXAMPLE):
            if i:
                messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": assistant, "loss": False})
        messages.append({"role": "user", "content": "Now the task.\nQuestion: " + rec["question"]})
        return messages

    def act(self, action: str) -> StepResult:
        kind, arg = parse_action(action)
        if kind == "search":
            return StepResult(self._search(arg))
        if kind == "lookup":
            return StepResult(self._do_lookup(arg))
        if kind == "finish":
            gold = str(self.current.data["answer"])
            em, f1 = exact_match(arg, gold), f1_score(arg, gold)
            verdict = "CORRECT" if em else "INCORRECT"
            return StepResult(f"Answer is {verdict}.", reward=f1, done=True,
                              info={"em": em, "f1": f1, "answer": arg, "gold": gold})
        if kind == "think":
            return StepResult("OK.")
        raise InvalidAction(INVALID_FEEDBACK)

    def _search(self, entity: str) -> str:
        title = self._find_title(entity)
        if title is None:
            similar = difflib.get_close_matches(entity, list(self._pages), n=5, cutoff=0.0)
            return f"Could not find [{entity}]. Similar: {similar}."
        self._page = title
        self._lookup = ("", [], 0)
        return " ".join(self._pages[title][:PAGE_SENTENCES])

    def _find_title(self, entity: str) -> Optional[str]:
        key = normalize_answer(entity)
        for title in self._pages:
            if title == entity or normalize_answer(title) == key:
                return title
        return None

    def _do_lookup(self, keyword: str) -> str:
        if self._page is None:
            return "No page has been found by Search yet, so Lookup has nothing to look in. Search first."
        kw, hits, idx = self._lookup
        if kw != keyword:
            hits = [s for s in self._pages[self._page] if keyword.lower() in s.lower()]
            kw, idx = keyword, 0
        if idx >= len(hits):
            self._lookup = (kw, hits, idx)
            return "No more results."
        self._lookup = (kw, hits, idx + 1)
        return f"(Result {idx + 1} / {len(hits)}) {hits[idx]}"

    # ------------------------------------------------------------------ expert

    @staticmethod
    def _make_expert_plan(rec: Dict[str, Any]) -> List[str]:
        titles: List[str] = []
        for fact in rec.get("supporting_facts") or []:
            if fact and str(fact[0]) not in titles:
                titles.append(str(fact[0]))
        plan = [f"Thought: I should read about {t}.\nAction: Search[{t}]" for t in titles]
        plan.append(f"Thought: I have what I need to answer.\nAction: Finish[{rec['answer']}]")
        return plan

    def expert_action(self) -> str:
        """Search every supporting-fact title, then finish with the gold answer."""
        done_turns = self.turns
        plan = self._expert_plan
        return plan[min(done_turns, len(plan) - 1)]
