"""OpenAI-compatible protocol layer shared by every model server (``serve.llm``, ``serve.eft``).

A model server is two parts:

1. a **backend**: anything with ``model_id: str``, ``tokenizer`` (a HF tokenizer with a chat
   template, e.g. from ``agenttuning.chat.load_tokenizer``) and
   ``generate(prompt_ids: list[int], params: SamplingParams) -> Iterator[int] | AsyncIterator[int]``
   yielding generated token ids one at a time. The backend stops by itself at end-of-sequence
   (without yielding the EOS id) or after ``params.max_tokens`` tokens. ``params.temperature == 0``
   means greedy decoding; ``params.seed`` (when not None) must make sampling reproducible. The
   backend may ignore ``params.stop``: stop strings are handled here, on the decoded text, and the
   iterator is closed (``close()`` / ``aclose()``) as soon as one matches, or when the client goes
   away — release per-request resources in a ``finally``.
   A sync iterator is driven from its own thread, so it may block (e.g. on a batching scheduler).
2. the **ingress**: :func:`build_openai_app` turns a backend into a FastAPI app with
   ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream`` with server-sent events in
   OpenAI's ``chat.completion.chunk`` format ending with ``data: [DONE]``; ``stop`` str or list;
   ``max_tokens``; ``temperature``; ``top_p``; ``seed``; ``n`` = 1 only) and ``GET /health``.
   Prompts are rendered with the tokenizer's chat template by :func:`agenttuning.chat.prompt_ids`
   (the server's system prompt is added when the request has none).
   Errors are OpenAI-shaped JSON ``{"error": {"message", "type", "param", "code"}}`` with 4xx/5xx.

Use it in a Ray Serve deployment through the late-bound ingress::

    @serve.deployment
    @serve.ingress()
    class MyServer:
        def __init__(self, ...): self.backend = MyBackend(...)
        def __serve_build_asgi_app__(self): return build_openai_app(self.backend)

or without Ray (tests, debugging) with :func:`run_local_server`. :func:`complete` is the same
request path as a plain Python call (used by Serve handles, e.g. rollouts calling a model).
"""

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Literal, Optional, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agenttuning.config import AGENTLM_SYSTEM_PROMPT

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- backend protocol


