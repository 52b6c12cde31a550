"""Serve deployment: EFT / LM up-scaling with speculative decoding, OpenAI-compatible.

The decoding itself is ``serve.eft_decoding`` (pure torch); this module loads the three models,
checks that they share a vocabulary before any weights are loaded, and serves the result through
the shared OpenAI layer (``serve.openai_api``), so clients — the ``openai`` package,
``agenttuning eval`` with an ``openai`` policy — see an ordinary chat model.

Placement (``eft.placement``):
- ``colocated``: one replica holds all three models (one GPU, or CPU);
- ``separate``: each model is its own deployment (``EFTModelWorker``, e.g. one GPU each, possibly
  on different nodes) holding per-request KV caches; the ingress keeps only the sampling logic and
  sends each worker the new tokens of a step, receiving logits. The large and small base passes
  of a verification step run concurrently.

    agenttuning eft configs/eft_tiny.yaml            # = python -m serve.eft configs/eft_tiny.yaml
"""

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional

import torch
from omegaconf import DictConfig
from ray import serve

from agenttuning.chat import load_tokenizer
from agenttuning.cluster import ray_session
from agenttuning.config import load_config, to_object
from agenttuning.models import ensure_model, load_causal_lm, resolve_device
from agenttuning.schema import EFTConfig, ModelConfig, ServeConfig
from serve.auth import resolve_api_key
from serve.eft_decoding import (
    CausalLM,
    DecodeParams,
    DecodeStats,
    EFTDecoder,
    EFTModels,
    ScoredToken,
    check_vocabularies,
)
from serve.lifecycle import placement, serve_until_stopped
from serve.openai_api import (
    OpenAIChat,
    OpenAIDeployment,
    PromptLogprobs,
    SamplingParams,
    ServerSettings,
    TokenLogprob,
    build_openai_app,
    run_local_server,
)

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model', 'eft')  # what `--help` lists

ROLES = ("large_base", "small_base", "small_ft")


# ----------------------------------------------------------------------------- loading


def model_paths(eft: EFTConfig, model: ModelConfig) -> Dict[str, str]:
    """Role → path; the small fine-tuned model defaults to ``model.name_or_path``."""
    paths = {"large_base": eft.large_base, "small_base": eft.small_base,
             "small_ft": eft.small_ft or model.name_or_path}
    missing = [f"eft.{k}" for k, v in paths.items() if not v]
    if missing:
        raise ValueError(f"EFT needs three models; config key(s) not set: {', '.join(missing)}")
    return paths  # type: ignore[return-value]


def _load_tokenizer_or_none(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # a weights-only folder: the others' tokenizers decide
        log.warning("no tokenizer loadable from %s (%s); relying on the logit widths", path, exc)
        return None


def check_models(paths: Dict[str, str], trust_remote_code: bool = False) -> None:
    """Fail before loading any weights unless the three models share one vocabulary."""
    from transformers import AutoConfig

    sizes = {r: int(AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code).vocab_size)
             for r, p in paths.items()}
    toks = {r: _load_tokenizer_or_none(p, trust_remote_code) for r, p in paths.items()}
    check_vocabularies(sizes, toks)


def load_lm(path: str, role: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False) -> CausalLM:
    model = load_causal_lm(path, dtype, device, trust_remote_code)
    log.info("EFT %s: %s on %s (%d GPUs visible)", role, path, resolve_device(device), torch.cuda.device_count())
    return CausalLM(model, role)


# ----------------------------------------------------------------------------- backend


