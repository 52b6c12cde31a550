"""Serve deployment: OpenAI-compatible API (chat, completions, logprobs) over a Hugging Face causal LM.

Backends (``serve.backend``):
- ``hf`` (default, always works, CPU or GPU): :class:`HFBackend` — a transformers model driven by
  :class:`BatchingEngine`, an iteration-level (continuous) batching scheduler: new requests are
  prefilled as they arrive and merged into the running batch between decode steps, finished ones
  leave it at once, so a long answer never holds a short one back. ``max_batch_size: 1`` turns
  batching off (one request at a time), which the throughput benchmark uses as its baseline.
  Log-probs come from the same passes: per generated token from its row of logits, per prompt
  token (``echo`` scoring) from a prefill that keeps every position's logits. Prefixes are reused:
  a generation request runs only what follows the longest prefix it shares with a finished
  sequence (``serve.kv_prefix``); a scoring request reuses the last scored prompt's KV and
  log-prob entries (the four answer letters of one multiple-choice question, lm-eval's
  continuations of one context).
- ``vllm``: :class:`serve.vllm_backend.VLLMBackend` over vLLM's async engine, when ``vllm`` is importable (GPU
  clusters). ``auto`` picks vLLM when importable and a GPU is visible, else HF.

Both plug into the shared OpenAI layer (``serve.openai_api``). Placement (CPUs/GPUs per replica)
and autoscaling come from the ``serve`` config section (see ``serve.app``).
"""

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional

from ray import serve

from agenttuning.chat import load_tokenizer
from agenttuning.models import load_causal_lm, nucleus, resolve_device
from agenttuning.schema import ModelConfig, ServeConfig
from serve.auth import resolve_api_key
from serve.kv_prefix import PrefixCache, shared_prefix
from serve.openai_api import (
    OpenAIChat,
    OpenAIDeployment,
    PromptLogprobs,
    SamplingParams,
    ServerSettings,
    token_logprobs,
)
from serve.vllm_backend import VLLMBackend, vllm_available  # noqa: F401 - vllm_available re-exported

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- batching engine


@dataclass
class _Request:
    prompt: List[int]
    params: SamplingParams
    out: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: Any = None  # torch.Generator for sampled requests
    n_out: int = 0
    sampled: List[int] = field(default_factory=list)  # tokens picked so far (all but the last are in the KV)


