"""lm-evaluation-harness against the model server and the EFT server, offline.

lm-eval's ``local-completions`` model scores a multiple-choice task through ``/v1/completions``
(token-id prompts, ``echo``, ``logprobs``) and ``local-chat-completions`` answers a generation task
through ``/v1/chat/completions``. The tasks are custom YAMLs over local JSON files
(``dataset_path: json`` + ``data_files``), so nothing reaches the hub. The numbers are compared
with the project's own scorer on the same items: ``pipelines.scorers.score_mc`` with in-process
log-likelihoods of the same weights (for EFT: the EFT formula over three plain forward passes),
and in-process greedy generation.

The default tests call ``lm_eval.simple_evaluate`` (what the ``lm_eval`` command runs) with a task
index of the test's folder only: the command first indexes lm-eval's ~10k built-in task files,
minutes on a 2-core CI machine. The exact commands of docs/serving_and_eval.md run in the ``slow``
test.
"""

import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from agenttuning.chat import load_tokenizer, prompt_ids
from agenttuning.config import load_config, to_object
from pipelines.scorers import mc_messages, mc_request, score_mc
from serve.eft_decoding import DecodeParams
from serve.openai_api import ServerSettings, build_openai_app, run_local_server

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the test extra: pip install 'lm-eval[api]'")

sys.path.insert(0, os.path.dirname(__file__))
from eft_models import build_trio  # noqa: E402

# Own MMLU-style items (subject, question, options, gold letter).
MC_RECORDS = [
    {"subject": "high_school_geography", "question": "Which ocean lies between Africa and Australia?",
     "choices": ["Atlantic", "Indian", "Arctic", "Pacific"], "answer": "B"},
    {"subject": "elementary_mathematics", "question": "What is 7 times 8?",
     "choices": ["54", "56", "64", "48"], "answer": "B"},
    {"subject": "computer_security", "question": "Which of these keeps a password safest at rest?",
     "choices": ["plain text", "base64", "a salted slow hash", "ROT13"], "answer": "C"},
    {"subject": "astronomy", "question": "Which planet is closest to the Sun?",
     "choices": ["Venus", "Mars", "Earth", "Mercury"], "answer": "D"},
]
GEN_ITEMS = 3
MAX_GEN = 12


