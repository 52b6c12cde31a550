"""EFT decoding core: exact formula, special cases, speculative decoding exactness, KV-cache reuse."""

import math

import numpy as np
import pytest
import torch

from serve.eft_decoding import (
    CausalLM,
    DecodeParams,
    DecodeStats,
    EFTDecoder,
    EFTModels,
    VocabularyMismatchError,
    check_vocabularies,
    sampling_probs,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are overhead-bound: one intra-op thread is ~5x faster on the shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int, vocab: int = 64, hidden: int = 32, layers: int = 1, init: float = 0.4):
    """A random Llama; a large init std makes next-token distributions peaked (like a trained LM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def make_decoder(models, beta: float = 1.0, dtype=torch.float32) -> EFTDecoder:
    large, base, ft = (m.to(dtype) for m in models)
    return EFTDecoder(EFTModels(CausalLM(large, "L"), CausalLM(base, "sb"), CausalLM(ft, "ft")), beta=beta)


@pytest.fixture(scope="module")
def trio():
    # large base: 2 layers, wider; the small pair shares its init seed and differs by a "fine-tune" delta
    large = tiny_llama(1, hidden=64, layers=2)
    base = tiny_llama(2)
    ft = tiny_llama(2)
    with torch.no_grad():
        torch.manual_seed(3)
        for p in ft.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return large, base, ft


def ref_logprobs(model, prefixes) -> np.ndarray:
    """Independent reference: full forward (no cache) in float64, numpy log-softmax. [n, V]."""
    m64 = type(model)(model.config).double().eval()
    m64.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = np.stack([m64(input_ids=torch.tensor([p])).logits[0, -1].numpy() for p in prefixes])
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )


def ref_eft(trio_models, prefixes, beta: float) -> np.ndarray:
    """EFT probabilities from the paper's formula, float64. [n, V]."""
    large, base, ft = (ref_logprobs(m, prefixes) for m in trio_models)
    z = large + beta * (ft - base)
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def random_prefixes(n: int, vocab: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 12))).tolist() for _ in range(n)]


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_served_distribution_equals_formula_in_float64(trio, beta):
    dec = make_decoder(trio, beta=beta)
    prefixes = random_prefixes(8, seed=int(beta * 10))
    want = ref_eft(trio, prefixes, beta)
    got = np.stack([dec.target_logprobs(p).exp().numpy() for p in prefixes])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(want - ref_eft(trio, prefixes, 0.0)).max() > 1e-2  # the delta term matters here