class EFTBackend:
    """``serve.openai_api`` backend over an :class:`EFTDecoder`.

    ``lms`` maps role → a local :class:`CausalLM` or a :class:`RemoteLM` (separate placement).
    Log-probs (``logprobs``, ``echo`` scoring) are those of the combined EFT distribution — the one
    generation samples from — before temperature and top-p.
    """

    supports_logprobs = True

    def __init__(self, eft: EFTConfig, model: ModelConfig, lms: Optional[Dict[str, Any]] = None):

        paths = model_paths(eft, model)
        trust = model.trust_remote_code
        check_models(paths, trust)
        if eft.torch_threads:
            torch.set_num_threads(eft.torch_threads)
        if lms is None:
            lms = {r: load_lm(p, r, eft.dtype, eft.device, trust) for r, p in paths.items()}
        self.decoder = EFTDecoder(EFTModels(**lms), beta=eft.beta)
        self.speculative_k = eft.speculative_k
        # Prompts are rendered with the fine-tuned model's chat format (it is the one that was tuned).
        self.tokenizer = load_tokenizer(paths["small_ft"], model.chat_template, trust)
        self.model_id = eft.model_id or (
            f"eft-{os.path.basename(os.path.normpath(paths['small_ft']))}-on-"
            f"{os.path.basename(os.path.normpath(paths['large_base']))}")
        self.max_model_tokens = self.decoder.max_positions
        self.eos_ids = tuple(i for i in {self.tokenizer.eos_token_id} if i is not None)
        self.totals = DecodeStats()
        self._lock = threading.Lock()

    def generate(self, prompt_ids: List[int], params: SamplingParams) -> Iterator[Any]:
        """The prompt's EFT log-probs when asked, then the EFT model's tokens (ids, or
        ``TokenLogprob``s with ``params.logprobs``); stops at EOS without yielding it."""
        dp = DecodeParams(max_new_tokens=params.max_tokens, temperature=params.temperature,
                          top_p=params.top_p if not params.greedy else 1.0, stop_token_ids=self.eos_ids,
                          seed=params.seed, speculative_k=self.speculative_k, logprobs=params.logprobs,
                          prompt_logprobs=params.prompt_logprobs)
        st = DecodeStats()
        try:
            for item in self.decoder.decode(prompt_ids, dp, st):
                if not isinstance(item, ScoredToken):  # the prompt's scores
                    yield PromptLogprobs([None if e is None else TokenLogprob(e.token_id, e.logprob, e.top)
                                          for e in item])
                    continue
                if item.token_id in self.eos_ids:
                    return
                yield item.token_id if params.logprobs is None else TokenLogprob(item.token_id, item.logprob, item.top)
        finally:
            self._account(st)

    def _account(self, st: DecodeStats) -> None:
        with self._lock:
            t = self.totals
            t.generated += st.generated
            t.rounds += st.rounds
            t.drafted += st.drafted
            t.accepted += st.accepted
            t.seconds += st.seconds
        log.info("EFT request: %d tokens in %.2fs, %d rounds, acceptance %.2f",
                 st.generated, st.seconds, st.rounds, st.acceptance)

    def stats(self) -> Dict[str, float]:
        t = self.totals
        return {"generated": t.generated, "rounds": t.rounds, "drafted": t.drafted, "accepted": t.accepted,
                "acceptance": t.acceptance, "tokens_per_s": t.generated / t.seconds if t.seconds else 0.0}


def server_settings(model: ModelConfig, s: ServeConfig, backend: EFTBackend) -> ServerSettings:
    return ServerSettings(system_prompt=model.system_prompt, default_max_tokens=s.default_max_tokens,
                          max_model_tokens=backend.max_model_tokens, aliases=list(s.aliases))


# ----------------------------------------------------------------------------- separate placement


@serve.deployment(name="EFTModelWorker")
class EFTModelWorker:
    """One of the three models with per-request KV-cache sessions (``eft.placement: separate``).

    Sessions live in this replica's memory, so each worker deployment runs one replica; sessions
    a client never closed are evicted least-recently-used beyond ``max_sessions``.
    """

    def __init__(self, path: str, role: str, eft: EFTConfig, trust_remote_code: bool = False):
        if eft.torch_threads:
            torch.set_num_threads(eft.torch_threads)
        self.lm = load_lm(path, role, eft.dtype, eft.device, trust_remote_code)
        self.max_sessions = eft.max_sessions
        self.sessions: "OrderedDict[str, Any]" = OrderedDict()
        self._lock = threading.Lock()

    def info(self) -> Dict[str, Any]:
        return {"vocab_size": self.lm.vocab_size, "max_positions": self.lm.max_positions, "role": self.lm.name}

    def open(self) -> str:
        sid = uuid.uuid4().hex
        with self._lock:
            self.sessions[sid] = self.lm.new_session()
            while len(self.sessions) > self.max_sessions:
                old, _ = self.sessions.popitem(last=False)
                log.warning("%s: evicted KV session %s (over max_sessions=%d)", self.lm.name, old, self.max_sessions)
        return sid

    def _get(self, sid: str):
        with self._lock:
            if sid not in self.sessions:
                raise KeyError(f"{self.lm.name}: unknown or evicted KV session {sid}")
            self.sessions.move_to_end(sid)
            return self.sessions[sid]

    def submit(self, sid: str, tokens: List[int], keep: int, crop_to: Optional[int] = None):
        """Crop (the client's pending rejection) then one forward pass; logits [keep, V] float32."""
        session = self._get(sid)
        if crop_to is not None:
            session.crop(crop_to)
        return session.submit(tokens, keep).result().numpy()

    def close(self, sid: str) -> None:
        with self._lock:
            self.sessions.pop(sid, None)

    def counters(self) -> Dict[str, int]:
        return {"calls": self.lm.counter.calls, "tokens": self.lm.counter.tokens}


class _RemoteLogits:
    def __init__(self, response):
        self.response = response

    def result(self) -> torch.Tensor:
        return torch.from_numpy(self.response.result())


