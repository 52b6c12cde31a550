"""The OpenAI API of the model server, end to end with the official ``openai`` client.

Every request feature of ``serve.openai_api``: legacy completions (text / token-id prompts and
batches of them, echo, logprobs, scoring with max_tokens 0, stop, n, seed, streaming), chat
(logprobs + top_logprobs, n, list content parts, stream_options.include_usage), /v1/models/{id},
OpenAI-shaped errors and API-key authentication. Log-probabilities are checked against an
independent in-process forward pass of the same weights.
"""

import math

import httpx
import openai
import pytest
import torch

from agenttuning.chat import prompt_ids
from serve.auth import AuthConfigError, describe_key_config, resolve_api_key
from serve.openai_api import SamplingParams, ServerSettings, build_openai_app, run_local_server

MSGS = [{"role": "user", "content": "list the files"}]
TOL = 1e-4


@pytest.fixture(scope="module")
def client(backend):
    with run_local_server(build_openai_app(backend, ServerSettings(default_max_tokens=16, aliases=["tiny-alias"]))) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0)


def ref_logprobs(backend, ids):
    """log p(token | prefix) at every position of ``ids`` from one plain forward pass: [T, V]."""
    with torch.inference_mode():
        return torch.log_softmax(backend.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def _ids(backend, text):
    return backend.tokenizer(text, add_special_tokens=True)["input_ids"]


def _greedy(backend, ids, n):
    """The token ids greedy decoding produces (which tokens to look up in the reference)."""
    return list(backend.generate(ids, SamplingParams(max_tokens=n, temperature=0)))


def test_scoring_a_prompt_with_echo_and_max_tokens_zero(client, backend):
    ids = _ids(backend, "The cat sat on the mat")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=3)
    ch, ref = r.choices[0], ref_logprobs(backend, ids)
    lp = ch.logprobs
    assert ch.text == backend.tokenizer.decode(ids) and ch.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # OpenAI's first position
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=TOL)
    assert "".join(lp.tokens) == ch.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    for i, top in enumerate(lp.top_logprobs[1:], 1):
        best = torch.topk(ref[i - 1], 3).values.tolist()
        # 3 alternatives + the chosen token (fewer when two tokens print the same string)
        assert 1 <= len(top) <= 4 and top[lp.tokens[i]] >= lp.token_logprobs[i] - 1e-6
        assert max(top.values()) == pytest.approx(best[0], abs=TOL)
        assert all(v >= best[2] - TOL or v == pytest.approx(lp.token_logprobs[i]) for v in top.values())


def test_echo_with_generation_and_text_prompt(client, backend):
    text = "The cat sat"
    ids = _ids(backend, text)
    r = client.completions.create(model="tiny", prompt=text, max_tokens=5, echo=True, logprobs=1, temperature=0)
    ch = r.choices[0]
    plain = client.completions.create(model="tiny", prompt=text, max_tokens=5, temperature=0).choices[0]
    assert ch.text == text + plain.text
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) + r.usage.completion_tokens == len(lp.token_logprobs)
    # Generated tokens: greedy, so each is the top-1 of its distribution, with the reference value.
    gen = _greedy(backend, ids, 5)
    assert len(gen) == r.usage.completion_tokens
    ref = ref_logprobs(backend, ids + gen)
    for j, t in enumerate(gen):
        assert lp.token_logprobs[len(ids) + j] == pytest.approx(float(ref[len(ids) + j - 1, t]), abs=TOL)
        assert lp.token_logprobs[len(ids) + j] == pytest.approx(float(ref[len(ids) + j - 1].max()), abs=TOL)
        assert lp.token_logprobs[len(ids) + j] == pytest.approx(max(lp.top_logprobs[len(ids) + j].values()))
    assert lp.text_offset[len(ids)] == len(text)


def test_batches_of_prompts_n_and_seed(client, backend):
    a, b = _ids(backend, "one two"), _ids(backend, "three")
    r = client.completions.create(model="tiny", prompt=[a, b], max_tokens=4, n=2, temperature=1.0, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(a) + len(b)
    again = client.completions.create(model="tiny", prompt=[a, b], max_tokens=4, n=2, temperature=1.0, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    # Choice j of a prompt samples with seed + j: the same as a single request with that seed.
    single = client.completions.create(model="tiny", prompt=a, max_tokens=4, temperature=1.0, seed=12)
    assert single.choices[0].text == r.choices[1].text
    texts = client.completions.create(model="tiny", prompt=["one two", "three"], max_tokens=3, temperature=0)
    tokens = client.completions.create(model="tiny", prompt=[a, b], max_tokens=3, temperature=0)
    assert [c.text for c in texts.choices] == [c.text for c in tokens.choices]
    nucleus = client.completions.create(model="tiny", prompt=a, max_tokens=4, temperature=0.7, top_p=0.5, seed=3)
    assert nucleus.choices[0].text == client.completions.create(
        model="tiny", prompt=a, max_tokens=4, temperature=0.7, top_p=0.5, seed=3).choices[0].text


def test_completion_stop_and_stream(client, backend):
    full = client.completions.create(model="tiny", prompt="hello there", max_tokens=16, temperature=0).choices[0].text
    if len(full.strip()) < 4:
        pytest.skip("tiny model produced too little text to pick a stop string")
    stop = full.strip()[2:4]
    cut = client.completions.create(model="tiny", prompt="hello there", max_tokens=16, temperature=0, stop=stop)
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="hello there", max_tokens=16, temperature=0,
                                            stop=[stop], stream=True, echo=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "hello there" + cut.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == cut.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    scored = list(client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2, temperature=0,
                                            echo=True, logprobs=1, stream=True))
    lps = [v for c in scored if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    whole = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2, temperature=0, echo=True,
                                      logprobs=1).choices[0].logprobs.token_logprobs
    assert lps[0] is None and lps[1:] == pytest.approx(whole[1:], abs=1e-6)


def test_chat_logprobs_match_the_model(client, backend):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    ch = r.choices[0]
    content = ch.logprobs.content
    assert "".join(t.token for t in content) == ch.message.content
    ids = prompt_ids(backend.tokenizer, MSGS)
    gen = _greedy(backend, ids, 6)
    ref = ref_logprobs(backend, ids + gen)
    assert len(content) == r.usage.completion_tokens == len(gen)
    for j, t in enumerate(content):
        assert t.logprob == pytest.approx(float(ref[len(ids) + j - 1, gen[j]]), abs=TOL)
        assert t.logprob == pytest.approx(float(ref[len(ids) + j - 1].max()), abs=TOL)  # greedy: the top token
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)
        assert t.bytes == list(t.token.encode())
    plain = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == ch.message.content
    # Streamed, the same tokens arrive with their deltas; the usage comes last when asked.
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=1, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([t.logprob for t in content], abs=1e-6)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_chat_n_and_content_parts(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, n=3, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(  # each choice's tokens counted, the prompt once
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=1.0,
                                       seed=5 + j).usage.completion_tokens for j in range(3))
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, n=2, temperature=1.0,
                                                 seed=5, stream=True))
    for j in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == j)
        assert text == r.choices[j].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "list the"}, {"type": "text", "text": "files"}]}]
    joined = [{"role": "user", "content": "list the\nfiles"}]
    a = client.chat.completions.create(model="tiny", messages=parts, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=joined, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}])
    assert "'image_url'" in exc.value.body["message"] and exc.value.body["param"] == "messages[0].content[1].type"