def write_tasks(root: pathlib.Path, tok, bench_data: pathlib.Path) -> None:
    """tiny_mc (multiple choice, contexts rendered as scorers.mc_request renders them) and
    tiny_gsm (GSM8K questions from the shipped data, generation) as lm-eval task YAMLs."""
    docs = []
    for i, rec in enumerate(MC_RECORDS):
        ctx, _ = mc_request(tok, mc_messages(rec, [], f"record {i}"), len(rec["choices"]))
        text = tok.decode(ctx)
        assert tok(text, add_special_tokens=False)["input_ids"] == ctx  # lm-eval re-tokenizes the text
        docs.append({"context": text, "label": "ABCD".index(rec["answer"])})
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    gsm = (bench_data / "gsm8k/test.jsonl").read_text().splitlines()[:GEN_ITEMS]
    (root / "gsm.jsonl").write_text("\n".join(gsm) + "\n")
    cache = root / "datasets_cache"
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {root / 'mc.jsonl'}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (root / "tiny_gsm.yaml").write_text(f"""task: tiny_gsm
dataset_path: json
dataset_kwargs:
  data_files: {{test: {root / 'gsm.jsonl'}}}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
generation_kwargs:
  until: ["Question:"]
  max_gen_toks: {MAX_GEN}
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")


def run_lm_eval(root: pathlib.Path, model: str, model_args: str, task: str) -> dict:
    """lm-eval in process over the tasks in `root` only; (metrics, samples sorted by doc id)."""
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], log_samples=True,
                                  task_manager=TaskManager(include_path=str(root), include_defaults=False),
                                  apply_chat_template=model == "local-chat-completions")
    return res["results"][task], sorted(res["samples"][task], key=lambda s: s["doc_id"])


def check_mc(metrics: dict, samples: list, ours: dict) -> None:
    """lm-eval's per-choice log-likelihoods and accuracy == the project's scorer on the same items."""
    assert len(samples) == len(MC_RECORDS) == ours["n"]
    for s, pred in zip(samples, ours["predictions"]):
        got = [float(ll) for ll, _ in s["filtered_resps"]]
        assert got == pytest.approx(pred["logprobs"], abs=1e-4), (s["doc_id"], got, pred["logprobs"])
        assert s["acc"] == float(pred["correct"])
    assert metrics["acc,none"] == pytest.approx(ours["score"])


def check_generation(metrics: dict, samples: list, want: list, bench_data: pathlib.Path) -> None:
    """lm-eval's answers == in-process greedy answers to the same messages, and exact_match agrees."""
    golds = [json.loads(line)["answer"].split("#### ")[-1]
             for line in (bench_data / "gsm8k/test.jsonl").read_text().splitlines()[:GEN_ITEMS]]
    assert any(w.strip() for w in want)  # the comparison is about real text
    assert [s["resps"][0][0] for s in samples] == want
    assert [s["exact_match"] for s in samples] == [float(w.strip() == g) for w, g in zip(want, golds)]
    assert metrics["exact_match,none"] == pytest.approx(sum(w.strip() == g for w, g in zip(want, golds)) / GEN_ITEMS)


def gen_messages(bench_data: pathlib.Path) -> list:
    lines = (bench_data / "gsm8k/test.jsonl").read_text().splitlines()[:GEN_ITEMS]
    return [[{"role": "user", "content": f"Question: {json.loads(line)['question']}"}] for line in lines]


def cut(text: str) -> str:
    return text.split("Question:")[0]


# ----------------------------------------------------------------------------- model server


@pytest.fixture(scope="module")
def hf_server(tiny_model_dir):
    from serve.llm import HFBackend

    backend = HFBackend(str(tiny_model_dir), model_id="tiny", torch_threads=1)
    with run_local_server(build_openai_app(backend, ServerSettings())) as url:
        yield backend, url
    backend.engine.close()


def local_loglik(model):
    """log p(continuation | context) summed, from one plain forward pass per sequence."""
    def fn(ctx, conts):
        out = []
        for c in conts:
            with torch.inference_mode():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ctx + c])).logits[0].float(), -1)
            out.append(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(c)))
        return out
    return fn


def test_lm_eval_against_the_model_server(hf_server, tiny_model_dir, bench_data, tmp_path):
    backend, url = hf_server
    tok = load_tokenizer(str(tiny_model_dir), "llama2")
    write_tasks(tmp_path, tok, bench_data)

    metrics, samples = run_lm_eval(tmp_path, "local-completions",
                                   f"model=tiny,base_url={url}/completions,tokenizer={tiny_model_dir},"
                                   "tokenizer_backend=huggingface,max_retries=1", "tiny_mc")
    check_mc(metrics, samples, score_mc(MC_RECORDS, {}, 0, tok, local_loglik(backend.model)))

    metrics, samples = run_lm_eval(tmp_path, "local-chat-completions",
                                   f"model=tiny,base_url={url}/chat/completions,max_retries=1", "tiny_gsm")
    check_generation(metrics, samples, hf_greedy_answers(backend.model, tok, bench_data), bench_data)


def hf_greedy_answers(model, tok, bench_data):
    """transformers' own greedy decoding of the generation items (no server code), cut at the stop."""
    want = []
    for msgs in gen_messages(bench_data):
        ids = prompt_ids(tok, msgs)
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_GEN, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        want.append(cut(tok.decode(out[0, len(ids):], skip_special_tokens=True)))
    return want


# ----------------------------------------------------------------------------- EFT server