class RemoteSession:
    """A KV session held by an :class:`EFTModelWorker`; same interface as a local session."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.sid = handle.open.remote().result()
        self.length = 0
        self._crop_to: Optional[int] = None

    def submit(self, tokens, keep: int) -> _RemoteLogits:
        # A crop rides on the next forward call: Serve does not order separate calls, and it
        # saves a round trip per decoding round.
        crop_to, self._crop_to = self._crop_to, None
        self.length += len(tokens)
        return _RemoteLogits(self.handle.submit.remote(self.sid, list(tokens), keep, crop_to))

    def crop(self, length: int) -> None:
        if length < self.length:
            self._crop_to = length
            self.length = length

    def close(self) -> None:
        self.handle.close.remote(self.sid)


class RemoteLM:
    """A model served by an :class:`EFTModelWorker` deployment handle."""

    def __init__(self, handle, info: Dict[str, Any]) -> None:
        self.handle = handle  # `info`: the worker's info() (awaited by the caller: no blocking in a loop)
        self.name, self.vocab_size, self.max_positions = info["role"], info["vocab_size"], info["max_positions"]

    def new_session(self) -> RemoteSession:
        return RemoteSession(self.handle)


# ----------------------------------------------------------------------------- ingress


@serve.deployment(name="EFTServer")
@serve.ingress()
class EFTServer(OpenAIDeployment):
    """OpenAI-compatible EFT server (HTTP ingress + ``chat`` method for Serve handles)."""

    async def __init__(self, eft: EFTConfig, model: ModelConfig, serve_cfg: ServeConfig,
                       large_base=None, small_base=None, small_ft=None):
        # async: the worker handles must be awaited, a replica constructor runs in the event loop
        handles = {"large_base": large_base, "small_base": small_base, "small_ft": small_ft}
        lms = {r: RemoteLM(h, await h.info.remote()) for r, h in handles.items()} if large_base is not None else None
        # The key is read here, in the replica (serve.auth): it never travels in the app's arguments.
        self.api_key = resolve_api_key(serve_cfg.api_key_env, serve_cfg.api_key_file)
        self.backend = EFTBackend(eft, model, lms)
        self.chat_api = OpenAIChat(self.backend, server_settings(model, serve_cfg, self.backend))

    def stats(self) -> Dict[str, float]:
        """Totals over served requests: tokens, rounds, drafted/accepted tokens, tokens/s."""
        return self.backend.stats()


def build_eft_app(cfg: DictConfig):
    """The EFT application for ``cfg.eft`` (+ ``cfg.model`` chat format, ``cfg.serve`` defaults)."""
    eft, model, s = to_object(cfg.eft), to_object(cfg.model), to_object(cfg.serve)
    paths = model_paths(eft, model)
    check_models(paths, model.trust_remote_code)  # fail here, not in a replica
    ingress_opts = placement(1, None, eft.max_ongoing_requests, eft.num_cpus, eft.num_gpus,
                             s.max_queued_requests, s.retry_after_s)
    if eft.placement == "colocated":
        return EFTServer.options(**ingress_opts).bind(eft, model, s)
    workers = {}
    for role, path in paths.items():
        gpus = eft.large_num_gpus if role == "large_base" and eft.large_num_gpus is not None else eft.num_gpus
        workers[role] = EFTModelWorker.options(
            name=f"EFTModelWorker_{role}", num_replicas=1, max_ongoing_requests=max(16, eft.max_ongoing_requests * 4),
            ray_actor_options={"num_cpus": eft.num_cpus, "num_gpus": gpus},
        ).bind(path, role, eft, model.trust_remote_code)
    # The ingress only samples: no GPU, little CPU.
    ingress_opts["ray_actor_options"] = {"num_cpus": min(eft.num_cpus, 0.5), "num_gpus": 0}
    return EFTServer.options(**ingress_opts).bind(eft, model, s, **workers)


def eft_builder(args: Dict[str, str]):
    """Entry for Serve config files / ``serve run serve.eft:eft_builder config=PATH [k=v ...]``."""

    args = dict(args)
    path = args.pop("config", None)
    return build_eft_app(load_config(path, [f"{k}={v}" for k, v in args.items()]))


def serve_without_ray(cfg: DictConfig) -> None:
    """``eft.use_ray=false``: the same OpenAI API from this process with plain uvicorn (development)."""

    s = to_object(cfg.serve)
    api_key = resolve_api_key(s.api_key_env, s.api_key_file)
    backend = EFTBackend(to_object(cfg.eft), to_object(cfg.model))
    settings = server_settings(to_object(cfg.model), s, backend)
    with run_local_server(build_openai_app(backend, settings, api_key), s.host, s.port) as url:
        print(f"serving EFT model '{backend.model_id}' at {url} (OpenAI-compatible, no Ray)", flush=True)
        while cfg.eft.blocking:  # until SIGINT/SIGTERM (agenttuning.cli)
            time.sleep(3600)


def main(cfg: DictConfig) -> None:
    """`agenttuning eft CONFIG`: deploy the EFT server and serve until stopped."""

    if not cfg.eft.small_ft:
        ensure_model(cfg)  # the tiny default small model is built on first use
    if not cfg.eft.use_ray:
        return serve_without_ray(cfg)
    e = cfg.eft
    what = f"EFT (large base {e.large_base}, beta {e.beta}, k {e.speculative_k}, {e.placement}; OpenAI API under /v1)"
    with ray_session():
        serve_until_stopped(to_object(cfg.serve), [(build_eft_app(cfg), e.app_name, e.route_prefix, what)], e.blocking)


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("serve.eft", sys.argv[1:]))
