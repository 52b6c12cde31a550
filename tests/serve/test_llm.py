"""Model server: OpenAI protocol layer, continuous batching engine, Serve deployment.

Everything runs on the locally built tiny Llama and real HTTP servers on 127.0.0.1, driven by the
official ``openai`` client.
"""

import threading

import httpx
import openai
import pytest

from agenttuning.chat import prompt_ids
from serve.openai_api import SamplingParams, ServerSettings, StopStringDetokenizer, build_openai_app, run_local_server


@pytest.fixture(scope="module")
def base_url(backend):
    with run_local_server(build_openai_app(backend, ServerSettings(default_max_tokens=16))) as url:
        yield url


def _msgs(text: str):
    return [{"role": "user", "content": text}]


def test_openai_client_completion_and_stream(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.chat.completions.create(model="tiny", messages=_msgs("list files"), max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # Greedy is deterministic, and the stream carries exactly the same text.
    chunks = list(client.chat.completions.create(model="tiny", messages=_msgs("list files"), max_tokens=12,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_string_cuts_text(base_url, backend):
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    full = client.chat.completions.create(model="tiny", messages=_msgs("hello"), max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    if len(text.strip()) < 4:
        pytest.skip("tiny model produced too little text to pick a stop string")
    stop = text.strip()[2:4]
    cut = client.chat.completions.create(model="tiny", messages=_msgs("hello"), max_tokens=24, temperature=0,
                                         stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=_msgs("hello"), max_tokens=24, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].message.content


def test_errors_are_openai_shaped(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="other", messages=_msgs("x"))
    with pytest.raises(openai.BadRequestError, match="n=17 is over"):
        client.chat.completions.create(model="tiny", messages=_msgs("x"), n=17)
    r = httpx.post(f"{base_url}/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{base_url}/chat/completions",
                   json={"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_seeded_sampling_is_reproducible(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    kw = dict(model="tiny", messages=_msgs("hi"), max_tokens=10, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b


def test_stop_string_detokenizer_holds_back_prefixes(backend):
    tok = backend.tokenizer
    ids = tok("the cat sat. Observation: more", add_special_tokens=False)["input_ids"]
    d = StopStringDetokenizer(tok, ["Observation:"])
    out = "".join(d.push(i) for i in ids)
    assert d.stopped and out.rstrip() == "the cat sat."
    d = StopStringDetokenizer(tok, ["zzz"])
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert not d.stopped and out == tok.decode(ids, skip_special_tokens=True)


def test_continuous_batching_matches_serial_greedy(backend):
    """Requests that join a running batch (left-padded, merged KV) decode exactly as alone."""
    prompts = [prompt_ids(backend.tokenizer, _msgs("word " * k)) for k in (1, 7, 3, 12)]
    params = SamplingParams(max_tokens=12, temperature=0)
    serial = [list(backend.generate(p, params)) for p in prompts]
    results = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i):
        barrier.wait()
        results[i] = list(backend.generate(prompts[i], params))

    steps = backend.engine.steps
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert results == serial
    # Batched: fewer decode steps than the serial sum of generated tokens.
    assert backend.engine.steps - steps < sum(len(s) for s in serial)


def test_continuous_batching_with_logprobs_and_scoring(backend):
    """Scoring requests (all-position logits, prefilled alone) and logprob requests join a
    running batch without changing anyone's tokens or numbers."""
    from serve.openai_api import PromptLogprobs, TokenLogprob

    prompts = [prompt_ids(backend.tokenizer, _msgs("word " * k)) for k in (2, 9, 4)]
    kinds = [SamplingParams(max_tokens=8, temperature=0, logprobs=2),
             SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=1),
             SamplingParams(max_tokens=6, temperature=0, logprobs=0, prompt_logprobs=0)]
    serial = [list(backend.generate(p, k)) for p, k in zip(prompts, kinds)]
    results = [None] * 3
    barrier = threading.Barrier(3)

    def run(i):
        barrier.wait()
        results[i] = list(backend.generate(prompts[i], kinds[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    for got, want in zip(results, serial):
        assert [getattr(x, "token_id", None) for x in got] == [getattr(x, "token_id", None) for x in want]
        for g, w in zip(got, want):
            if isinstance(g, TokenLogprob):
                assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
                assert [a for a, _ in g.top] == [a for a, _ in w.top]
    assert all(isinstance(x, TokenLogprob) for x in results[0]) and len(results[0][0].top) == 2
    assert len(results[1]) == 1 and isinstance(results[1][0], PromptLogprobs)  # scores only, no token
    scores = results[1][0].entries
    assert scores[0] is None and len(scores) == len(prompts[1]) and len(scores[1].top) == 1
    assert isinstance(results[2][0], PromptLogprobs) and all(isinstance(x, TokenLogprob) for x in results[2][1:])
    assert backend.engine.active == []


def test_scoring_reuses_the_shared_prefix_with_the_same_numbers(backend):
    """Four continuations of one context (an MMLU question's answer letters): after the first, each
    prefills only its own tokens, and every prompt log-prob equals that of a prefill from scratch."""
    context = prompt_ids(backend.tokenizer, _msgs("Which letter? A, B, C or D")) + [5, 6, 7]
    prompts = [context + [20 + k, 40 + k] for k in range(4)]
    score = SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=0)
    engine = backend.engine
    fresh = []
    for p in prompts:
        engine._scored = None  # a prefill from scratch
        fresh.append(list(backend.generate(p, score))[0].entries)
    engine._scored = None
    before = engine.prefill_tokens
    cached = [list(backend.generate(p, score))[0].entries for p in prompts]
    # The context once, then each prompt's last context token again (for the next token's distribution) + its 2.
    assert engine.prefill_tokens - before == len(prompts[0]) + 3 * 3
    for got, want in zip(cached, fresh):
        assert got[0] is None and want[0] is None and len(got) == len(want)
        assert [g.token_id for g in got[1:]] == [w.token_id for w in want[1:]]
        assert [g.logprob for g in got[1:]] == pytest.approx([w.logprob for w in want[1:]], abs=1e-5)
    # A prompt that is a prefix of the cached one still runs its last two tokens.
    before = engine.prefill_tokens
    short = list(backend.generate(context, score))[0].entries
    assert engine.prefill_tokens - before == 2
    assert [g.logprob for g in short[1:]] == pytest.approx([w.logprob for w in fresh[0][1:len(context)]], abs=1e-5)


def test_next_turn_prefills_only_what_follows_the_cached_conversation(backend):
    """An agent's next turn (its last prompt + reply + observation) reuses the finished sequence's
    KV: only the new tokens run, and the greedy reply is the one a prefill from scratch gives."""
    from serve.kv_prefix import PrefixCache

    engine = backend.engine
    greedy = SamplingParams(max_tokens=6, temperature=0)
    first = prompt_ids(backend.tokenizer, _msgs("List the tables, then count the rows of each."))
    reply = list(backend.generate(first, greedy))
    second = first + reply + [7, 8, 9, 10, 11]  # + the observation's tokens

    saved, engine.prefix = engine.prefix, None  # reference: no reuse
    try:
        want = list(backend.generate(second, greedy))
        engine.prefix = PrefixCache()
        assert list(backend.generate(first, greedy)) == reply
        before = engine.prefill_tokens
        got = list(backend.generate(second, greedy))
        reused = len(first) + len(reply) - 1  # the reply's last token was picked, never run
        assert engine.prefix.hits == 1 and engine.prefix.reused_tokens == reused
        assert engine.prefill_tokens - before == len(second) - reused
        assert got == want
    finally:
        engine.prefix = saved


def test_placement_and_backend_choice_from_config(tiny_model_dir):
    from agenttuning.config import ConfigError, load_config, to_object
    from serve.lifecycle import placement
    from serve.llm import make_backend, vllm_available

    def opts_of(*overrides):
        s = to_object(load_config(None, list(overrides)).serve)
        return placement(s.num_replicas, s.autoscaling, s.max_ongoing_requests, s.num_cpus, s.num_gpus)

    opts = opts_of("serve.num_gpus=1", "serve.autoscaling={min_replicas: 1, max_replicas: 4}")
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts
    assert opts_of("serve.num_replicas=3")["num_replicas"] == 3
    with pytest.raises(ConfigError, match="serve.backend"):
        load_config(None, ["serve.backend=tgi"])
    if not vllm_available():
        cfg = load_config(None, ["serve.backend=vllm", f"model.name_or_path={tiny_model_dir}"])
        with pytest.raises(RuntimeError, match="vllm is not installed"):
            make_backend(to_object(cfg.serve), to_object(cfg.model))


def test_client_disconnect_frees_the_batch_slot(base_url, backend):
    """A client that goes away mid-stream must not keep its row decoding (no leaked work)."""
    import time

    body = {"model": "tiny", "messages": _msgs("tell a long story"), "max_tokens": 3000, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=60) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events >= 3:
                break
    deadline = time.time() + 10
    while backend.engine.active and time.time() < deadline:
        time.sleep(0.02)
    assert backend.engine.active == []