def test_incremental_cache_gives_the_same_distributions(trio):
    """Feeding a prefix in chunks through the KV caches (as generation does) changes nothing."""
    dec = make_decoder(trio)
    seq = random_prefixes(1, seed=5)[0] + [7, 9, 11, 13, 2]
    sessions = dec._open()
    chunks = [seq[:3], seq[3:4], seq[4:]]
    rows = []
    for c in chunks:
        rows.append(dec._verify(sessions, c, keep=len(c)))
    got = torch.cat(rows).exp().numpy()  # predictions after every prefix seq[:1] .. seq[:n]
    want = ref_eft(trio, [seq[: i + 1] for i in range(len(seq))], 1.0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_beta_zero_reproduces_the_large_base(trio):
    dec = make_decoder(trio, beta=0.0)
    prefixes = random_prefixes(6, seed=11)
    want = np.exp(ref_logprobs(trio[0], prefixes))
    got = np.stack([dec.target_logprobs(p).exp().numpy() for p in prefixes])
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_equal_bases_reproduce_the_small_fine_tuned_model(trio, beta):
    _, base, ft = trio
    dec = make_decoder((base, base, ft), beta=beta)
    prefixes = random_prefixes(6, seed=12)
    got = np.stack([dec.target_logprobs(p).exp().numpy() for p in prefixes])
    if beta == 1.0:  # log p_L - log p_sb cancels exactly: EFT == small fine-tuned
        np.testing.assert_allclose(got, np.exp(ref_logprobs(ft, prefixes)), atol=1e-5)
    else:  # β ≠ 1 amplifies: p ∝ p_ft^β p_b^(1-β), no longer the fine-tuned model
        np.testing.assert_allclose(got, ref_eft((base, base, ft), prefixes, beta), atol=1e-5)


def test_sampling_probs_temperature_and_top_p():
    lp = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    np.testing.assert_allclose(sampling_probs(lp, 1.0, 0.7).numpy(), [0.625, 0.375, 0, 0], atol=1e-12)
    np.testing.assert_allclose(sampling_probs(lp, 1.0, 0.79).numpy(), [0.625, 0.375, 0, 0], atol=1e-12)
    np.testing.assert_allclose(sampling_probs(lp, 1.0, 0.81).numpy(), np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=1e-12)
    t = sampling_probs(lp, 0.5, 1.0).numpy()  # p^(1/T) renormalised
    want = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(t, want / want.sum(), atol=1e-12)


# ----------------------------------------------------------------------------- greedy


def generate(dec, prompt, **kw):
    stats = DecodeStats()
    toks = list(dec.generate(prompt, DecodeParams(**kw), stats))
    return toks, stats


def test_greedy_speculative_equals_greedy_and_the_eft_argmax(trio):
    # float64 weights: the k+1-token verification pass and the 1-token pass then agree far below
    # any logit gap, so equality is exact rather than up to float32 near-ties.
    dec = make_decoder(trio, dtype=torch.float64)
    prompts = random_prefixes(8, seed=21)
    drafted = accepted = 0
    for i, prompt in enumerate(prompts):
        plain, _ = generate(dec, prompt, max_new_tokens=16, temperature=0.0)
        if i < 3:  # the no-spec greedy sequence is the EFT argmax, recomputed without any cache
            seq = list(prompt)
            for _ in range(16):
                seq.append(int(np.argmax(ref_eft(trio, [seq], 1.0)[0])))
            assert plain == seq[len(prompt) :]
        for k in (1, 3, 6):
            spec, st = generate(dec, prompt, max_new_tokens=16, temperature=0.0, speculative_k=k)
            assert spec == plain, f"prompt {i} k={k}"
            drafted, accepted = drafted + st.drafted, accepted + st.accepted
    assert 0 < accepted < drafted  # both the accept and the reject path ran


@pytest.mark.parametrize("k", [0, 3])
def test_decode_reports_eft_logprobs_of_prompt_and_tokens(trio, k):
    """The scores served as OpenAI logprobs are the EFT distribution's (the formula), for every
    prompt token (one scoring pass) and every generated token (speculative or not); scoring the
    prompt first leaves the generated tokens unchanged."""
    dec = make_decoder(trio, dtype=torch.float64)
    prompt = random_prefixes(1, seed=41)[0] + [3, 4]
    plain, _ = generate(dec, prompt, max_new_tokens=6, temperature=0.0, speculative_k=k)
    st = DecodeStats()
    out = list(dec.decode(prompt, DecodeParams(max_new_tokens=6, temperature=0.0, speculative_k=k, logprobs=2,
                                               prompt_logprobs=1), st))
    scores, gen = out[0], out[1:]
    assert [g.token_id for g in gen] == plain
    seq = prompt + plain
    want = np.log(ref_eft(trio, [seq[: i + 1] for i in range(len(seq) - 1)], 1.0))  # row i predicts seq[i+1]
    assert scores[0] is None and len(scores) == len(prompt)
    for i in range(1, len(prompt)):
        assert scores[i].token_id == prompt[i]
        assert scores[i].logprob == pytest.approx(want[i - 1, prompt[i]], abs=1e-6)
        assert scores[i].top[0] == (int(np.argmax(want[i - 1])), pytest.approx(want[i - 1].max(), abs=1e-6))
    for j, g in enumerate(gen):
        row = want[len(prompt) + j - 1]
        assert g.logprob == pytest.approx(row[g.token_id], abs=1e-6) == pytest.approx(row.max(), abs=1e-6)
        assert [a for a, _ in g.top] == list(np.argsort(-row)[:2])
    assert st.rounds >= 1 and st.generated == 6
    # max_new_tokens=0: the scores only.
    only = list(dec.decode(prompt, DecodeParams(max_new_tokens=0, prompt_logprobs=0)))
    assert len(only) == 1 and [e.logprob for e in only[0][1:]] == pytest.approx([e.logprob for e in scores[1:]])
    assert list(dec.decode(prompt, DecodeParams(max_new_tokens=0))) == []


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "n,k,temperature,top_p",
    [
        (400, 3, 0.9, 0.95),
        pytest.param(6000, 3, 0.9, 0.95, marks=pytest.mark.slow),
        pytest.param(6000, 2, 1.0, 1.0, marks=pytest.mark.slow),
        pytest.param(6000, 3, 0.6, 0.8, marks=pytest.mark.slow),
    ],
)
def test_speculative_sampling_matches_the_eft_distribution(n, k, temperature, top_p):
    """Seeded chi-square: tokens 1-2 jointly and token 4 marginally, vocab 8."""
    from scipy.stats import chisquare

    vocab = 8
    large = tiny_llama(31, vocab=vocab, hidden=48, init=0.3)
    base, ft = tiny_llama(32, vocab=vocab, init=0.3), tiny_llama(33, vocab=vocab, init=0.3)
    models = (large, base, ft)
    dec = make_decoder(models)
    prompt = [1, 5, 2]
    params = dict(temperature=temperature, top_p=top_p, speculative_k=k, max_new_tokens=4)
    samples, drafted, accepted = [], 0, 0
    for i in range(n):
        toks, st = generate(dec, prompt, seed=i, **params)
        samples.append(toks)
        drafted, accepted = drafted + st.drafted, accepted + st.accepted
    samples = np.array(samples)
    assert 0.05 < accepted / drafted < 0.95  # real rejections happen

    def processed(prefixes):
        lp = torch.log(torch.tensor(ref_eft(models, prefixes, 1.0)))
        return sampling_probs(lp, params["temperature"], params["top_p"]).numpy()

    def draft_probs(prefixes):
        lp = torch.tensor(ref_logprobs(ft, prefixes))
        return sampling_probs(lp, params["temperature"], params["top_p"]).numpy()

    def joint(probs_fn, depth):
        """Exact joint distribution of the first `depth` tokens, shape [vocab]*depth."""
        out = np.ones([1])
        prefixes = [list(prompt)]
        for _ in range(depth):
            nxt = probs_fn(prefixes)  # [len(prefixes), V]
            out = (out[:, None] * nxt).reshape(-1)
            prefixes = [p + [t] for p in prefixes for t in range(vocab)]
        return out

    def check(counts, expected, label):
        keep = expected * n >= 5  # merge sparse cells so the chi-square approximation holds
        obs = np.append(counts[keep], counts[~keep].sum())
        exp = np.append(expected[keep], expected[~keep].sum()) * n
        obs, exp = obs[exp > 0], exp[exp > 0]
        pvalue = chisquare(obs, exp * obs.sum() / exp.sum()).pvalue
        print(f"{label}: acceptance {accepted / drafted:.2f}, chi-square p = {pvalue:.3g}")
        return pvalue

    pair_counts = np.bincount(samples[:, 0] * vocab + samples[:, 1], minlength=vocab * vocab)
    target_pair = joint(processed, 2)
    assert check(pair_counts, target_pair, "pair") > 1e-3
    fourth = joint(processed, 4).reshape(-1, vocab).sum(0)
    assert check(np.bincount(samples[:, 3], minlength=vocab), fourth, "4th") > 1e-3
    # Power check: the same samples clearly reject the drafter's own distribution.
    assert check(pair_counts, joint(draft_probs, 2), "draft") < 1e-6


