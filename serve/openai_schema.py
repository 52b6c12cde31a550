"""Wire format of the OpenAI-compatible API (``serve.openai_api``): requests, responses, errors.

Follows OpenAI's API reference for ``/v1/chat/completions``, the legacy ``/v1/completions`` and
``/v1/models``. Request fields a client may send that this server cannot honour are rejected with
400 naming the field (never silently ignored); fields without effect here (``user``, ...) are
ignored. Errors are ``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP
status, as vLLM's OpenAI server answers.
"""

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs (legacy completions: 5; we allow 20 for both)
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: impossible tokens get this value (as vLLM reports them)

_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                429: "rate_limit_error"}


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        fallback = "server_error" if status >= 500 else "invalid_request_error"
        self.type = type_ or _ERROR_TYPES.get(status, fallback)

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def error_body(status: int, message: str, param: Optional[str] = None) -> Dict[str, Any]:
    return APIError(status, message, param=param).body()


# ----------------------------------------------------------------------------- shared request parts


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False  # a last chunk with the usage and no choices


class _Unsupported(BaseModel):
    """Fields OpenAI defines that change the output; this server rejects any value but the neutral one."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[str, float]] = None

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server (only 0)", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")


class _Sampling(_Unsupported):
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    n: int = Field(default=1, ge=1)


# ----------------------------------------------------------------------------- chat


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, List[ContentPart]]

    def as_dict(self, index: int) -> Dict[str, str]:
        """{role, content} with list content joined (text parts only; others → 400 naming them)."""
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            return {"role": role, "content": self.content}
        texts = []
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise APIError(400, f"messages[{index}].content[{j}]: content part type {part.type!r} is not "
                                    "supported (this server accepts text parts only)",
                               param=f"messages[{index}].content[{j}].type")
            texts.append(part.text)
        return {"role": role, "content": "\n".join(texts)}  # parts joined by a newline, as vLLM does


class ChatCompletionRequest(_Sampling):
    # Clients send fields we do not use (user, metadata, ...): ignore rather than reject.
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[List[Any]] = None
    response_format: Optional[Dict[str, Any]] = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {self.response_format.get('type')!r} is not supported (only "
                                "'text')", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[List[ChatTokenLogprob]] = None
    refusal: Optional[List[ChatTokenLogprob]] = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Response(BaseModel):
    """The envelope every OpenAI response shares; subclasses fix ``object`` and the choice type
    (an overridden field keeps its place, so the JSON reads id, object, created, model, ...)."""

    id: str
    object: str
    created: int
    model: str
    usage: Optional[Usage] = None  # streams send it last, if asked


class _PartialChoice(BaseModel):
    """A choice of a stream chunk or of a legacy completion: unfinished ones carry no finish_reason."""

    index: int = 0
    finish_reason: Optional[Literal["stop", "length"]] = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: List[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChunkChoice(_PartialChoice):
    delta: Delta
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: List[ChunkChoice]


# ----------------------------------------------------------------------------- legacy completions


class CompletionRequest(_Sampling):
    model_config = ConfigDict(extra="ignore")
    model: str
    # One prompt or a batch: text, or token ids (as lm-evaluation-harness sends them).
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: int = Field(default=16, ge=0)  # OpenAI's default; 0 = score the prompt only (with echo)
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported by this server", param="best_of")


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format: per token its text, log-prob, top alternatives and text offset."""

    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)
    text_offset: List[int] = Field(default_factory=list)


class CompletionChoice(_PartialChoice):
    text: str
    logprobs: Optional[CompletionLogprobs] = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: List[CompletionChoice]


# ----------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "agenttuning"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]
