"""The ReWOO task sets of AgentTuning's held-out evaluation, and their scoring.

AgentTuning (``eval_heldout/rewoo/eval-tgi.sh``) runs ReWOO's planner/worker/solver on seven
data sets, 50 questions each (``--sample_size 50``, seed 2024: ``df.sample(50,
random_state=2024)``, i.e. the first 50 of ``numpy.random.RandomState(2024).permutation(n)``),
each with its own tool list. The record files and where this project finds them:

=====================  ===========================================  ==============================
data set               tools (eval-tgi.sh)                          default file (``data/``)
=====================  ===========================================  ==============================
hotpot_qa              Wikipedia LLM                                ``hotpotqa/hotpotqa_*.jsonl``
trivia_qa              Wikipedia LLM                                none (Hugging Face hub only)
gsm8k                  LLM WolframAlpha Calculator                  ``gsm8k/train.jsonl``
strategy_qa            Wikipedia LLM WolframAlpha Calculator Google ``rewoo/bigbench/strategy_qa.csv``
physics_question       (same)                                       ``rewoo/bigbench/physics_question.csv``
sports_understanding   (same)                                       ``rewoo/bigbench/sports_understanding.csv``
sotu_qa                LLM Calculator Google SearchSOTU             ``rewoo/SOTU/SOTU_QA.csv``
=====================  ===========================================  ==============================

AgentTuning samples HotpotQA from the *fullwiki train* split on the hub; offline, the pool is the
300 AgentTuning held-out HotpotQA questions already shipped (easy, medium, hard, in that order),
whose distractor ``context`` paragraphs back the offline Wikipedia tool. GSM8K is sampled, as in
AgentTuning (``DataLoader.load`` defaults to ``type="train"``), from the train split.

Scoring follows ReWOO's ``utils/Evaluator.py``: EM and F1 on HotpotQA-normalised text (the
helpers of ``serve/envs/hotpotqa.py``), and ``acc`` from an LLM grader (LangChain's
QAEvalChain, CORRECT/INCORRECT), which is the accuracy AgentTuning reports.
"""

from __future__ import annotations

import ast
import csv
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from agenttuning.jsonl import iter_jsonl
from serve.envs.base import EnvError
from serve.envs.hotpotqa import exact_match, f1_score
from serve.envs.rewoo_tools import ChatEndpoint


@dataclass(frozen=True)
class DatasetSpec:
    """One ReWOO data set: its tool list, the tools it cannot do without, its default files."""

    tools: Tuple[str, ...]
    needs: Tuple[str, ...]  # a task is skipped when one of these cannot run here
    files: Tuple[str, ...]  # data_file() paths, concatenated in order; () = none shipped
    example: str  # which demonstration the planner prompt shows: "knowledge" or "math"


_BIGBENCH_TOOLS = ("Wikipedia", "LLM", "WolframAlpha", "Calculator", "Google")
DATASETS: Dict[str, DatasetSpec] = {  # AgentTuning's order (eval-tgi.sh)
    "hotpot_qa": DatasetSpec(("Wikipedia", "LLM"), ("Wikipedia",),
                             tuple(f"hotpotqa/hotpotqa_{lv}.jsonl" for lv in ("easy", "medium", "hard")),
                             "knowledge"),
    "trivia_qa": DatasetSpec(("Wikipedia", "LLM"), ("Wikipedia",), (), "knowledge"),
    "gsm8k": DatasetSpec(("LLM", "WolframAlpha", "Calculator"), (), ("gsm8k/train.jsonl",), "math"),
    "strategy_qa": DatasetSpec(_BIGBENCH_TOOLS, (), ("rewoo/bigbench/strategy_qa.csv",), "math"),
    "physics_question": DatasetSpec(_BIGBENCH_TOOLS, (), ("rewoo/bigbench/physics_question.csv",), "math"),
    "sports_understanding": DatasetSpec(_BIGBENCH_TOOLS, (), ("rewoo/bigbench/sports_understanding.csv",), "math"),
    "sotu_qa": DatasetSpec(("LLM", "Calculator", "Google", "SearchSOTU"), ("SearchSOTU",),
                           ("rewoo/SOTU/SOTU_QA.csv",), "math"),
}
NOT_SHIPPED = {
    "trivia_qa": "TriviaQA (rc.nocontext) is only on the Hugging Face hub and its Wikipedia tool "
                 "needs live Wikipedia; pass a JSON-lines file with 'question', 'answer' and "
                 "'context' paragraphs as path= to run it",
}


# ---------------------------------------------------------------------- reading


def _read_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    for lineno, rec, _ in iter_jsonl(path, error=EnvError, who="rewoo"):
        yield lineno, rec