class BatchingEngine:
    """Continuous batching over a HF causal LM with a per-request KV cache row.

    State of the running batch: per layer K/V tensors [B, H, T, D] left-padded to a common T, a
    padding mask [B, T] and each row's next position id. One scheduler thread owns the model.
    """

    def __init__(self, model: Any, eos_ids: List[int], max_batch_size: int = 8, batch_wait_s: float = 0.005,
                 max_context: Optional[int] = None, prefix_cache_mb: int = 512):
        import torch

        self.torch = torch
        self.model = model
        self.device = next(model.parameters()).device
        self.eos = set(int(e) for e in eos_ids)
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait_s = batch_wait_s
        self.max_context = max_context
        self.waiting: "queue.Queue[_Request]" = queue.Queue()
        self.active: List[_Request] = []
        self.kv: List[tuple] = []  # per layer (K, V): [B, H, T, D]
        self.mask = None  # [B, T] long, 1 = real token
        self.next_pos = None  # [B] long
        self.last_tok = None  # [B] long
        self.steps = 0  # forward passes (decode steps), for stats
        self.prefill_tokens = 0  # prompt tokens run through the model, for stats
        # The last scored prompt: (ids, per-layer KV [1, H, T, D], its entries for tokens 1..T-1, top-k).
        self._scored: Optional[tuple] = None
        self.prefix = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb > 0 else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="batching-engine", daemon=True)
        self._thread.start()

    # -- public
    def generate(self, prompt_ids: List[int], params: SamplingParams) -> Iterator[Any]:
        """Blocking iterator: the prompt's log-probs when asked, then generated token ids (or
        ``TokenLogprob``s with ``params.logprobs``) — see ``serve.openai_api``."""
        req = _Request(list(prompt_ids), params)
        if not params.greedy:
            req.generator = self.torch.Generator(device=self.device)
            req.generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little"))
        self.waiting.put(req)
        try:
            while True:
                item = req.out.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            req.cancelled.set()

    def close(self) -> None:
        self._stop.set()
        self.waiting.put(None)  # type: ignore[arg-type]  # wake the loop
        self._thread.join(timeout=10)

    # -- scheduler
    def _loop(self) -> None:
        while not self._stop.is_set():
            new: List[_Request] = []
            try:
                new = self._admit()
                if new:
                    self._prefill(new)
                if self.active:
                    self._decode()
            except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep serving others
                log.exception("batching engine step failed")
                for r in self.active + [r for r in new if r not in self.active]:
                    r.out.put(exc)
                self._reset()
                self._scored = None
                if self.prefix is not None:
                    self.prefix.clear()

    def _admit(self) -> List[_Request]:
        room = self.max_batch_size - len(self.active)
        new: List[_Request] = []
        if room <= 0:
            return new
        while len(new) < room:
            try:
                if not self.active and not new:
                    req = self.waiting.get()  # idle: sleep until work arrives
                elif new:
                    req = self.waiting.get(timeout=self.batch_wait_s)  # a burst: prefill it together
                else:
                    req = self.waiting.get_nowait()  # busy: never stall the running batch
            except queue.Empty:
                break
            if req is None:  # close()
                break
            if req.cancelled.is_set():
                continue
            new.append(req)
        return new

    def _reset(self) -> None:
        self.active, self.kv, self.mask, self.next_pos, self.last_tok = [], [], None, None, None

    def _forward(self, input_ids, mask, positions, kv, keep: int = 1):
        """One forward pass; logits of the last ``keep`` positions (0 = all) [B, keep, V] and the KV."""
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        with self.torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=keep)
        new_kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return out.logits.float(), new_kv

    def _prefill(self, new: List[_Request]) -> None:
        """Prefill arrivals: together (one padded batch, last-position logits) unless a request
        shares a prefix with a cached sequence (then only the rest of its prompt runs) or wants its
        prompt's log-probs (alone: all positions' logits, no padding)."""
        plain, hits = [], []
        for r in new:
            if r.params.prompt_logprobs is None:
                hit = self.prefix.lookup(r.prompt) if self.prefix is not None else None
                (hits.append((r, hit)) if hit else plain.append(r))
        if plain:
            self._merge(plain, *self._prefill_batch(plain))
        for r, (start, past) in hits:
            self._merge([r], *self._run_from(r.prompt, start, past, keep=1))
        # In prompt order, so that prompts sharing a prefix (one request's continuations, even when
        # other requests' arrive between them) follow each other and reuse it.
        for r in sorted((r for r in new if r.params.prompt_logprobs is not None), key=lambda r: r.prompt):
            self._merge([r], *self._prefill_scored(r))

    def _prefill_batch(self, new: List[_Request]):
        """Prompts left-padded to one length: last-position logits [B, 1, V], KV, mask [B, T]."""
        torch = self.torch
        lens = [len(r.prompt) for r in new]
        t_new = max(lens)
        ids = torch.full((len(new), t_new), 0, dtype=torch.long)
        mask = torch.zeros((len(new), t_new), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, t_new - lens[i]:] = torch.tensor(r.prompt)
            mask[i, t_new - lens[i]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        logits, kv = self._forward(ids, mask, pos, None)
        self.prefill_tokens += sum(lens)
        return logits, kv, mask

    def _run_from(self, prompt: List[int], start: int, past: Optional[list], keep: int):
        """One prompt whose KV of tokens 0..start-1 is `past`: runs tokens start.. only.
        Returns logits of the last `keep` positions (0 = all run) [1, keep, V], KV, mask [1, T]."""
        torch = self.torch
        t = len(prompt)
        ids = torch.tensor([prompt[start:]], dtype=torch.long, device=self.device)
        pos = torch.arange(start, t, device=self.device)[None]
        mask = torch.ones((1, t), dtype=torch.long, device=self.device)
        logits, kv = self._forward(ids, mask, pos, past if start else None, keep=keep)
        self.prefill_tokens += t - start
        return logits, kv, mask

    def _merge(self, new: List[_Request], logits, kv, mask) -> None:
        """Join prefilled requests to the running batch (left-padding the shorter side to a common
        T) and pick their first tokens. logits [B, *, V] (the last position is the next token's)."""
        torch = self.torch
        lens = [len(r.prompt) for r in new]
        t_new = mask.shape[1]
        logits = logits[:, -1]  # [B, V]: the next token's
        next_pos = torch.tensor(lens, device=self.device)
        if self.active:  # merge into the running batch: left-pad the shorter side to a common T
            t_old = self.mask.shape[1]
            t = max(t_old, t_new)
            self.kv = [(torch.cat([_lpad(k0, t), _lpad(k1, t)]), torch.cat([_lpad(v0, t), _lpad(v1, t)]))
                       for (k0, v0), (k1, v1) in zip(self.kv, kv)]
            self.mask = torch.cat([_lpad(self.mask, t), _lpad(mask, t)])
            self.next_pos = torch.cat([self.next_pos, next_pos])
            self.last_tok = torch.cat([self.last_tok, torch.zeros(len(new), dtype=torch.long, device=self.device)])
        else:
            self.kv, self.mask, self.next_pos = kv, mask, next_pos
            self.last_tok = torch.zeros(len(new), dtype=torch.long, device=self.device)
        offset = len(self.active)
        self.active.extend(new)
        self._sample_and_emit(logits, range(offset, offset + len(new)), first=offset)

    def _prefill_scored(self, r: _Request):
        """Run one request that wants its prompt's log-probs and emit them; returns what
        :meth:`_run_from` returns (all positions' logits), for :meth:`_merge`.

        Only the part after the prefix it shares with the last scored prompt is run: with a shared
        length L, that prompt's KV of tokens 0..L-2 and its entries for tokens 1..L-1 are reused
        (token t's log-prob depends on tokens 0..t only), and tokens L-1.. are run (L-1 again, for
        the distribution of token L).
        """
        prompt, k = r.prompt, r.params.prompt_logprobs
        shared = 0
        if self._scored is not None and self._scored[3] == k:  # same top-k: cached entries fit
            shared = shared_prefix(self._scored[0], prompt, len(prompt) - 1)
        start = max(shared - 1, 0)
        past = [(kk[:, :, :start], v[:, :, :start]) for kk, v in self._scored[1]] if start else None
        logits, kv, mask = self._run_from(prompt, start, past, keep=0)  # [1, t - start, V]
        rows = self.torch.log_softmax(logits[0, :-1], dim=-1)  # positions start..t-2 → tokens start+1..t-1
        entries = (self._scored[2][:start] if start else []) + token_logprobs(rows, prompt[start + 1:], k)
        self._scored = (list(prompt), kv, entries, k)
        r.out.put(PromptLogprobs([None] + entries))
        return logits, kv, mask

    def _decode(self) -> None:
        torch = self.torch
        b = len(self.active)
        mask = torch.cat([self.mask, torch.ones((b, 1), dtype=self.mask.dtype, device=self.device)], dim=1)
        logits, self.kv = self._forward(self.last_tok[:, None], mask, self.next_pos[:, None], self.kv)
        logits = logits[:, -1]
        self.mask = mask
        self.next_pos = self.next_pos + 1
        self.steps += 1
        self._sample_and_emit(logits, range(b))

    def _sample_and_emit(self, logits, rows, first: int = 0) -> None:
        """Pick the next token of each row in ``rows`` (logits row ``i - first``); emit or finish."""
        torch = self.torch
        done = []
        for i in rows:
            req = self.active[i]
            if req.cancelled.is_set() or req.params.max_tokens <= 0:  # 0: the prompt's log-probs only
                done.append(i)
                continue
            row = logits[i - first]
            tok = _sample(torch, row, req.params, req.generator)
            req.sampled.append(tok)
            self.last_tok[i] = tok
            full = self.max_context is not None and int(self.next_pos[i]) + 1 >= self.max_context
            if tok in self.eos:
                done.append(i)
                continue
            if req.params.logprobs is None:
                req.out.put(tok)
            else:  # the raw distribution's log-probs (before temperature / top-p), as OpenAI reports
                req.out.put(token_logprobs(torch.log_softmax(row, -1)[None], [tok], req.params.logprobs)[0])
            req.n_out += 1
            if req.n_out >= req.params.max_tokens or full:
                done.append(i)
        if done:
            self._drop(done)

    def _drop(self, rows: List[int]) -> None:
        """Remove finished rows from the batch (keeping their sequences for prefix reuse), then
        end their streams: a caller that sees its end finds the batch without it."""
        torch = self.torch
        done = [self.active[i] for i in rows]
        for i, req in zip(rows, done):
            if self.prefix is not None and req.params.prompt_logprobs is None and not req.cancelled.is_set():
                # Row i's real tokens are its last next_pos columns (rows are left-padded): the
                # prompt and all picked tokens but the last, which was never run.
                n = int(self.next_pos[i])
                ids = req.prompt + req.sampled[: n - len(req.prompt)]
                self.prefix.put(ids, [(k[i:i + 1, :, -n:].clone(), v[i:i + 1, :, -n:].clone()) for k, v in self.kv])
        keep = [i for i in range(len(self.active)) if i not in set(rows)]
        if not keep:
            self._reset()
        else:
            idx = torch.tensor(keep, device=self.device)
            self.active = [self.active[i] for i in keep]
            mask = self.mask.index_select(0, idx)
            # Columns that are padding in every remaining row carry nothing: cut them.
            first = int((mask.sum(0) > 0).nonzero()[0])
            self.mask = mask[:, first:]
            self.kv = [(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:]) for k, v in self.kv]
            self.next_pos = self.next_pos.index_select(0, idx)
            self.last_tok = self.last_tok.index_select(0, idx)
        for req in done:
            req.out.put(None)


