"""The request path of the OpenAI-compatible API over a backend, independent of HTTP.

The backend protocol (documented in ``serve.openai_api``) and :class:`OpenAIChat`, which turns
chat and legacy completion requests into backend calls and backend output into OpenAI's response
objects, streamed or not. ``n`` choices are ``n`` concurrent backend calls (choice ``j`` samples
with ``seed + j``), so a batching backend decodes them together.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Protocol, Sequence, Tuple, Union

from pydantic import BaseModel, Field

from agenttuning.chat import ChatError, prompt_ids
from agenttuning.config import AGENTLM_SYSTEM_PROMPT
from serve.openai_schema import (
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
)
from serve.openai_text import StopStringDetokenizer, TokenText, chat_logprobs, legacy_logprobs

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- backend protocol


@dataclass
class SamplingParams:
    """Decoding settings of one request (already validated)."""

    max_tokens: int = 256  # 0: no generation (the prompt's log-probs only)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: List[str] = field(default_factory=list)
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # per generated token: its log-prob and this many alternatives
    prompt_logprobs: Optional[int] = None  # per prompt token after the first: idem

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class TokenLogprob:
    """A token with its log-probability under the model and the ``k`` most likely alternatives."""

    token_id: int
    logprob: float
    top: List[Tuple[int, float]] = field(default_factory=list)  # (token id, log-prob), most likely first


@dataclass
class PromptLogprobs:
    """One entry per prompt token; the first is None (no distribution precedes it)."""

    entries: List[Optional[TokenLogprob]]


class Backend(Protocol):
    """What a model server must provide (see ``serve.openai_api`` for the contract)."""

    model_id: str
    tokenizer: Any
    supports_logprobs: bool

    def generate(self, prompt_ids: List[int], params: SamplingParams) -> Any:
        ...


def token_logprobs(logprobs: Any, ids: Sequence[int], k: int) -> List[TokenLogprob]:
    """Rows of log-probs [N, V] (torch) → the log-prob of ``ids[i]`` in row i and its top ``k``."""
    import torch

    idx = torch.as_tensor(list(ids), dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(-1, idx[:, None])[:, 0].tolist()
    if k > 0:
        vals, alt = torch.topk(logprobs, k, dim=-1)
        tops = [list(zip(a, v)) for a, v in zip(alt.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in ids]
    return [TokenLogprob(int(t), float(c), top) for t, c, top in zip(ids, chosen, tops)]


class ServerSettings(BaseModel):
    """Ingress settings (the ``serve`` config section passes these)."""

    system_prompt: Optional[str] = AGENTLM_SYSTEM_PROMPT
    default_max_tokens: int = 256
    max_model_tokens: Optional[int] = None  # context window; None = do not check
    # Extra names accepted in the request's `model` field (e.g. a served alias).
    aliases: List[str] = Field(default_factory=list)
    max_n: int = 16  # choices per request (n)
    max_prompts: int = 256  # prompts per /v1/completions request


# ----------------------------------------------------------------------------- driving a backend


async def _iterate(gen: Any, cancelled: threading.Event) -> AsyncIterator[Any]:
    """Async view of a backend iterator; a sync one runs in its own thread (it may block)."""
    if hasattr(gen, "__aiter__"):
        try:
            async for item in gen:
                yield item
        finally:
            if hasattr(gen, "aclose"):
                await gen.aclose()
        return
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def pump() -> None:
        try:
            for item in gen:
                loop.call_soon_threadsafe(queue.put_nowait, item)
                if cancelled.is_set():
                    break
        except Exception as exc:  # noqa: BLE001 - forwarded to the request, which reports it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            if hasattr(gen, "close"):
                gen.close()
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, done)

    # A thread per request, not the default pool: a blocked backend must not starve other requests.
    threading.Thread(target=pump, name="openai-api-generate", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancelled.set()


@dataclass
class Step:
    """What one backend call produced since the last step."""

    text: str = ""  # new completion text (stop strings cut off)
    tokens: List[TokenLogprob] = field(default_factory=list)  # generated tokens whose text starts in `text`
    prompt: Optional[PromptLogprobs] = None
    finish: Optional[str] = None  # "stop" | "length" on the last step
    n_tokens: int = 0  # generated tokens so far (usage)


async def _merge(gens: List[AsyncIterator[Step]]) -> AsyncIterator[Tuple[int, Step]]:
    """(choice index, step) from several runs as they come; closing it stops them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def drain(i: int, g: AsyncIterator[Step]) -> None:
        try:
            async for s in g:
                queue.put_nowait((i, s))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(drain(i, g)) for i, g in enumerate(gens)]
    remaining = len(tasks)
    try:
        while remaining:
            i, s = await queue.get()
            if s is done:
                remaining -= 1
            elif isinstance(s, Exception):
                raise s
            else:
                yield i, s
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Result:
    text: str = ""
    tokens: List[TokenLogprob] = field(default_factory=list)
    prompt: Optional[PromptLogprobs] = None
    finish: str = "stop"
    n_tokens: int = 0

    def add(self, s: Step) -> None:
        self.text += s.text
        self.tokens += s.tokens
        self.prompt = s.prompt or self.prompt
        self.finish = s.finish or self.finish
        self.n_tokens = max(self.n_tokens, s.n_tokens)


