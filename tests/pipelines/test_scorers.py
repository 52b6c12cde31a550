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

    from pipelines.chat import load_tokenizer

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