def _read_csv(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    with open(path, encoding="utf-8", newline="") as fh:
        for row, rec in enumerate(csv.DictReader(fh)):
            yield row, dict(rec)


def dataset_of_file(path: str) -> Optional[str]:
    """Data set named by a file name (``strategy_qa.csv``, ``SOTU_QA.csv``), if any."""
    stem = re.sub(r"\.(jsonl|json|csv)$", "", path.replace("\\", "/").rsplit("/", 1)[-1].lower())
    return stem if stem in DATASETS else None


def read_records(path: str, dataset: Optional[str]) -> List[Dict[str, Any]]:
    """Records of one task file as ``{"dataset", "key", "where", "raw"}`` in file order.

    JSON lines: ReWOO records (``dataset``, ``question``, ``answer``, optional ``context``,
    ``supporting_facts``, ``tools``) or HotpotQA/GSM8K records as shipped; CSV: BIG-bench
    (``input``, ``target``) or SOTU (``question``, ``answer``) columns. The data set comes from the
    record, then the ``dataset`` option, then the file name, then the record's shape.
    """
    is_csv = path.lower().endswith(".csv")
    reader = _read_csv(path) if is_csv else _read_jsonl(path)
    named = dataset or dataset_of_file(path)
    out = []
    for pos, rec in reader:
        where = f"{path}:{'row ' + str(pos) if is_csv else 'line ' + str(pos)}"
        ds = rec.get("dataset") or named
        if ds is None:
            if "context" in rec and "supporting_facts" in rec:
                ds = "hotpot_qa"
            elif "####" in str(rec.get("answer", "")):
                ds = "gsm8k"
            else:
                raise EnvError(f"rewoo: {where}: cannot tell the data set of this record; add a "
                               f"'dataset' field or pass option dataset= (one of {', '.join(DATASETS)})")
        if ds not in DATASETS:
            raise EnvError(f"rewoo: {where}: unknown data set {ds!r}; known: {', '.join(DATASETS)}")
        key = rec.get("id", rec.get("_id"))
        out.append({"dataset": ds, "key": str(key) if key is not None else str(pos if is_csv else pos - 1),
                    "where": where, "raw": rec})
    return out


def sample(items: Sequence[Any], size: Optional[int], seed: int) -> List[Any]:
    """pandas ``df.sample(size, random_state=seed)`` order; all items, in order, if size covers them."""
    if not size or size >= len(items):
        return list(items)
    return [items[i] for i in np.random.RandomState(seed).permutation(len(items))[:size]]


def make_task_data(dataset: str, raw: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], str]:
    """(task data, "") from a raw record, or (None, what is wrong with it)."""
    question = raw.get("question", raw.get("input"))
    answer = raw.get("answer", raw.get("target"))
    missing = [name for name, val in (("question", question), ("answer", answer)) if val in (None, "")]
    if missing:
        return None, f"lacks field(s) {missing} (BIG-bench CSVs: 'input'/'target')"
    data: Dict[str, Any] = {"dataset": dataset, "question": str(question).strip()}
    if dataset == "trivia_qa" and isinstance(answer, dict):
        answer = answer.get("value", "")  # TriviaQA's answer object, as ReWOO's Evaluator reads it
    if dataset == "gsm8k" and "#### " in str(answer):
        data["solution"] = str(answer)
        answer = str(answer).split("#### ", 1)[1]
    data["answer"] = str(answer).strip()
    if "context" in raw:
        ctx = raw["context"]
        if not isinstance(ctx, list) or not all(isinstance(c, list) and len(c) == 2 and isinstance(c[1], list)
                                                for c in ctx):
            return None, "'context' is not [[title, [sentences]], ...]"
        data["context"] = ctx
    for name in ("supporting_facts", "level", "type"):
        if name in raw:
            data[name] = raw[name]
    tools = raw.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not tools or not all(isinstance(t, str) for t in tools):
            return None, "'tools' must be a non-empty list of tool names"
        data["tools"] = list(tools)
    return data, ""


# ---------------------------------------------------------------------- scoring

_ONE_OF = re.compile(r"^\s*Can be one of\s*(\[.*\])\s*$", re.S)


def gold_answers(answer: str) -> List[str]:
    """Accepted answers: BIG-bench physics targets list them (``Can be one of ['4500 m', '4.5 km']``)."""
    match = _ONE_OF.match(answer)
    if match:
        try:
            options = ast.literal_eval(match.group(1))
        except (ValueError, SyntaxError):
            options = None
        if isinstance(options, (list, tuple)) and options:
            return [str(o) for o in options]
    return [answer]


def em_f1(prediction: str, answer: str) -> Tuple[float, float]:
    """ReWOO's EM and F1 (HotpotQA normalisation), the best over the accepted answers."""
    golds = gold_answers(answer)
    return (max(exact_match(prediction, g) for g in golds), max(f1_score(prediction, g) for g in golds))


JUDGE_PROMPT = """You are grading an answer to a quiz question. Compare the student's answer with the true answer and grade it CORRECT or INCORRECT.
Grade on factual accuracy only: ignore differences in punctuation, wording and phrasing. Extra information is fine as long as nothing in it contradicts the true answer.
Reply with one word: CORRECT or INCORRECT.

QUESTION: {question}
STUDENT ANSWER: {prediction}
TRUE ANSWER: {answer}
GRADE:"""


def judge(endpoint: ChatEndpoint, question: str, prediction: str, answer: str) -> Tuple[float, str]:
    """(1.0 if the grader says CORRECT else 0.0, its raw reply); RuntimeError if unreachable."""
    reply = endpoint.complete(JUDGE_PROMPT.format(question=question, prediction=prediction, answer=answer))
    words = re.sub(r"^\s*GRADE\s*:", "", reply.strip(), flags=re.I).split()
    first = words[0].strip(".,:;!*\"'").upper() if words else ""
    return (1.0 if first == "CORRECT" else 0.0), reply
