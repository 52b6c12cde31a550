"""MT-Bench (``kind: mtbench``): 80 two-turn questions, single-answer grading by a judge model.

Follows FastChat's ``fastchat/llm_judge`` (``gen_model_answer.py``, ``gen_judgment.py --mode
single``, ``common.py``, ``show_result.py``), which AgentTuning ran with GPT-4 as the judge:

- **Answers**: turn 1 is the first question alone; turn 2 is asked in the same conversation, after
  the model's own turn-1 answer. Sampling temperature per category (FastChat's
  ``temperature_config``): writing and roleplay 0.7, stem and humanities 0.1, the others greedy.
- **Judge prompts**: the templates of ``judge_prompts.jsonl`` (shipped in ``data/mt_bench``), chosen
  by FastChat's rule: questions of the categories that need a reference (math, reasoning, coding)
  use ``single-math-v1`` (turn 1) and ``single-math-v1-multi-turn`` (turn 2) with the GPT-4
  reference answers; the others ``single-v1`` / ``single-v1-multi-turn``. The multi-turn prompts
  show the whole conversation and ask about the second answer. The judge gets the template's
  system prompt and the filled template as one user turn, greedy, up to 2048 tokens.
- **Rating**: the first ``[[x]]`` of the judgment (``\\[\\[(\\d+\\.?\\d*)\\]\\]``), else the first
  ``[x]``; no match (or a judge that kept failing) is -1. The score is the mean of the valid
  ratings of both turns (``show_result.py`` drops -1), reported with each turn's mean.
"""

import ast
import logging
import re
from typing import Any, Callable, Dict, List, Optional

from agenttuning.paths import data_file
from pipelines.scorers import RecordError, parallel_map, read_jsonl

log = logging.getLogger(__name__)

NEED_REF_CATS = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS (arena-hard-200 aside)
ANSWER_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                      "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}  # FastChat's temperature_config
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
JUDGE_PROMPTS = "mt_bench/judge_prompts.jsonl"
REFERENCES = "mt_bench/reference_answer_gpt-4.jsonl"

ChatFn = Callable[[List[Dict[str, str]], float, int], str]  # (messages, temperature, seed) -> reply


def load_questions(path: str) -> List[Dict[str, Any]]:
    """MT-Bench questions ({question_id, category, turns}); each must have two turns (the eval's
    limit is applied by its caller, ``general_eval.load_task``)."""
    out = read_jsonl(path)
    for i, q in enumerate(out):
        for key in ("question_id", "category", "turns"):
            if key not in q:
                raise RecordError(f"{path} record {i}: missing field '{key}'")
        if not isinstance(q["turns"], list) or len(q["turns"]) != 2:
            raise RecordError(f"{path} record {i} (question {q['question_id']}): needs exactly two turns")
    return out