# ----------------------------------------------------------------------------- KV-cache reuse


def test_forward_passes_without_speculation(trio):
    dec = make_decoder(trio)
    prompt = random_prefixes(1, seed=41)[0]
    for lm in dec.models.named().values():
        lm.counter.reset()
    toks, st = generate(dec, prompt, max_new_tokens=20, temperature=0.7, seed=0)
    assert len(toks) == 20 and st.rounds == 20
    for name, lm in dec.models.named().items():
        # one pass per generated token; each token fed exactly once (the last is never fed)
        assert lm.counter.calls == 20, name
        assert lm.counter.tokens == len(prompt) + 20 - 1, name


@pytest.mark.parametrize("k", [1, 3, 5])
def test_forward_passes_with_speculation_and_a_perfect_drafter(trio, k):
    """large base = small base ⇒ EFT = drafter: every draft is accepted, one large pass per k+1 tokens."""
    _, base, ft = trio
    dec = make_decoder((base, base, ft))
    prompt = random_prefixes(1, seed=42)[0]
    counters = {n: lm.counter for n, lm in dec.models.named().items()}
    for c in counters.values():
        c.reset()
    n = 23
    toks, st = generate(dec, prompt, max_new_tokens=n, temperature=0.0, speculative_k=k)
    assert len(toks) == n and st.acceptance == 1.0
    for role in ("large_base", "small_base"):
        assert counters[role].calls == math.ceil(n / (k + 1)) == st.rounds
        assert counters[role].tokens == len(prompt) + n - 1  # every token fed exactly once
    assert counters["small_ft"].calls == n and counters["small_ft"].tokens == len(prompt) + n - 1


