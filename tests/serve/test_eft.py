"""EFT server: vocabulary checks at start, OpenAI API over the EFT backend, Serve with separate models."""

import os
import sys

import openai
import pytest
import torch

from agenttuning.chat import prompt_ids
from agenttuning.config import load_config, to_object
from serve.eft_decoding import DecodeParams, VocabularyMismatchError
from serve.openai_api import ServerSettings, build_openai_app, run_local_server

sys.path.insert(0, os.path.dirname(__file__))
from eft_models import build_trio, save_variant  # noqa: E402

MSGS = [{"role": "user", "content": "how many rows are in the table?"}]


def teardown_module():
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()


@pytest.fixture(scope="module")
def trio(tiny_model_dir, tmp_path_factory):
    return build_trio(tiny_model_dir, tmp_path_factory.mktemp("eft"))


def _cfg(trio, **eft):
    over = [f"eft.{k}={trio[k]}" for k in ("large_base", "small_base", "small_ft")]
    over += [f"eft.{k}={v}" for k, v in eft.items()] + ["eft.torch_threads=1", "serve.default_max_tokens=12"]
    return load_config(None, over)


@pytest.fixture(scope="module")
def backend(trio):
    from serve.eft import EFTBackend

    c = _cfg(trio, speculative_k=3)
    return EFTBackend(to_object(c.eft), to_object(c.model))


def _reference_greedy(backend, n: int):
    """EFT argmax without speculation (the decoder core, independently tested) for MSGS."""
    ids = prompt_ids(backend.tokenizer, MSGS)
    toks = []
    for t in backend.decoder.generate(ids, DecodeParams(max_new_tokens=n, temperature=0.0)):
        if t == backend.tokenizer.eos_token_id:
            break
        toks.append(t)
    return backend.tokenizer.decode(toks, skip_special_tokens=True)


def test_openai_client_against_the_eft_backend(backend, trio):
    want = _reference_greedy(backend, 12)
    settings = ServerSettings(default_max_tokens=12, max_model_tokens=backend.max_model_tokens)
    with run_local_server(build_openai_app(backend, settings)) as url:
        client = openai.OpenAI(base_url=url, api_key="unused")
        assert [m.id for m in client.models.list().data] == [backend.model_id]
        assert backend.model_id.startswith("eft-")
        r = client.chat.completions.create(model=backend.model_id, messages=MSGS, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want  # speculative (k=3) greedy == plain EFT greedy
        chunks = client.chat.completions.create(model=backend.model_id, messages=MSGS, max_tokens=12,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        a, b = (client.chat.completions.create(model=backend.model_id, messages=MSGS, max_tokens=8, temperature=1.0,
                                               top_p=0.9, seed=7).choices[0].message.content for _ in range(2))
        assert a == b  # seeded sampling is reproducible
        # Log-probs are the EFT distribution's: scoring a prompt (echo, max_tokens 0) and the
        # generated tokens of a chat reply, against the formula over three plain forward passes.
        ids = prompt_ids(backend.tokenizer, MSGS)
        scored = client.completions.create(model=backend.model_id, prompt=ids, max_tokens=0, echo=True, logprobs=2)
        ref = eft_reference(trio, ids)
        lp = scored.choices[0].logprobs.token_logprobs
        assert lp[0] is None and lp[1:] == pytest.approx([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                         abs=1e-4)
        r = client.chat.completions.create(model=backend.model_id, messages=MSGS, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=1)
        gen = [t for t in backend.decoder.generate(ids, DecodeParams(max_new_tokens=6, temperature=0.0))][:6]
        ref = eft_reference(trio, ids + gen)
        got = [t.logprob for t in r.choices[0].logprobs.content]
        assert got == pytest.approx([float(ref[len(ids) + j - 1].max()) for j in range(len(got))], abs=1e-4)
    assert backend.stats()["drafted"] > 0


def eft_reference(trio, ids):
    """EFT log-probs [T, V] (row t predicts token t+1) from one plain forward pass of each model."""
    from transformers import AutoModelForCausalLM

    rows = []
    for role in ("large_base", "small_base", "small_ft"):
        m = AutoModelForCausalLM.from_pretrained(trio[role], dtype=torch.float64).eval()
        with torch.no_grad():
            rows.append(torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0], -1))
    large, base, ft = rows
    return torch.log_softmax(large + (ft - base), -1)


def test_vocabulary_mismatch_is_reported_at_start(trio, tiny_model_dir):
    from serve.eft import build_eft_app

    odd = save_variant(tiny_model_dir, trio["root"] / "odd_vocab", layers=1, vocab=2100)
    with pytest.raises(VocabularyMismatchError, match="large_base=2100"):
        build_eft_app(_cfg({**trio, "large_base": str(odd)}))
    # Same logit width, different tokenizer: caught too.
    from agenttuning.config import TinyModelConfig
    from agenttuning.models import build_tokenizer

    other = save_variant(tiny_model_dir, trio["root"] / "other_tok", noise=0.0)
    build_tokenizer(TinyModelConfig(vocab_size=1024)).save_pretrained(str(other))
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ"):
        build_eft_app(_cfg({**trio, "small_base": str(other)}))
    with pytest.raises(ValueError, match="eft.large_base"):
        build_eft_app(load_config(None, []))


# Separate placement starts four replicas (four processes loading torch): minutes on the shared
# 2-core machine, so it runs with -m slow; colocated (one replica) runs by default.
@pytest.mark.parametrize("placement", ["colocated", pytest.param("separate", marks=pytest.mark.slow)])
def test_serve_app(ray_local, trio, backend, placement):
    from ray import serve

    from serve.eft import build_eft_app

    want = _reference_greedy(backend, 12)
    app_name = f"eft-test-{placement}"
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    try:
        app = build_eft_app(_cfg(trio, placement=placement, num_cpus=0, speculative_k=3))
        handle = serve.run(app, name=app_name, route_prefix=f"/{app_name}")
        body = {"model": backend.model_id, "messages": MSGS, "max_tokens": 12, "temperature": 0}
        r = handle.chat.remote(body).result()
        assert r["choices"][0]["message"]["content"] == want, r  # speculative greedy == plain EFT greedy
        assert handle.model_id.remote().result() == backend.model_id  # LLMServer's handle interface
        bad = handle.chat.remote({**body, "model": "nope"}).result()
        assert bad["error"]["code"] == 404
        stats = handle.stats.remote().result()
        assert stats["drafted"] > 0 and stats["generated"] >= r["usage"]["completion_tokens"]  # + EOS
        if placement == "separate":
            def counters(role):
                h = serve.get_deployment_handle(f"EFTModelWorker_{role}", app_name=app_name)
                return h.counters.remote().result()

            large, ft = counters("large_base"), counters("small_ft")
            assert large["calls"] == stats["rounds"] < ft["calls"]  # one large pass per draft block
    finally:
        serve.delete(app_name)