def load_judge_prompts(path: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    """FastChat's judge prompts by name; the four single-answer ones must be there."""
    path = path or data_file(JUDGE_PROMPTS)
    prompts = {r["name"]: r for r in read_jsonl(path)}
    for name in ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"):
        if name not in prompts:
            raise RecordError(f"{path}: judge prompt {name!r} is missing")
        if prompts[name].get("output_format") != "[[rating]]":
            raise RecordError(f"{path}: judge prompt {name!r} is not a [[rating]] prompt")
    return prompts


def load_references(path: Optional[str] = None) -> Dict[Any, List[str]]:
    """Reference answers by question id: the turns of the first choice."""
    path = path or data_file(REFERENCES)
    return {r["question_id"]: list(r["choices"][0]["turns"]) for r in read_jsonl(path)}


def judge_messages(question: Dict[str, Any], answers: List[str], turn: int, prompts: Dict[str, Dict[str, Any]],
                   references: Dict[Any, List[str]]) -> Dict[str, Any]:
    """The judge's prompt for `turn` (1 or 2) of one question: {template, messages}."""
    need_ref = question["category"] in NEED_REF_CATS
    name = ("single-math-v1" if need_ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    template = prompts[name]
    kwargs: Dict[str, str] = {}
    if need_ref:
        ref = references.get(question["question_id"])
        if not ref or len(ref) < turn:
            raise RecordError(f"question {question['question_id']} ({question['category']}): no reference answer "
                              f"for turn {turn}")
        kwargs["ref_answer_1"] = ref[0]
        if turn == 2:
            kwargs["ref_answer_2"] = ref[1]
    q = question["turns"]
    if turn == 2:
        user = template["prompt_template"].format(question_1=q[0], question_2=q[1], answer_1=answers[0],
                                                  answer_2=answers[1], **kwargs)
    else:
        user = template["prompt_template"].format(question=q[0], answer=answers[0], **kwargs)
    return {"template": name, "messages": [{"role": "system", "content": template["system_prompt"]},
                                           {"role": "user", "content": user}]}


def parse_rating(judgment: str) -> float:
    """The judge's rating: ``[[x]]``, else ``[x]``; -1 when there is none."""
    m = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    if not m:
        return -1.0
    try:
        return float(ast.literal_eval(m.group(1)))
    except (ValueError, SyntaxError):
        return -1.0


def answer_question(question: Dict[str, Any], chat: ChatFn, category_temperature: bool,
                    default_temperature: float) -> List[str]:
    """The model's two answers, turn 2 asked after its own turn-1 answer."""
    temp = ANSWER_TEMPERATURE.get(question["category"], 0.7) if category_temperature else default_temperature
    seed = int(question["question_id"]) if str(question["question_id"]).isdigit() else 0
    msgs: List[Dict[str, str]] = []
    answers = []
    for text in question["turns"]:
        msgs.append({"role": "user", "content": text})
        reply = chat(msgs, temp, seed).strip()
        answers.append(reply)
        msgs.append({"role": "assistant", "content": reply})
    return answers


def score_mtbench(questions: List[Dict[str, Any]], chat: ChatFn, judge: Callable[[List[Dict[str, str]]], str],
                  prompts: Dict[str, Dict[str, Any]], references: Dict[Any, List[str]],
                  category_temperature: bool = True, default_temperature: float = 0.0,
                  concurrency: int = 1) -> Dict[str, Any]:
    """Answers by `chat`, judgments by `judge(messages) -> text`; mean ratings overall and per turn."""
    for q in questions:  # reference answers are checked before any model is asked
        if q["category"] in NEED_REF_CATS and len(references.get(q["question_id"]) or []) < 2:
            raise RecordError(f"question {q['question_id']} ({q['category']}): needs a two-turn reference answer")
    answers = parallel_map(lambda q: answer_question(q, chat, category_temperature, default_temperature),
                           questions, concurrency)
    jobs = [(q, a, t) for q, a in zip(questions, answers) for t in (1, 2)]

    def grade(job) -> Dict[str, Any]:
        q, a, t = job
        jm = judge_messages(q, a, t, prompts, references)
        try:
            judgment = judge(jm["messages"])
        except Exception as exc:  # noqa: BLE001 - FastChat records "$ERROR$" and a -1 rating
            log.warning("judge failed on question %s turn %d: %s", q["question_id"], t, exc)
            judgment = f"$ERROR$ {type(exc).__name__}: {str(exc)[:200]}"
        return {"question_id": q["question_id"], "category": q["category"], "turn": t, "judge_prompt": jm["template"],
                "rating": parse_rating(judgment), "judgment": judgment[-1000:], "answer": a[t - 1][-1000:]}

    graded = parallel_map(grade, jobs, concurrency)
    valid = [g for g in graded if g["rating"] != -1]

    def mean(rows: List[Dict[str, Any]]) -> float:
        return round(sum(r["rating"] for r in rows) / len(rows), 4) if rows else 0.0

    turn1, turn2 = [g for g in valid if g["turn"] == 1], [g for g in valid if g["turn"] == 2]
    if graded and not valid:  # no rating at all: not a score of 0, and out of the category's overall
        return {"n": 0, "score": 0.0, "failed_judgments": len(graded), "scale": "1-10", "predictions": graded,
                "not_applicable": f"every judgment failed ({graded[0]['judgment'][:200]}): is the judge reachable?"}
    return {"n": len(questions), "score": mean(valid), "turn1": mean(turn1), "turn2": mean(turn2),
            "failed_judgments": len(graded) - len(valid), "scale": "1-10", "predictions": graded}