def test_forward_passes_with_speculation_and_rejections(trio):
    dec = make_decoder(trio)
    prompt = random_prefixes(1, seed=43)[0]
    for lm in dec.models.named().values():
        lm.counter.reset()
    k, n = 4, 30
    toks, st = generate(dec, prompt, max_new_tokens=n, temperature=1.0, seed=3, speculative_k=k)
    large = dec.models.large_base.counter
    assert len(toks) == n and 0 < st.accepted < st.drafted
    assert large.calls == st.rounds < n
    # every committed token fed once, plus only the rejected drafts of each round: no prefix re-run
    assert large.tokens == len(prompt) + n - 1 + (st.drafted - st.accepted)


# ----------------------------------------------------------------------------- errors and limits


def test_vocabulary_mismatch_fails_at_start(trio):
    odd = tiny_llama(5, vocab=72)
    with pytest.raises(VocabularyMismatchError, match="large_base=72"):
        make_decoder((odd, trio[1], trio[2]))


def test_tokenizer_mismatch_fails_clearly():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    def tok(words):
        t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")

    same = ["<unk>", "a", "b", "c"]
    check_vocabularies({"x": 4, "y": 4}, {"x": tok(same), "y": tok(same)})
    with pytest.raises(VocabularyMismatchError, match="small_ft"):
        check_vocabularies({"large_base": 4, "small_ft": 4}, {"large_base": tok(same), "small_ft": tok(["<unk>", "a", "c", "b"])})


def test_stop_tokens_and_limits(trio):
    dec = make_decoder(trio)
    prompt = [3, 4, 5]
    toks, _ = generate(dec, prompt, max_new_tokens=12, temperature=0.0)
    stop = toks[5]
    first = toks.index(stop)
    for k in (0, 3):
        out, st = generate(dec, prompt, max_new_tokens=12, temperature=0.0, stop_token_ids=(stop,), speculative_k=k)
        assert out == toks[: first + 1] and st.finish_reason == "stop"
    assert generate(dec, prompt, max_new_tokens=0)[0] == []
    with pytest.raises(ValueError, match="no room"):
        generate(dec, list(range(60)) * 5, max_new_tokens=4)
    out, st = generate(dec, [1] * 250, max_new_tokens=50, temperature=0.0, speculative_k=4)
    assert len(out) == 6 and st.finish_reason == "length"  # 256-position context
