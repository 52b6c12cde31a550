"""Emulated fine-tuning (EFT) / LM up-scaling decoding core: pure torch + transformers, no Ray.

Three causal LMs that share one vocabulary — a large base model, a small base model and a small
fine-tuned model — are combined per token (Mitchell et al. 2023, arXiv 2310.12962):

    log p̃(y_t | y_<t) = log_softmax( log p_base^L + β · (log p_ft^s − log p_base^s) )

β = 1 is plain EFT (up-scaling: the small model's fine-tuning transplanted onto the large base);
β > 1 amplifies the fine-tuning delta. Temperature and top-p act on the combined distribution.

Every model keeps a KV cache per request (``LMSession``): each forward pass feeds only the tokens the
cache has not seen, and rejected speculative tokens are cropped off the cache, never recomputed.

Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): the small fine-tuned model drafts k
tokens from its own (temperature/top-p processed) distribution q; one forward pass of the large and
the small base model over the k drafts yields the EFT target p at every draft position (the
fine-tuned model's log-probs there are already known from drafting). Draft i is accepted with
probability min(1, p(d_i)/q(d_i)); the first rejected position is resampled from
norm(max(0, p − q)); when all k are accepted a bonus token is sampled from p at position k+1. The
output is then distributed exactly as EFT sampling; in greedy mode it is exactly the EFT argmax.
"""

import inspect
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import torch

from agenttuning.models import nucleus

log = logging.getLogger(__name__)


class VocabularyMismatchError(ValueError):
    """The three EFT models (or their tokenizers) do not share one vocabulary."""


# ----------------------------------------------------------------------------- sessions


class PendingLogits(Protocol):
    """A forward pass in flight (local: already done; remote: a Ray response)."""

    def result(self) -> torch.Tensor: ...