@pytest.fixture(scope="module")
def eft_server(tiny_model_dir, tmp_path_factory):
    from serve.eft import EFTBackend, server_settings

    trio = build_trio(tiny_model_dir, tmp_path_factory.mktemp("eft-lm"))
    over = [f"eft.{k}={trio[k]}" for k in ("large_base", "small_base", "small_ft")]
    cfg = load_config(None, over + ["eft.speculative_k=3", "eft.torch_threads=1"])
    backend = EFTBackend(to_object(cfg.eft), to_object(cfg.model))
    settings = server_settings(to_object(cfg.model), to_object(cfg.serve), backend)
    with run_local_server(build_openai_app(backend, settings)) as url:
        yield backend, url, trio


def eft_loglik(trio):
    """Log-likelihoods under the EFT formula (beta 1), float64, one plain pass of each model."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(trio[r], dtype=torch.float64).eval()
              for r in ("large_base", "small_base", "small_ft")]

    def fn(ctx, conts):
        out = []
        for c in conts:
            with torch.no_grad():
                large, base, ft = (torch.log_softmax(m(input_ids=torch.tensor([ctx + c])).logits[0], -1)
                                   for m in models)
            lp = torch.log_softmax(large + (ft - base), -1)
            out.append(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(c)))
        return out
    return fn


def test_lm_eval_against_the_eft_server(eft_server, bench_data, tmp_path):
    backend, url, trio = eft_server
    tok = backend.tokenizer
    write_tasks(tmp_path, tok, bench_data)
    mid = backend.model_id

    metrics, samples = run_lm_eval(tmp_path, "local-completions",
                                   f"model={mid},base_url={url}/completions,tokenizer={trio['small_ft']},"
                                   "tokenizer_backend=huggingface,max_retries=1", "tiny_mc")
    check_mc(metrics, samples, score_mc(MC_RECORDS, {}, 0, tok, eft_loglik(trio)))

    metrics, samples = run_lm_eval(tmp_path, "local-chat-completions",
                                   f"model={mid},base_url={url}/chat/completions,max_retries=1", "tiny_gsm")
    want = []
    for msgs in gen_messages(bench_data):  # EFT argmax without speculation (the decoder core)
        toks = []
        for t in backend.decoder.generate(prompt_ids(tok, msgs), DecodeParams(max_new_tokens=MAX_GEN, temperature=0.0)):
            if t == tok.eos_token_id:
                break
            toks.append(t)
        want.append(cut(tok.decode(toks, skip_special_tokens=True)))
    check_generation(metrics, samples, want, bench_data)


# ----------------------------------------------------------------------------- the documented commands


@pytest.mark.slow
def test_documented_lm_eval_commands(hf_server, tiny_model_dir, bench_data, tmp_path):
    """The `lm_eval` commands of docs/serving_and_eval.md, as subprocesses (indexing lm-eval's
    built-in tasks takes minutes on a 2-core machine)."""
    backend, url = hf_server
    tok = load_tokenizer(str(tiny_model_dir), "llama2")
    write_tasks(tmp_path, tok, bench_data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    runs = {
        "tiny_mc": ["--model", "local-completions", "--model_args",
                    f"model=tiny,base_url={url}/completions,tokenizer={tiny_model_dir},tokenizer_backend=huggingface"],
        "tiny_gsm": ["--model", "local-chat-completions", "--model_args",
                     f"model=tiny,base_url={url}/chat/completions", "--apply_chat_template"],
    }
    for task, args in runs.items():
        out = tmp_path / f"out-{task}"
        cmd = ["lm_eval", *args, "--tasks", task, "--include_path", str(tmp_path), "--output_path", str(out),
               "--log_samples"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, p.stderr[-3000:]
        (samples_file,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        samples = sorted((json.loads(line) for line in open(samples_file)), key=lambda s: s["doc_id"])
        (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
        metrics = json.load(open(results_file))["results"][task]
        if task == "tiny_mc":
            check_mc(metrics, samples, score_mc(MC_RECORDS, {}, 0, tok, local_loglik(backend.model)))
        else:
            check_generation(metrics, samples, hf_greedy_answers(backend.model, tok, bench_data), bench_data)