def test_models_and_error_shapes(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("gpt-nope")
    assert exc.value.body == {"message": "model 'gpt-nope' not found; this server has 'tiny'",
                              "type": "invalid_request_error", "param": "model", "code": 404}
    base = str(client.base_url).rstrip("/")

    def err(resp, status):
        assert resp.status_code == status, resp.text
        body = resp.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == status
        return body["error"]

    assert err(httpx.get(f"{base}/nothing-here"), 404)["message"] == "Not Found"
    assert err(httpx.get(f"{base}/completions"), 405)
    e = err(httpx.post(f"{base}/completions", json={"model": "tiny", "prompt": "x", "temperature": 5}), 400)
    assert e["param"] == "temperature"
    e = err(httpx.post(f"{base}/completions", json={"model": "tiny", "prompt": [[1, 2], [10 ** 7]]}), 400)
    assert "outside the vocabulary" in e["message"]
    e = err(httpx.post(f"{base}/completions", json={"model": "tiny", "prompt": "x", "suffix": "y"}), 400)
    assert e["param"] == "suffix"
    e = err(httpx.post(f"{base}/chat/completions", json={"model": "tiny", "messages": MSGS, "top_logprobs": 2}), 400)
    assert e["param"] == "top_logprobs"
    e = err(httpx.post(f"{base}/chat/completions", json={"model": "tiny", "messages": MSGS, "n": 99}), 400)
    assert e["param"] == "n"
    e = err(httpx.post(f"{base}/chat/completions", json={"model": "tiny", "messages": MSGS, "presence_penalty": 1}), 400)
    assert e["param"] == "presence_penalty"
    e = err(httpx.post(f"{base}/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
            400)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[], max_tokens=1)


def test_api_key(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_SERVER_KEY", "s3cret-key")
    key = resolve_api_key("TINY_SERVER_KEY", None)
    with run_local_server(build_openai_app(backend, ServerSettings(default_max_tokens=4), api_key=key)) as url:
        with pytest.raises(openai.AuthenticationError) as exc:
            openai.OpenAI(base_url=url, api_key="wrong-key", max_retries=0).models.list()
        assert exc.value.status_code == 401 and exc.value.body == {
            "message": "invalid API key", "type": "authentication_error", "param": None, "code": 401}
        r = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["message"].startswith("missing API key")
        assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200  # probes need no key
        ok = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        assert [m.id for m in ok.models.list().data] == ["tiny"]
        done = ok.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in ok.chat.completions.create(
            model="tiny", messages=MSGS, max_tokens=3, temperature=0, stream=True) if c.choices)
        assert streamed == done.choices[0].message.content
    # The key can come from a file (a mounted secret); configured but absent: refuse to start.
    (tmp_path / "key").write_text("from-file\n")
    assert resolve_api_key("UNSET_VAR_FOR_TEST", str(tmp_path / "key")) == "from-file"
    assert resolve_api_key(None, None) is None
    with pytest.raises(AuthConfigError, match="UNSET_VAR_FOR_TEST is unset"):
        resolve_api_key("UNSET_VAR_FOR_TEST", None)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(AuthConfigError, match="is empty"):
        resolve_api_key(None, str(tmp_path / "empty"))
    # What the exposed-bind warning says (serve.lifecycle): where the key comes from, never the key.
    assert describe_key_config("TINY_SERVER_KEY", "/run/secrets/k") == "$TINY_SERVER_KEY or file /run/secrets/k"
    assert describe_key_config(None, None) is None


def test_logprobs_survive_nan_free_json(client):
    """Every number in a scoring response is finite (JSON has no -inf)."""
    r = client.completions.create(model="tiny", prompt=list(range(1, 40)), max_tokens=0, echo=True, logprobs=5)
    vals = [v for v in r.choices[0].logprobs.token_logprobs[1:]]
    vals += [v for top in r.choices[0].logprobs.top_logprobs[1:] for v in top.values()]
    assert vals and all(math.isfinite(v) for v in vals)