@dataclass
class SamplingParams:
    """Decoding settings of one request (already validated)."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: List[str] = field(default_factory=list)
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Backend(Protocol):
    """What a model server must provide (see the module docstring for the contract)."""

    model_id: str
    tokenizer: Any

    def generate(self, prompt_ids: List[int], params: SamplingParams) -> Union[Iterator[int], AsyncIterator[int]]:
        ...


# ----------------------------------------------------------------------------- wire format


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    # Clients send fields we do not use (user, stream_options, ...): ignore rather than reject.
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    seed: Optional[int] = None
    n: int = 1


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "agenttuning"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


# ----------------------------------------------------------------------------- stop strings


class StopStringDetokenizer:
    """Incremental detokenizer that cuts the text at the first stop string.

    ``push(token_id)`` returns the newly *safe* text: text that can no longer become part of a
    stop string and does not end inside an incomplete UTF-8 sequence. After a stop string
    matches, ``stopped`` is True and no more text is returned.
    """

    def __init__(self, tokenizer: Any, stop: List[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False
        self.text = ""

    def _hold_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        # Re-decoding the whole completion keeps multi-token characters and leading-space rules
        # right for every tokenizer; completions are short, so the cost is small.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        self.text = text
        if text.endswith("\ufffd"):  # incomplete UTF-8: wait for the next token
            return ""
        safe = len(text) - self._hold_back(text)
        out = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        """Text held back at the end of generation (no stop string followed)."""
        if self.stopped:
            return ""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


# ----------------------------------------------------------------------------- request path


def sampling_params(req: ChatCompletionRequest, default_max_tokens: int, max_model_tokens: Optional[int], n_prompt: int) -> SamplingParams:
    """Validated decoding settings; raises APIError (400) for what the backend cannot honour."""
    if req.n != 1:
        raise APIError(400, f"n={req.n} is not supported (only n=1)", param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16:
        raise APIError(400, "at most 16 stop strings", param="stop")
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    if max_model_tokens is not None:
        room = max_model_tokens - n_prompt
        if room < 1:
            raise APIError(
                400,
                f"prompt has {n_prompt} tokens, the model's context is {max_model_tokens}",
                param="messages",
            )
        max_tokens = min(max_tokens, room)
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, stop=stop, seed=req.seed)


class ServerSettings(BaseModel):
    """Ingress settings (the ``serve`` config section passes these)."""

    system_prompt: Optional[str] = AGENTLM_SYSTEM_PROMPT
    default_max_tokens: int = 256
    max_model_tokens: Optional[int] = None  # context window; None = do not check
    # Extra names accepted in the request's `model` field (e.g. a served alias).
    aliases: List[str] = Field(default_factory=list)


async def _iterate(gen: Union[Iterator[int], AsyncIterator[int]], cancelled: threading.Event) -> AsyncIterator[int]:
    """Async view of a backend iterator; a sync one runs in its own thread (it may block)."""
    if hasattr(gen, "__aiter__"):
        try:
            async for tok in gen:  # type: ignore[union-attr]
                yield tok
        finally:
            if hasattr(gen, "aclose"):
                await gen.aclose()  # type: ignore[union-attr]
        return
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def pump() -> None:
        try:
            for tok in gen:  # type: ignore[union-attr]
                loop.call_soon_threadsafe(queue.put_nowait, tok)
                if cancelled.is_set():
                    break
        except Exception as exc:  # noqa: BLE001 - forwarded to the request, which reports it
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            if hasattr(gen, "close"):
                gen.close()  # type: ignore[union-attr]
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


class OpenAIChat:
    """The request path of ``/v1/chat/completions`` for one backend, independent of HTTP."""

    def __init__(self, backend: Backend, settings: Optional[ServerSettings] = None):
        self.backend = backend
        self.settings = settings or ServerSettings()

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.backend.model_id, created=int(time.time()))])

    def prepare(self, req: ChatCompletionRequest):
        from agenttuning.chat import ChatError, prompt_ids

        if req.model not in (self.backend.model_id, *self.settings.aliases):
            raise APIError(404, f"model {req.model!r} not found; this server has {self.backend.model_id!r}", param="model")
        msgs = [m.model_dump() for m in req.messages]
        try:
            ids = prompt_ids(self.backend.tokenizer, msgs, self.settings.system_prompt)
        except ChatError as exc:
            raise APIError(400, str(exc), param="messages") from None
        params = sampling_params(req, self.settings.default_max_tokens, self.settings.max_model_tokens, len(ids))
        return ids, params

    async def stream_tokens(self, ids: List[int], params: SamplingParams) -> AsyncIterator[tuple]:
        """Yields (text_piece, n_completion_tokens, finish_reason or None); the last has a reason."""
        detok = StopStringDetokenizer(self.backend.tokenizer, params.stop)
        cancelled = threading.Event()
        n = 0
        agen = _iterate(self.backend.generate(ids, params), cancelled)
        try:
            async for tok in agen:
                n += 1
                piece = detok.push(int(tok))
                if detok.stopped:
                    yield piece, n, "stop"
                    return
                if piece:
                    yield piece, n, None
        finally:
            cancelled.set()
            await agen.aclose()
        yield detok.flush(), n, ("length" if n >= params.max_tokens else "stop")

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        ids, params = self.prepare(req)
        parts, n, reason = [], 0, "stop"
        async for piece, n, finish in self.stream_tokens(ids, params):
            parts.append(piece)
            reason = finish or reason
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=req.model,
            choices=[Choice(message=ResponseMessage(content="".join(parts)), finish_reason=reason)],
            usage=Usage(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n),
        )

    async def sse(self, req: ChatCompletionRequest, ids: List[int], params: SamplingParams) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: Delta, finish: Optional[str] = None) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=req.model, choices=[ChunkChoice(delta=delta, finish_reason=finish)])
            return f"data: {c.model_dump_json(exclude_none=False)}\n\n"

        yield chunk(Delta(role="assistant", content=""))
        try:
            async for piece, _, finish in self.stream_tokens(ids, params):
                if piece:
                    yield chunk(Delta(content=piece))
                if finish:
                    yield chunk(Delta(), finish)
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band, as OpenAI does
            log.exception("generation failed mid-stream")
            yield f"data: {json.dumps(APIError(500, f'generation failed: {exc}', 'server_error').body())}\n\n"
        yield "data: [DONE]\n\n"


async def complete(chat: OpenAIChat, body: Dict[str, Any]) -> Dict[str, Any]:
    """Non-streaming completion from a plain request dict (for Serve handles); errors as bodies."""
    try:
        req = ChatCompletionRequest.model_validate(body)
        return (await chat.complete(req)).model_dump()
    except ValidationError as exc:
        return APIError(400, _validation_message(exc)).body()
    except APIError as exc:
        return exc.body()


def _validation_message(exc: ValidationError) -> str:
    errs = exc.errors()
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in errs[:5])


# ----------------------------------------------------------------------------- FastAPI ingress


def build_openai_app(backend: Backend, settings: Optional[ServerSettings] = None):
    """A FastAPI app serving ``backend`` with OpenAI's chat completions API."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    chat = OpenAIChat(backend, settings)
    app = FastAPI(title=f"OpenAI-compatible server: {backend.model_id}")
    app.state.chat = chat

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()[:5])
        return JSONResponse(APIError(400, msg).body(), status_code=400)

    @app.get("/health")
    async def health() -> Dict[str, str]:
        return {"status": "ok", "model": backend.model_id}

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        return chat.models().model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        if req.stream:
            ids, params = chat.prepare(req)  # errors before streaming starts get a proper status
            return StreamingResponse(chat.sse(req, ids, params), media_type="text/event-stream")
        return (await chat.complete(req)).model_dump()

    return app


class OpenAIDeployment:
    """Methods every OpenAI-compatible Serve deployment shares (model server, EFT server).

    A subclass sets ``self.backend`` and ``self.chat_api`` in ``__init__`` and is decorated with
    ``@serve.ingress()``: Serve then builds the HTTP app from ``__serve_build_asgi_app__``, and
    handles (rollouts) call ``chat`` / ``model_id``.
    """

    backend: Backend
    chat_api: OpenAIChat

    def __serve_build_asgi_app__(self):
        return build_openai_app(self.backend, self.chat_api.settings)

    async def chat(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """A chat completion request dict → response dict (or an OpenAI error body)."""
        return await complete(self.chat_api, body)

    def model_id(self) -> str:
        return self.backend.model_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def run_local_server(app: Callable, host: str = "127.0.0.1", port: Optional[int] = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a background thread; yields its base URL (``.../v1``)."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="openai-api-uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError(f"local server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
