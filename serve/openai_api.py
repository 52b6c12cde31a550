"""OpenAI-compatible protocol layer shared by every model server (``serve.llm``, ``serve.eft``).

A model server is two parts:

1. a **backend**: anything with ``model_id: str``, ``tokenizer`` (a HF tokenizer with a chat
   template, e.g. from ``agenttuning.chat.load_tokenizer``), ``supports_logprobs: bool`` and
   ``generate(prompt_ids: list[int], params: SamplingParams) -> Iterator | AsyncIterator``
   yielding, in order:

   - one :class:`PromptLogprobs` first, when ``params.prompt_logprobs`` is not None: per prompt
     token its log-probability given the tokens before it and the ``prompt_logprobs`` most likely
     alternatives (the first token's entry is None);
   - one item per generated token: a :class:`TokenLogprob` (token id, log-probability, the
     ``params.logprobs`` most likely alternatives) when ``params.logprobs`` is not None, else the
     token id as an ``int`` (a ``TokenLogprob`` is accepted there too).

   Log-probabilities are those of the model's next-token distribution *before* temperature and
   top-p (log-softmax of the raw logits; the EFT server: of the combined EFT distribution), as
   OpenAI and vLLM report them. The backend stops by itself at end-of-sequence (without yielding
   the EOS id) or after ``params.max_tokens`` tokens; ``max_tokens == 0`` means no generation
   (prompt log-probs only). ``params.temperature == 0`` means greedy decoding; ``params.seed``
   (when not None) must make sampling reproducible. The backend may ignore ``params.stop``: stop
   strings are handled here, on the decoded text, and the iterator is closed (``close()`` /
   ``aclose()``) as soon as one matches, or when the client goes away — release per-request
   resources in a ``finally``. A sync iterator is driven from its own thread, so it may block
   (e.g. on a batching scheduler). A backend with ``supports_logprobs = False`` never receives
   log-prob requests (the client gets 400).
2. the **ingress**: :func:`build_openai_app` turns a backend into a FastAPI app with
   ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
   ``POST /v1/completions`` and ``GET /health``:

   - chat: ``messages`` (``content`` a string or a list of ``{"type": "text"}`` parts),
     ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``stop`` (str or
     list), ``seed``, ``n``, ``logprobs`` + ``top_logprobs``, ``stream`` (server-sent events of
     ``chat.completion.chunk`` ending with ``data: [DONE]``) with ``stream_options.include_usage``;
     prompts are rendered with the tokenizer's chat template by
     :func:`agenttuning.chat.prompt_ids` (the server's system prompt is added when the request has
     none);
   - legacy completions: ``prompt`` as text or token ids, or a list of either; ``echo``;
     ``logprobs: k`` (legacy format: ``tokens``, ``token_logprobs``, ``top_logprobs`` with up to
     k+1 entries as the chosen token is always included, ``text_offset`` = the cumulative length
     of the token strings before each token, from the start of the returned text); ``max_tokens:
     0`` with ``echo`` scores the prompt (first token's log-prob null, as OpenAI returns it) —
     how lm-evaluation-harness computes log-likelihoods; ``stop``, ``temperature``, ``top_p``,
     ``n``, ``seed``, ``stream``. Text prompts are tokenized with the tokenizer's special tokens
     (BOS where it adds one); token-id prompts are used as given.
   - every error is OpenAI-shaped JSON ``{"error": {"message", "type", "param", "code"}}`` with
     the HTTP status (also unknown routes, and 401 when an API key is set, see ``serve.auth``).

Use it in a Ray Serve deployment through the late-bound ingress::

    @serve.deployment
    @serve.ingress()
    class MyServer(OpenAIDeployment):
        def __init__(self, ...): self.backend = MyBackend(...); self.chat_api = OpenAIChat(self.backend)

or without Ray (tests, debugging) with :func:`run_local_server`. :func:`answer` is the same
request path as a plain Python call (Serve handles).
"""

import contextlib
import logging
import socket
import threading
import time
from typing import Any, Awaitable, Callable, Dict, Iterator, Optional

from pydantic import ValidationError

from serve.auth import BearerAuth
from serve.openai_core import (  # noqa: F401 - the backend protocol, re-exported for backends
    Backend,
    OpenAIChat,
    PromptLogprobs,
    SamplingParams,
    ServerSettings,
    TokenLogprob,
    token_logprobs,
)
from serve.openai_schema import (  # noqa: F401 - re-exported
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)
from serve.openai_text import StopStringDetokenizer  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


async def answer(request_type: type, respond: Callable[[Any], Awaitable[Any]], body: Dict[str, Any]) -> Dict[str, Any]:
    """A plain request dict validated as `request_type` and answered by `respond` (e.g.
    ``(ChatCompletionRequest, chat.complete)``), non-streaming, for Serve handles; errors as bodies."""
    try:
        return (await respond(request_type.model_validate(body))).model_dump()
    except ValidationError as exc:
        return APIError(400, _validation_message(exc.errors())).body()
    except APIError as exc:
        return exc.body()


def _validation_message(errors: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in list(errors)[:5])


def _param_of(errors: Any) -> Optional[str]:
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if loc:
            return loc[0]
    return None


# ----------------------------------------------------------------------------- FastAPI ingress


def build_openai_app(backend: Backend, settings: Optional[ServerSettings] = None, api_key: Optional[str] = None):
    """A FastAPI app serving ``backend`` with OpenAI's API; ``api_key``: requests need
    ``Authorization: Bearer <api_key>`` (``/health`` stays open)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    chat = OpenAIChat(backend, settings)
    app = FastAPI(title=f"OpenAI-compatible server: {backend.model_id}")
    app.state.chat = chat
    app.add_middleware(BearerAuth, key=api_key, error_body=lambda msg: error_body(401, msg))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        body = error_body(400, _validation_message(exc.errors()), _param_of(exc.errors()))
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException):  # unknown route, wrong method, ...
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)

    @app.get("/health")
    async def health() -> Dict[str, str]:
        return {"status": "ok", "model": backend.model_id}

    @app.get("/v1/models")
    async def models() -> Dict[str, Any]:
        return chat.models().model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Dict[str, Any]:
        return chat.model_card(model_id).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        if req.stream:
            ids, params = chat.prepare(req)  # errors before streaming starts get a proper status
            return StreamingResponse(chat.sse(req, ids, params), media_type="text/event-stream")
        return (await chat.complete(req)).model_dump()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.stream:
            prompts, params = chat.prepare_completion(req)
            return StreamingResponse(chat.completion_sse(req, prompts, params), media_type="text/event-stream")
        return (await chat.completion(req)).model_dump()

    return app


class OpenAIDeployment:
    """Methods every OpenAI-compatible Serve deployment shares (model server, EFT server).

    A subclass sets ``self.backend``, ``self.chat_api`` and ``self.api_key`` (None: no key) in
    ``__init__`` and is decorated with ``@serve.ingress()``: Serve then builds the HTTP app from
    ``__serve_build_asgi_app__``, and handles (rollouts) call ``chat`` / ``completions`` /
    ``model_id`` (handle calls stay inside the cluster: no key).
    """

    backend: Backend
    chat_api: OpenAIChat
    api_key: Optional[str] = None

    def __serve_build_asgi_app__(self):
        return build_openai_app(self.backend, self.chat_api.settings, self.api_key)

    async def chat(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """A chat completion request dict → response dict (or an OpenAI error body)."""
        return await answer(ChatCompletionRequest, self.chat_api.complete, body)

    async def completions(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """A legacy completion request dict → response dict (or an OpenAI error body)."""
        return await answer(CompletionRequest, self.chat_api.completion, body)

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