class Session(Protocol):
    """One request's KV-cached view of one model.

    ``length`` is the number of tokens in the cache. ``submit(tokens, keep)`` feeds ``tokens``
    after the cached prefix in ONE forward pass and returns the logits of the last ``keep`` fed
    positions ([keep, V]). ``crop(length)`` drops cached tokens beyond ``length``.
    """

    length: int

    def submit(self, tokens: Sequence[int], keep: int) -> PendingLogits: ...

    def crop(self, length: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class _Done:
    value: torch.Tensor

    def result(self) -> torch.Tensor:
        return self.value


@dataclass
class ForwardCounter:
    """Forward passes and fed tokens of one model: the proof that prefixes are not recomputed."""

    calls: int = 0
    tokens: int = 0

    def reset(self) -> None:
        self.calls = 0
        self.tokens = 0


class CausalLM:
    """A Hugging Face causal LM in eval mode, with forward-pass counters; hands out KV sessions."""

    def __init__(self, model: torch.nn.Module, name: str = "model") -> None:
        self.model = model.eval()
        self.name = name
        self.counter = ForwardCounter()
        params = inspect.signature(model.forward).parameters
        # transformers v5 renamed `past_key_values` to `cache`; accept both.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def vocab_size(self) -> int:
        """Width of the logits (the output embedding's rows)."""
        out = self.model.get_output_embeddings()
        return int(out.weight.shape[0]) if out is not None else int(self.model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> Optional[int]:
        return getattr(self.model.config, "max_position_embeddings", None)

    def new_session(self) -> "LocalSession":
        return LocalSession(self)

    def forward(self, cache, tokens: Sequence[int], keep: int) -> torch.Tensor:
        """One forward pass over ``tokens`` after ``cache``; logits [keep, V] as float32 on CPU."""
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # [1, n]
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **{self._cache_kw: cache})
        self.counter.calls += 1
        self.counter.tokens += len(tokens)
        return out.logits[0, -keep:].float().cpu()  # [keep, V]


class LocalSession:
    """KV cache of one request on an in-process model."""

    def __init__(self, lm: CausalLM) -> None:
        from transformers import DynamicCache

        self.lm = lm
        self.cache = DynamicCache(config=lm.model.config)
        self.length = 0

    def submit(self, tokens: Sequence[int], keep: int) -> _Done:
        if not tokens or not 1 <= keep <= len(tokens):
            raise ValueError(f"submit needs 1 <= keep <= len(tokens), got keep={keep}, {len(tokens)} tokens")
        logits = self.lm.forward(self.cache, tokens, keep)
        self.length += len(tokens)
        return _Done(logits)

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # negative: remove that many trailing tokens
            self.length = length

    def close(self) -> None:
        self.cache = None


# ----------------------------------------------------------------------------- distributions


def eft_logprobs(
    logits_large: torch.Tensor, logits_ft: torch.Tensor, logits_base: torch.Tensor, beta: float
) -> torch.Tensor:
    """EFT log-probabilities, float64, renormalised over the vocabulary. Inputs [..., V] logits."""
    lp_l = torch.log_softmax(logits_large.double(), dim=-1)
    if beta == 0.0:
        return lp_l  # exactly the large base (avoids 0 * (-inf) should a model emit -inf logits)
    delta = torch.log_softmax(logits_ft.double(), dim=-1) - torch.log_softmax(logits_base.double(), dim=-1)
    return torch.log_softmax(lp_l + beta * delta, dim=-1)


def sampling_probs(logprobs: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Temperature then nucleus (top-p) filtering of log-probs [..., V] → probabilities [..., V].

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (the token that
    crosses the threshold is kept), then renormalises. Only for temperature > 0.
    """
    return nucleus(torch.softmax(logprobs / temperature, dim=-1), top_p)


@dataclass
class DecodeStats:
    """Per-request counters; ``acceptance`` = accepted drafts / drafted tokens."""

    prompt_tokens: int = 0
    generated: int = 0
    rounds: int = 0  # verification rounds (= large-model forward passes)
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    finish_reason: str = "length"

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class DecodeParams:
    """Per-request decoding parameters. temperature 0 = greedy; speculative_k 0 = no speculation."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: Tuple[int, ...] = ()
    seed: Optional[int] = None
    speculative_k: int = 0
    logprobs: Optional[int] = None  # per generated token: its EFT log-prob and this many alternatives
    prompt_logprobs: Optional[int] = None  # per prompt token after the first: idem (one scoring pass)

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be within (0, 1], got {self.top_p}")
        if self.speculative_k < 0:
            raise ValueError(f"speculative_k must be >= 0, got {self.speculative_k}")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {getattr(self, name)}")


@dataclass
class ScoredToken:
    """A token with its log-probability under the EFT distribution and the top alternatives."""

    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)  # (token id, log-prob), most likely first


def score_rows(rows: torch.Tensor, ids: Sequence[int], k: int) -> List[ScoredToken]:
    """EFT log-prob rows [N, V] → the log-prob of ``ids[i]`` in row i and the row's top ``k``."""
    chosen = rows.gather(-1, torch.as_tensor(list(ids), dtype=torch.long)[:, None])[:, 0].tolist()
    if k <= 0:
        return [ScoredToken(int(t), float(c)) for t, c in zip(ids, chosen)]
    vals, alts = torch.topk(rows, k, dim=-1)
    return [ScoredToken(int(t), float(c), list(zip(a, v)))
            for t, c, a, v in zip(ids, chosen, alts.tolist(), vals.tolist())]


# ----------------------------------------------------------------------------- decoder


@dataclass
class EFTModels:
    """The three models; anything with ``new_session()`` and ``vocab_size`` (local or remote)."""

    large_base: "CausalLM"
    small_base: "CausalLM"
    small_ft: "CausalLM"

    def named(self) -> Dict[str, "CausalLM"]:
        return {"large_base": self.large_base, "small_base": self.small_base, "small_ft": self.small_ft}


def check_vocabularies(vocab_sizes: Dict[str, int], tokenizers: Optional[Dict[str, object]] = None) -> None:
    """Fail clearly unless every model's logits and every tokenizer (when given) agree.

    Token ids must mean the same strings in all three models, otherwise the per-token arithmetic of
    EFT mixes unrelated tokens: so the logit widths must be equal and the tokenizers' vocabularies
    (token → id maps) and special tokens identical.
    """
    if len(set(vocab_sizes.values())) > 1:
        sizes = ", ".join(f"{k}={v}" for k, v in vocab_sizes.items())
        raise VocabularyMismatchError(f"EFT models must share one vocabulary; logit widths differ: {sizes}")
    toks = {k: t for k, t in (tokenizers or {}).items() if t is not None}
    if len(toks) < 2:
        return
    names = list(toks)
    ref_name, ref = names[0], toks[names[0]]
    ref_vocab = ref.get_vocab()
    for name in names[1:]:
        vocab = toks[name].get_vocab()
        if vocab != ref_vocab:
            diff = sorted(set(vocab.items()) ^ set(ref_vocab.items()), key=lambda kv: kv[1])[:3]
            raise VocabularyMismatchError(
                f"EFT tokenizers differ: {name} ({len(vocab)} tokens) vs {ref_name} ({len(ref_vocab)} tokens); "
                f"first differing (token, id) entries: {diff}"
            )
        for attr in ("bos_token_id", "eos_token_id"):
            a, b = getattr(toks[name], attr, None), getattr(ref, attr, None)
            if a != b:
                raise VocabularyMismatchError(f"EFT tokenizers differ in {attr}: {name}={a} vs {ref_name}={b}")
    width = next(iter(vocab_sizes.values()), None)
    if width is not None and len(ref) > width:
        raise VocabularyMismatchError(f"tokenizer has {len(ref)} tokens but the models' logits only {width}")


class EFTDecoder:
    """Generates from the EFT distribution of three models, with optional speculative decoding."""

    def __init__(self, models: EFTModels, beta: float = 1.0, max_positions: Optional[int] = None) -> None:
        check_vocabularies({k: m.vocab_size for k, m in models.named().items()})
        self.models = models
        self.beta = float(beta)
        limits = [getattr(m, "max_positions", None) for m in models.named().values()]
        limits = [x for x in limits + [max_positions] if x]
        self.max_positions = min(limits) if limits else None  # context limit of the weakest model

    # -- distributions (exposed for tests and debugging; generation uses the same functions)

    def target_logprobs(self, prefix: Sequence[int]) -> torch.Tensor:
        """EFT log-probs [V] (float64) of the token after ``prefix``, via fresh cached sessions."""
        sessions = self._open()
        try:
            return self._verify(sessions, list(prefix), keep=1)[0]
        finally:
            self._close(sessions)

    def _open(self) -> Tuple[Session, Session, Session]:
        m = self.models
        return m.large_base.new_session(), m.small_base.new_session(), m.small_ft.new_session()

    @staticmethod
    def _close(sessions: Sequence[Session]) -> None:
        for s in sessions:
            s.close()

    def _verify(self, sessions, fed: List[int], keep: int) -> torch.Tensor:
        """One forward pass of each model over ``fed``; EFT log-probs [keep, V] (float64)."""
        futures = [s.submit(fed, keep) for s in sessions]  # all in flight at once when remote
        logits_l, logits_b, logits_ft = (f.result() for f in futures)
        return eft_logprobs(logits_l, logits_ft, logits_b, self.beta)

    # -- generation

    def generate(
        self, prompt_ids: Sequence[int], params: DecodeParams, stats: Optional[DecodeStats] = None
    ) -> Iterator[int]:
        """Yield generated token ids (a stop token is yielded, then generation ends)."""
        for item in self.decode(prompt_ids, params, stats):
            if isinstance(item, ScoredToken):
                yield item.token_id

    def decode(
        self, prompt_ids: Sequence[int], params: DecodeParams, stats: Optional[DecodeStats] = None
    ) -> Iterator[Union[ScoredToken, List[Optional[ScoredToken]]]]:
        """Like :meth:`generate`, with the EFT log-probs each token was chosen from (before
        temperature / top-p): with ``params.prompt_logprobs`` first the prompt's scores (a list,
        None for the first token), then a :class:`ScoredToken` per generated token (top
        alternatives when ``params.logprobs`` > 0). ``max_new_tokens == 0``: the scores only."""
        params.check()
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids must not be empty")
        stats = stats if stats is not None else DecodeStats()
        stats.prompt_tokens = len(prompt)
        budget = params.max_new_tokens
        if self.max_positions is not None:
            room = self.max_positions - len(prompt)
            if room < (1 if budget > 0 else 0):
                raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the "
                                 f"{self.max_positions}-token context")
            budget = min(budget, room)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        gen = torch.Generator().manual_seed(seed)  # per request: reproducible, no global RNG state
        stop = set(params.stop_token_ids)
        k_top = params.logprobs or 0
        sessions = self._open()
        t0 = time.perf_counter()
        try:
            pending = prompt  # tokens committed but not yet in the caches
            produced = 0
            new: List[Tuple[int, torch.Tensor]] = []
            if params.prompt_logprobs is not None:  # one scoring pass over the prompt, then decode on
                scores, last = self._score_prompt(sessions, prompt, params.prompt_logprobs, stats)
                yield scores
                if budget > 0:
                    new = [(self._sample(last, params, gen), last)]
            while produced < budget:
                if not new:
                    new = self._round(sessions, pending, params, gen, budget - produced - 1, stats)
                for tok, row in new:
                    produced += 1
                    stats.generated = produced
                    yield score_rows(row[None], [tok], k_top)[0]
                    if tok in stop:
                        stats.finish_reason = "stop"
                        return
                pending, new = [new[-1][0]], []
            stats.finish_reason = "length"
        finally:
            stats.seconds = time.perf_counter() - t0
            self._close(sessions)

    def _score_prompt(self, sessions, prompt: List[int], k: int, stats: DecodeStats, chunk: int = 256):
        """EFT scores of every prompt token and the EFT log-probs [V] of the token after the
        prompt, from ONE forward pass per model; combined in chunks of positions to bound memory."""
        stats.rounds += 1
        futures = [s.submit(prompt, len(prompt)) for s in sessions]
        logits_l, logits_b, logits_ft = (f.result() for f in futures)  # [T, V] each
        scores: List[Optional[ScoredToken]] = [None]
        last = None
        for a in range(0, len(prompt), chunk):
            b = min(a + chunk, len(prompt))
            rows = eft_logprobs(logits_l[a:b], logits_ft[a:b], logits_b[a:b], self.beta)  # predict a+1..b
            n_scored = min(b, len(prompt) - 1) - a
            scores += score_rows(rows[:n_scored], prompt[a + 1: a + 1 + n_scored], k)
            if b == len(prompt):
                last = rows[-1]
        return scores, last

    def _round(
        self, sessions, pending: List[int], params: DecodeParams, gen: torch.Generator, max_drafts: int, stats
    ) -> List[Tuple[int, torch.Tensor]]:
        """One decoding round: 1..k+1 new tokens, each with the EFT log-probs [V] it was chosen
        from; the caches end covering all of them but the last."""
        large, base, ft = sessions
        greedy = params.temperature == 0.0
        k = min(params.speculative_k, max_drafts)
        stats.rounds += 1
        if k == 0:  # plain EFT step: one forward pass per model, one new token
            target = self._verify(sessions, pending, keep=1)[0]
            return [(self._sample(target, params, gen), target)]

        # Draft k tokens with the small fine-tuned model from its own processed distribution q.
        committed_len = large.length + len(pending)
        drafts: List[int] = []
        ft_rows: List[torch.Tensor] = []  # fine-tuned logits predicting each draft
        q_rows: List[torch.Tensor] = []
        fed = pending
        for _ in range(k):
            row = ft.submit(fed, 1).result()[0]  # [V]
            ft_rows.append(row)
            if greedy:
                d = int(torch.argmax(row))
            else:
                q_rows.append(sampling_probs(torch.log_softmax(row.double(), -1), params.temperature, params.top_p))
                d = int(torch.multinomial(q_rows[-1], 1, generator=gen))
            drafts.append(d)
            fed = [d]
        stats.drafted += k

        # Verify: ONE pass of each base model over pending + drafts gives their logits at the k
        # draft positions and after the last draft ([k+1, V]); the fine-tuned logits at the draft
        # positions are already known from drafting.
        fed = pending + drafts
        futures = [large.submit(fed, k + 1), base.submit(fed, k + 1)]
        logits_l, logits_b = (f.result() for f in futures)
        target = eft_logprobs(logits_l[:k], torch.stack(ft_rows), logits_b[:k], self.beta)  # [k, V]
        out: List[Tuple[int, torch.Tensor]] = []
        accepted = 0
        for i, d in enumerate(drafts):
            if greedy:
                best = int(torch.argmax(target[i]))
                out.append((best, target[i]))
                if best != d:
                    break
            else:
                p = sampling_probs(target[i], params.temperature, params.top_p)
                q = q_rows[i]
                if float(torch.rand((), generator=gen, dtype=torch.float64)) >= float(p[d] / q[d]):
                    residual = torch.clamp(p - q, min=0.0)
                    # With p == q a rejection is impossible; should float rounding cause one, sample p.
                    tok = int(torch.multinomial(residual if float(residual.sum()) > 0 else p, 1, generator=gen))
                    out.append((tok, target[i]))
                    break
                out.append((d, target[i]))
            accepted += 1
        stats.accepted += accepted
        if accepted == k:
            # Bonus token from the target after the last draft; only the fine-tuned model has not
            # seen the last draft yet (its cache is one token short).
            ft_last = ft.submit([drafts[-1]], 1).result()[0]
            bonus = eft_logprobs(logits_l[k], ft_last, logits_b[k], self.beta)
            out.append((self._sample(bonus, params, gen), bonus))
        for s in sessions:
            s.crop(committed_len + accepted)  # drop rejected drafts; the newest token stays pending
        return out

    @staticmethod
    def _sample(logprobs: torch.Tensor, params: DecodeParams, gen: torch.Generator) -> int:
        """One token from EFT log-probs [V]: argmax when greedy, else temperature/top-p sampling."""
        if params.temperature == 0.0:
            return int(torch.argmax(logprobs))
        return int(torch.multinomial(sampling_probs(logprobs, params.temperature, params.top_p), 1, generator=gen))
