"""vLLM as the serving engine, where it is installed (``serve.backend: vllm``), and Ray Serve LLM.

Two ways to serve a model with vLLM:

- :class:`VLLMBackend`: vLLM's async engine (paged attention, continuous batching, CUDA graphs on
  GPUs) behind the project's backend protocol (``serve.openai_core.Backend``), inside the
  project's own model deployment (``serve.llm.LLMServer``). Everything above the backend stays the
  project's: the chat template and server-side system prompt (``agenttuning.chat``), stop strings,
  ``n``, legacy completions, log-probs, API keys, and the ``chat``/``model_id`` handle methods the
  rollout deployment calls. ``serve.backend: vllm`` selects it (``auto``: when vLLM imports and a
  GPU is visible; see ``serve.llm.make_backend``).
- :func:`build_ray_llm_app`: Ray Serve LLM (``ray.serve.llm``, installed by ``ray[llm]``), Ray's
  standard vLLM application with its own OpenAI ingress, for plain serving on GPU clusters. Its
  API is vLLM's, not the project's: it renders prompts with the checkpoint's own chat template,
  adds no server-side system prompt, and has no ``LLMServer`` handle, so the evaluation job
  reaches it as a ``kind: openai`` policy at its ``/v1`` URL. Entry point for ``serve run``:
  :func:`ray_llm_builder`.

vLLM is not a project dependency: its releases pin ``transformers``, ``fastapi``, ``torch`` (and
through ``mistral-common``, ``numpy``) to ranges that exclude the versions in constraints.txt;
docs/vllm.md has the measured conflicts and the CPU benchmark against the HF backend. Nothing
here imports vLLM or Ray Serve LLM at module level, so ``serve.llm`` imports this file freely.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Dict, List, Mapping, Optional, Union

from agenttuning.chat import load_tokenizer
from agenttuning.config import load_config, to_object
from serve.openai_core import PromptLogprobs, SamplingParams, TokenLogprob

if TYPE_CHECKING:  # pragma: no cover - typing only
    from agenttuning.schema import ModelConfig, ServeConfig

log = logging.getLogger(__name__)

# vLLM on CPU reserves ``gpu_memory_utilization`` (default 0.9) of the NUMA node's memory for the
# KV cache and refuses to start when that much is not free, which on a machine shared with other
# processes it rarely is. A fixed KV cache is the reliable choice there (VLLM_CPU_KVCACHE_SPACE,
# in GiB, still overrides it, as vLLM documents).
CPU_KV_CACHE_GIB = 1.0


def vllm_available() -> bool:
    """True when ``vllm`` imports (found *and* loadable: a CUDA-linked wheel on CPU is not)."""
    if importlib.util.find_spec("vllm") is None:  # cheap: importing vLLM takes seconds
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _token_logprob(token_id: int, position: Optional[Mapping[int, Any]], k: int) -> TokenLogprob:
    """One of vLLM's per-position log-prob maps (token id → ``Logprob(logprob, rank)``, the ``k``
    most likely tokens plus the chosen one) → the protocol's :class:`TokenLogprob`."""
    if not position or token_id not in position:
        raise RuntimeError(f"vLLM returned no log-prob for token {token_id}")
    ranked = sorted(position.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
    top = [(int(t), float(lp.logprob)) for t, lp in ranked if lp.rank is not None and lp.rank <= k]
    return TokenLogprob(int(token_id), float(position[token_id].logprob), top[:k])


def _prompt_logprobs(prompt_ids: List[int], entries: Any, k: int) -> PromptLogprobs:
    """vLLM's ``RequestOutput.prompt_logprobs`` (None first, then one map per prompt token)."""
    out: List[Optional[TokenLogprob]] = [None]
    for tok, position in zip(prompt_ids[1:], list(entries)[1:]):
        out.append(_token_logprob(tok, position, k))
    return PromptLogprobs(out)


def _eos_ids(name_or_path: str, tokenizer: Any, trust_remote_code: bool) -> List[int]:
    """End-of-sequence ids as the HF backend has them: the generation config's and the tokenizer's."""
    from transformers import GenerationConfig

    ids: List[int] = []
    try:
        eos = GenerationConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
    except OSError:  # a checkpoint without generation_config.json: the tokenizer's EOS only
        pass
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return sorted(set(ids))


class VLLMBackend:
    """vLLM's async engine behind the project's backend protocol (see ``serve.openai_api``).

    Prompts arrive as token ids rendered by the project's chat template, so a conversation is
    tokenized exactly as with the HF backend. Log-probs are vLLM's raw log-probs (before
    temperature and top-p), as the protocol asks. On a machine without a visible GPU the KV cache
    is a fixed ``kv_cache_gib`` (default :data:`CPU_KV_CACHE_GIB`) instead of a memory fraction.
    """

    supports_logprobs = True

    def __init__(self, name_or_path: str, model_id: Optional[str] = None, chat_template: str = "llama2",
                 dtype: str = "auto", tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 trust_remote_code: bool = False, max_model_len: Optional[int] = None,
                 kv_cache_gib: Optional[float] = None, enforce_eager: bool = False,
                 engine_kwargs: Optional[Dict[str, Any]] = None, **_: Any):
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as exc:
            raise RuntimeError("serve.backend=vllm but vllm is not installed (or does not import here); "
                               "use serve.backend=hf, or see docs/vllm.md") from exc
        import torch


        self.model_id = model_id or os.path.basename(os.path.normpath(name_or_path))
        self.tokenizer = load_tokenizer(name_or_path, chat_template, trust_remote_code)
        self.eos_ids = set(_eos_ids(name_or_path, self.tokenizer, trust_remote_code))
        kwargs: Dict[str, Any] = dict(model=name_or_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                      gpu_memory_utilization=gpu_memory_utilization,
                                      trust_remote_code=trust_remote_code, max_model_len=max_model_len,
                                      enforce_eager=enforce_eager, disable_log_stats=True)
        if kv_cache_gib is None and not torch.cuda.is_available() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gib = CPU_KV_CACHE_GIB
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        kwargs.update(engine_kwargs or {})
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kwargs))
        self.max_model_tokens: Optional[int] = self.engine.model_config.max_model_len
        log.info("vLLM backend %s (context %s, tensor parallel %d)", self.model_id, self.max_model_tokens,
                 tensor_parallel_size)

    def _sampling(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        return VSP(
            # vLLM generates at least one token; max_tokens=0 (prompt log-probs only) drops it.
            max_tokens=max(1, params.max_tokens),
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            seed=params.seed,
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            # Only the new tokens per step: cumulative outputs cost O(n^2) over a long answer.
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, prompt_ids: List[int], params: SamplingParams) -> AsyncIterator[Union[int, TokenLogprob, PromptLogprobs]]:
        """Token ids (or :class:`TokenLogprob`s), after one :class:`PromptLogprobs` when asked."""
        rid = uuid.uuid4().hex
        finished = False
        prompt_sent = params.prompt_logprobs is None
        try:
            async for out in self.engine.generate({"prompt_token_ids": list(prompt_ids)}, self._sampling(params), rid):
                finished = out.finished
                if not prompt_sent and out.prompt_logprobs is not None:
                    prompt_sent = True
                    yield _prompt_logprobs(list(prompt_ids), out.prompt_logprobs, params.prompt_logprobs)
                if params.max_tokens == 0:
                    return
                comp = out.outputs[0]
                for i, tok in enumerate(comp.token_ids):
                    if tok in self.eos_ids:  # vLLM stops on it and includes it; the protocol never yields it
                        return
                    if params.logprobs is None:
                        yield int(tok)
                    else:
                        yield _token_logprob(int(tok), comp.logprobs[i], params.logprobs)
        finally:
            if not finished:  # the client went away or a stop string matched: free the sequence
                try:
                    await self.engine.abort(rid)
                except Exception as exc:  # noqa: BLE001 - a dead engine has nothing left to free
                    log.warning("vLLM abort of request %s failed: %s", rid, exc)

    def close(self) -> None:
        """Stop the engine's worker processes."""
        self.engine.shutdown()


# ----------------------------------------------------------------------------- Ray Serve LLM


def ray_llm_config(s: "ServeConfig", m: "ModelConfig") -> Dict[str, Any]:
    """``ray.serve.llm.LLMConfig`` keyword arguments from the ``serve`` and ``model`` sections.

    Replicas, autoscaling and ``max_ongoing_requests`` carry over; resources per replica are
    Ray Serve LLM's (one GPU bundle per tensor-parallel rank), not ``serve.num_cpus/num_gpus``.
    """
    model_id = s.model_id or os.path.basename(os.path.normpath(m.name_or_path))
    engine: Dict[str, Any] = {"dtype": str(getattr(m.dtype, "value", m.dtype)),
                              "tensor_parallel_size": s.tensor_parallel_size,
                              "trust_remote_code": m.trust_remote_code}
    if s.max_model_tokens:
        engine["max_model_len"] = s.max_model_tokens
    deployment: Dict[str, Any] = {"max_ongoing_requests": s.max_ongoing_requests}
    a = s.autoscaling
    if a is not None and a.max_replicas > a.min_replicas:
        deployment["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                            "target_ongoing_requests": a.target_ongoing_requests}
    else:
        deployment["num_replicas"] = a.min_replicas if a is not None else s.num_replicas
    return {"model_loading_config": {"model_id": model_id, "model_source": m.name_or_path},
            "engine_kwargs": engine, "deployment_config": deployment}


def build_ray_llm_app(s: "ServeConfig", m: "ModelConfig") -> Any:
    """Ray Serve LLM's OpenAI application (``ray.serve.llm.build_openai_app``) for one model."""
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as exc:
        raise RuntimeError("Ray Serve LLM needs `pip install 'ray[llm]'` (it brings vLLM; GPU machines), "
                           "see docs/vllm.md") from exc
    return build_openai_app({"llm_configs": [LLMConfig(**ray_llm_config(s, m))]})


def ray_llm_builder(args: Dict[str, str]) -> Any:
    """``serve run serve.vllm_backend:ray_llm_builder config=PATH [dotted.key=value ...]``."""

    args = dict(args)
    path = args.pop("config", None)
    cfg = load_config(path, [f"{k}={v}" for k, v in args.items()])
    return build_ray_llm_app(to_object(cfg.serve), to_object(cfg.model))