def _sse(obj: Any) -> str:
    return f"data: {obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)}\n\n"


# ----------------------------------------------------------------------------- the API


class OpenAIChat:
    """``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` for one backend."""

    def __init__(self, backend: Backend, settings: Optional[ServerSettings] = None):
        self.backend = backend
        self.settings = settings or ServerSettings()
        self.text = TokenText(backend.tokenizer)

    # -- models
    def models(self) -> ModelList:
        now = int(time.time())
        return ModelList(data=[ModelCard(id=m, created=now) for m in (self.backend.model_id, *self.settings.aliases)])

    def model_card(self, model_id: str) -> ModelCard:
        self._check_model(model_id)
        return ModelCard(id=model_id, created=int(time.time()))

    def _check_model(self, name: str) -> None:
        if name not in (self.backend.model_id, *self.settings.aliases):
            raise APIError(404, f"model {name!r} not found; this server has {self.backend.model_id!r}", param="model")

    def _check_request(self, req: Union[ChatCompletionRequest, CompletionRequest], wants_logprobs: bool) -> None:
        self._check_model(req.model)
        req.check_unsupported()
        if req.n > self.settings.max_n:
            raise APIError(400, f"n={req.n} is over this server's limit of {self.settings.max_n}", param="n")
        if wants_logprobs and not getattr(self.backend, "supports_logprobs", False):
            raise APIError(400, f"this server's backend ({type(self.backend).__name__}) does not return logprobs",
                           param="logprobs")

    def _params(self, req: Any, max_tokens: int, n_prompt: int, param: str, **extra: Any) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop")
        limit = self.settings.max_model_tokens
        if limit is not None:
            room = limit - n_prompt
            if room < (1 if max_tokens else 0):
                raise APIError(400, f"prompt has {n_prompt} tokens, the model's context is {limit}", param=param)
            max_tokens = min(max_tokens, room)
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=stop,
                              seed=req.seed, **extra)

    # -- one backend call
    async def run(self, ids: List[int], params: SamplingParams) -> AsyncIterator[Step]:
        """Steps of one generation: text pieces, the tokens behind them, the finish reason."""
        if params.max_tokens <= 0 and params.prompt_logprobs is None:
            yield Step(finish="length")
            return
        detok = StopStringDetokenizer(self.backend.tokenizer, params.stop)
        cancelled = threading.Event()
        tokens: List[TokenLogprob] = []
        sent, last = 0, ""
        agen = _iterate(self.backend.generate(ids, params), cancelled)
        try:
            async for item in agen:
                if isinstance(item, PromptLogprobs):
                    yield Step(prompt=item)
                    continue
                tokens.append(item if isinstance(item, TokenLogprob) else TokenLogprob(int(item), math.nan))
                piece = detok.push(tokens[-1].token_id)
                if detok.stopped:
                    last = piece
                    break
                if piece:
                    k = detok.released(final=False)
                    yield Step(piece, tokens[sent:k], n_tokens=len(tokens))
                    sent = k
        finally:
            cancelled.set()
            await agen.aclose()
        if not detok.stopped:
            last = detok.flush()
        finish = "stop" if detok.stopped or len(tokens) < params.max_tokens else "length"
        yield Step(last, tokens[sent:detok.released(final=True)], finish=finish, n_tokens=len(tokens))

    def _runs(self, ids: List[int], params: SamplingParams, n: int) -> List[AsyncIterator[Step]]:
        """n concurrent runs; choice j samples with seed + j; only the first scores the prompt."""
        runs = []
        for j in range(n):
            seed = params.seed + j if params.seed is not None else None
            pl = params.prompt_logprobs if j == 0 else None
            runs.append(self.run(ids, dataclasses.replace(params, seed=seed, prompt_logprobs=pl)))
        return runs

    async def _collect(self, runs: List[AsyncIterator[Step]]) -> List[_Result]:
        results = [_Result() for _ in runs]
        async for i, s in _merge(runs):
            results[i].add(s)
        return results

    # -- chat
    def prepare(self, req: ChatCompletionRequest) -> Tuple[List[int], SamplingParams]:
        self._check_request(req, req.logprobs)
        msgs = [m.as_dict(i) for i, m in enumerate(req.messages)]
        try:
            ids = prompt_ids(self.backend.tokenizer, msgs, self.settings.system_prompt)
        except ChatError as exc:
            raise APIError(400, str(exc), param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens or self.settings.default_max_tokens
        k = (req.top_logprobs or 0) if req.logprobs else None
        return ids, self._params(req, max_tokens, len(ids), "messages", logprobs=k)

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        ids, params = self.prepare(req)
        results = await self._collect(self._runs(ids, params, req.n))
        choices = [Choice(index=j, message=ResponseMessage(content=r.text), finish_reason=r.finish,
                          logprobs=chat_logprobs(r.tokens, ids, self.text) if req.logprobs else None)
                   for j, r in enumerate(results)]
        n_out = sum(r.n_tokens for r in results)
        return ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model,
                                      choices=choices, usage=Usage(prompt_tokens=len(ids), completion_tokens=n_out,
                                                                   total_tokens=len(ids) + n_out))

    async def sse(self, req: ChatCompletionRequest, ids: List[int], params: SamplingParams) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        gen_ids: List[List[int]] = [[] for _ in range(req.n)]  # per choice: the tokens reported so far

        def chunk(j: int, delta: Delta, finish: Optional[str] = None, tokens: Sequence[TokenLogprob] = ()) -> str:
            lp = None
            if req.logprobs and tokens:
                lp = chat_logprobs(tokens, ids + gen_ids[j], self.text)
                gen_ids[j] += [t.token_id for t in tokens]
            c = ChatCompletionChunk(id=cid, created=created, model=req.model,
                                    choices=[ChunkChoice(index=j, delta=delta, finish_reason=finish, logprobs=lp)])
            return _sse(c)

        for j in range(req.n):
            yield chunk(j, Delta(role="assistant", content=""))
        n_out = 0
        try:
            async for j, s in _merge(self._runs(ids, params, req.n)):
                if s.text or s.tokens:
                    yield chunk(j, Delta(content=s.text), tokens=s.tokens)
                if s.finish:
                    n_out += s.n_tokens
                    yield chunk(j, Delta(), s.finish)
            if req.stream_options and req.stream_options.include_usage:
                yield _sse(ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[],
                                               usage=Usage(prompt_tokens=len(ids), completion_tokens=n_out,
                                                           total_tokens=len(ids) + n_out)))
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band, as OpenAI does
            log.exception("generation failed mid-stream")
            yield _sse(APIError(500, f"generation failed: {exc}").body())
        yield "data: [DONE]\n\n"

    # -- legacy completions
    def _prompts(self, req: CompletionRequest) -> List[Tuple[Optional[str], List[int]]]:
        p = req.prompt
        items: List[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(items) > self.settings.max_prompts:
            raise APIError(400, f"{len(items)} prompts is over this server's limit of {self.settings.max_prompts}",
                           param="prompt")
        tok, vocab = self.backend.tokenizer, len(self.backend.tokenizer)
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                ids = tok(item, add_special_tokens=True)["input_ids"]
                out.append((item, list(ids)))
                continue
            bad = [t for t in item if not 0 <= int(t) < vocab]
            if bad:
                raise APIError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
            out.append((None, [int(t) for t in item]))
        for i, (_, ids) in enumerate(out):
            if not ids:
                raise APIError(400, f"prompt {i} is empty", param="prompt")
        return out

    def prepare_completion(self, req: CompletionRequest) -> Tuple[List[Tuple[str, List[int]]], List[SamplingParams]]:
        """(prompt text for echo, prompt ids) per prompt, and its sampling parameters."""
        self._check_request(req, req.logprobs is not None)
        prompts, params = [], []
        for text, ids in self._prompts(req):
            params.append(self._params(req, req.max_tokens, len(ids), "prompt", logprobs=req.logprobs,
                                       prompt_logprobs=req.logprobs if req.echo else None))
            prompts.append((text if text is not None else self.backend.tokenizer.decode(ids), ids))
        return prompts, params

    def _runs_all(self, prompts: List[Tuple[str, List[int]]], params: List[SamplingParams],
                  n: int) -> List[AsyncIterator[Step]]:
        return [r for (_, ids), p in zip(prompts, params) for r in self._runs(ids, p, n)]

    def _choice_logprobs(self, ids: List[int], r: _Result, offset: int, generated: List[int]) -> CompletionLogprobs:
        """Legacy log-probs of a choice (or of one streamed piece of it): the prompt's tokens when
        it was scored (echo), then the generated tokens ``r.tokens`` after ``generated``."""
        lp = CompletionLogprobs()
        if r.prompt is not None:
            legacy_logprobs(r.prompt.entries, ids, [], self.text, 0, lp)
        return legacy_logprobs(r.tokens, [t.token_id for t in r.tokens], ids + generated, self.text, offset, lp)

    async def completion(self, req: CompletionRequest) -> CompletionResponse:
        prompts, params = self.prepare_completion(req)
        results = await self._collect(self._runs_all(prompts, params, req.n))
        choices = []
        for idx, r in enumerate(results):
            (text, ids), first = prompts[idx // req.n], results[idx - idx % req.n]
            if req.echo and r.prompt is None:
                r.prompt = first.prompt  # scored once per prompt, shared by its n choices
            head = text if req.echo else ""
            lp = self._choice_logprobs(ids, r, len(head), []) if req.logprobs is not None else None
            choices.append(CompletionChoice(index=idx, text=head + r.text, logprobs=lp, finish_reason=r.finish))
        n_in = sum(len(ids) for _, ids in prompts)
        n_out = sum(r.n_tokens for r in results)
        return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=req.model,
                                  choices=choices, usage=Usage(prompt_tokens=n_in, completion_tokens=n_out,
                                                               total_tokens=n_in + n_out))

    async def completion_sse(self, req: CompletionRequest, prompts: List[Tuple[str, List[int]]],
                             params: List[SamplingParams]) -> AsyncIterator[str]:
        """Server-sent events of ``text_completion`` chunks, ending with ``data: [DONE]``. With
        ``echo`` a choice's first chunk is its prompt (with its log-probs once scored)."""
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = req.n
        n_choices = len(prompts) * n
        offsets = [len(prompts[i // n][0]) if req.echo else 0 for i in range(n_choices)]
        generated: List[List[int]] = [[] for _ in range(n_choices)]
        waiting: Dict[int, List[Step]] = {}  # echo + logprobs: steps that arrived before the prompt's scores

        def chunk(idx: int, s: Step, text: str) -> str:
            lp = None
            if req.logprobs is not None:
                r = _Result(tokens=s.tokens, prompt=s.prompt)
                lp = self._choice_logprobs(prompts[idx // n][1], r, offsets[idx], generated[idx])
                generated[idx] += [t.token_id for t in s.tokens]
                offsets[idx] += sum(len(t) for t in lp.tokens[len(lp.tokens) - len(s.tokens):])
            c = CompletionResponse(id=cid, created=created, model=req.model, choices=[
                CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=s.finish)])
            return _sse(c)

        n_out = 0
        try:
            if req.echo and req.logprobs is None:
                for idx in range(n_choices):
                    yield chunk(idx, Step(), prompts[idx // n][0])
            elif req.echo:
                waiting = {idx: [] for idx in range(n_choices)}
            async for idx, s in _merge(self._runs_all(prompts, params, n)):
                n_out += s.n_tokens if s.finish else 0
                if s.prompt is not None:  # the first choice of a prompt scored it; all its choices echo it
                    for j in range(idx, idx + n):
                        yield chunk(j, Step(prompt=s.prompt), prompts[j // n][0])
                        for early in waiting.pop(j, []):
                            yield chunk(j, early, early.text)
                elif idx in waiting:
                    waiting[idx].append(s)
                elif s.text or s.tokens or s.finish:
                    yield chunk(idx, s, s.text)
            if req.stream_options and req.stream_options.include_usage:
                n_in = sum(len(ids) for _, ids in prompts)
                yield _sse(CompletionResponse(id=cid, created=created, model=req.model, choices=[],
                                              usage=Usage(prompt_tokens=n_in, completion_tokens=n_out,
                                                          total_tokens=n_in + n_out)))
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band, as OpenAI does
            log.exception("generation failed mid-stream")
            yield _sse(APIError(500, f"generation failed: {exc}").body())
        yield "data: [DONE]\n\n"
