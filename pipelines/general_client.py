"""OpenAI-compatible endpoints as the general-ability scorers use them.

General tasks query every model where it is served, over HTTP, with the official ``openai``
client: our model apps at ``http://<serve.host>:<serve.port>/<policy>/v1`` (``serve.llm``, also
the EFT server), or any outside endpoint (``kind: openai``; the key is read from the environment
variable ``api_key_env``). Two calls:

- :meth:`Endpoint.chat`: ``POST /v1/chat/completions`` (GSM8K, HumanEval, MT-Bench answers and
  the MT-Bench judge);
- :meth:`Endpoint.prompt_logprobs`: ``POST /v1/completions`` with ``echo: true``,
  ``logprobs: 1``, ``max_tokens: 0`` and the prompt as token ids, which returns
  ``log p(token_i | tokens_<i)`` of every prompt token (the first is null). This is how
  lm-evaluation-harness scores log-likelihoods through an OpenAI-compatible server; MMLU uses it.
"""

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import openai

from serve.auth import resolve_api_key

log = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """The endpoint refused a request or answered without the fields the scorer needs."""


class ContextTooLong(EndpointError):
    """The endpoint refused a prompt longer than the model's context (HTTP 400 naming the context)."""


def _refusal(base_url: str, what: str, exc: Exception) -> EndpointError:
    too_long = isinstance(exc, openai.BadRequestError) and "context" in str(exc).lower()
    return (ContextTooLong if too_long else EndpointError)(f"{base_url}: {what} failed: {exc}")


class Endpoint:
    """One model behind an OpenAI-compatible ``/v1`` URL (thread-safe: one HTTP client)."""

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, timeout_s: float = 300.0,
                 max_retries: int = 5):
        self.base_url, self.model = base_url.rstrip("/"), model
        # The client retries connection errors, 429 and 5xx with exponential backoff.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout_s,
                                    max_retries=max_retries)

    def __repr__(self) -> str:
        return f"Endpoint({self.base_url!r}, model={self.model!r})"

    def chat(self, messages: List[Dict[str, str]], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: Optional[int] = None, stop: Optional[Sequence[str]] = None) -> str:
        """The assistant's reply to `messages`."""
        body: Dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = seed
        if stop:
            body["stop"] = list(stop)
        try:
            r = self.client.chat.completions.create(**body)
        except openai.APIError as exc:
            raise _refusal(self.base_url, "chat completion", exc) from None
        text = r.choices[0].message.content if r.choices else None
        if not isinstance(text, str):
            raise EndpointError(f"{self.base_url}: reply without message content: {str(r)[:200]}")
        return text

    def prompt_logprobs(self, prompts: List[List[int]]) -> List[List[Optional[float]]]:
        """log p of every token of each prompt given the ones before it (None for the first), all
        prompts in one request (OpenAI's list-of-token-arrays prompt; choice i answers prompt i)."""
        try:
            r = self.client.completions.create(model=self.model, prompt=[list(p) for p in prompts], max_tokens=0,
                                               echo=True, logprobs=1, temperature=0.0)
        except openai.APIError as exc:
            raise _refusal(self.base_url, "/completions with echo and logprobs", exc) from None
        choices = sorted(r.choices or [], key=lambda c: c.index)
        if len(choices) != len(prompts):
            raise EndpointError(f"{self.base_url}: {len(choices)} choices for {len(prompts)} prompts")
        out = []
        for p, c in zip(prompts, choices):
            values = list(getattr(c.logprobs, "token_logprobs", None) or [])
            if len(values) != len(p):
                raise EndpointError(f"{self.base_url}: echo returned {len(values)} prompt log-probabilities for "
                                    f"{len(p)} prompt tokens")
            out.append(values)
        return out

    def loglik(self, context: List[int], continuations: List[List[int]]) -> List[float]:
        """Sum of log p(continuation tokens | context) for each continuation (one request)."""
        out = []
        for values in self.prompt_logprobs([context + c for c in continuations]):
            tail = values[len(context):]
            if any(v is None for v in tail):
                raise EndpointError(f"{self.base_url}: null log-probability inside a continuation")
            out.append(float(sum(tail)))
        return out


def endpoint_for_policy(cfg: Any, name: str, policy: Any) -> Endpoint:
    """The endpoint of an evaluation policy (`policy`: a PolicyConfig of kind model or openai).

    kind model: the policy's model app, deployed by the eval job under ``/<name>`` on Serve's HTTP
    proxy (a wildcard bind address is reached on 127.0.0.1), with the API key the model servers
    require (``serve.api_key_env`` / ``serve.api_key_file``, if any); kind openai: its ``base_url``.
    """
    if policy.kind in ("model", "eft"):
        host = cfg.serve.host if cfg.serve.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        key = resolve_api_key(cfg.serve.api_key_env, cfg.serve.api_key_file)  # what the model app requires
        return Endpoint(f"http://{host}:{cfg.serve.port}/{name}/v1", policy.model or name, key,
                        timeout_s=policy.timeout_s, max_retries=policy.max_retries)
    if policy.kind == "openai":
        return judge_endpoint(policy)
    raise ValueError(f"policy {name!r} of kind {policy.kind} has no model endpoint")


def judge_endpoint(policy: Any) -> Endpoint:
    """An outside endpoint (``kind: openai``): base_url, model, key from ``api_key_env``."""
    key = os.environ.get(policy.api_key_env or "OPENAI_API_KEY")
    return Endpoint(policy.base_url, policy.model, key, policy.timeout_s, policy.max_retries)