def _lpad(x, t: int):
    """Left-pad dim 1 (mask [B, T]) or dim 2 (K/V [B, H, T, D]) with zeros up to length t."""
    import torch

    dim = 1 if x.dim() == 2 else 2
    missing = t - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim=dim)


def _sample(torch, logits, params: SamplingParams, generator) -> int:
    """Greedy at temperature 0, else temperature + nucleus (top_p) sampling. logits: [V]."""
    if params.greedy:
        return int(logits.argmax())
    probs = nucleus(torch.softmax(logits / params.temperature, dim=-1), params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


# ----------------------------------------------------------------------------- backends


class HFBackend:
    """A transformers model + tokenizer behind :class:`BatchingEngine` (the default backend)."""

    supports_logprobs = True

    def __init__(self, name_or_path: str, model_id: Optional[str] = None, chat_template: str = "llama2",
                 dtype: str = "auto", device: str = "auto", max_batch_size: int = 8, batch_wait_s: float = 0.005,
                 trust_remote_code: bool = False, torch_threads: Optional[int] = None):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = resolve_device(device)
        self.model_id = model_id or os.path.basename(os.path.normpath(name_or_path))
        self.tokenizer = load_tokenizer(name_or_path, chat_template, trust_remote_code)
        self.model = load_causal_lm(name_or_path, dtype, device, trust_remote_code)
        self.max_model_tokens = getattr(self.model.config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.engine = BatchingEngine(self.model, eos_ids, max_batch_size, batch_wait_s, self.max_model_tokens)
        log.info("HF backend %s on %s (batch %d)", self.model_id, device, max_batch_size)

    def generate(self, prompt_ids: List[int], params: SamplingParams) -> Iterator[Any]:
        return self.engine.generate(prompt_ids, params)


def make_backend(s: ServeConfig, model: ModelConfig) -> Any:
    """Backend from the ``serve`` and ``model`` config sections."""
    choice = s.backend
    if choice == "auto":
        import torch

        choice = "vllm" if torch.cuda.is_available() and vllm_available() else "hf"  # GPU first: importing vLLM is slow
    common = dict(name_or_path=model.name_or_path, model_id=s.model_id, chat_template=model.chat_template,
                  dtype=str(model.dtype), trust_remote_code=model.trust_remote_code)
    if choice == "vllm":
        return VLLMBackend(**common, tensor_parallel_size=s.tensor_parallel_size, max_model_len=s.max_model_tokens)
    return HFBackend(**common, device=str(s.device), max_batch_size=s.max_batch_size,
                     batch_wait_s=s.batch_wait_s, torch_threads=s.torch_threads)


def server_settings(s: ServeConfig, model: ModelConfig, backend: Any) -> ServerSettings:
    return ServerSettings(system_prompt=model.system_prompt, default_max_tokens=s.default_max_tokens,
                          max_model_tokens=s.max_model_tokens or getattr(backend, "max_model_tokens", None),
                          aliases=list(s.aliases))


@serve.deployment(name="LLMServer")
@serve.ingress()
class LLMServer(OpenAIDeployment):
    """OpenAI-compatible model server (HTTP ingress + ``chat`` method for Serve handles)."""

    def __init__(self, serve_cfg: ServeConfig, model_cfg: ModelConfig):
        # The key is read here, in the replica (serve.auth): it never travels in the app's arguments.
        self.api_key = resolve_api_key(serve_cfg.api_key_env, serve_cfg.api_key_file)
        self.backend = make_backend(serve_cfg, model_cfg)
        self.chat_api = OpenAIChat(self.backend, server_settings(serve_cfg, model_cfg, self.backend))
