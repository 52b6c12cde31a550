"""Rollouts: whole episodes environment ↔ policy, as a Ray Serve deployment.

A policy turns the conversation so far into the agent's next message:

- ``model``: our model deployment (``serve.llm.LLMServer``), called through its Serve handle;
- ``openai``: any OpenAI-compatible endpoint (``base_url``, ``model``; the API key is read from
  the environment variable named by ``api_key_env``, never from the config file);
- ``expert``: the environment's scripted expert (``Env.expert_action``), through the same loop,
  so expert and model numbers come from one code path.

Context handling (``context_policy``): ``truncate`` keeps the opening messages (instruction and
few-shot) and drops the oldest (action, observation) pairs until the prompt fits
``context_limit`` tokens, telling the model how many messages were omitted, as AgentBench's
session filter does; ``end`` ends the episode with status ``context_limit`` instead. A server
that rejects a prompt as too long also ends the episode with ``context_limit``.

An episode record (what :meth:`RolloutServer.run` returns and evaluation stores) is
AgentInstruct-shaped: ``{"id", "conversations": [{"from": "human"|"gpt", "value", "loss"}],
"env", "task", "task_id", "policy", "reward", "status", "turns", "info", "elapsed_s"}``; the
opening few-shot answers carry ``loss: false``, the agent's own turns ``loss: true``.
"""

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ray import serve

from agenttuning.chat import load_tokenizer, prompt_ids
from agenttuning.schema import EvalTaskConfig, PolicyConfig
from serve.envs import Status, load

log = logging.getLogger(__name__)

OMITTED_NOTICE = "[NOTICE] {n} messages are omitted.\n"


class ContextLimit(Exception):
    """The conversation no longer fits the policy's context window."""


class TeacherError(RuntimeError):
    """An OpenAI-compatible endpoint kept failing (timeouts, HTTP 429/5xx, malformed replies)
    through all its retries, or refused the request outright (4xx other than 429)."""


# ----------------------------------------------------------------------------- context handling


def _approx_tokens(text: str) -> int:
    # Without a tokenizer (an outside endpoint), ~4 characters per token is the usual estimate.
    return len(text) // 4 + 1


def fit_context(messages: List[Dict[str, Any]], n_open: int, limit: Optional[int], count) -> List[Dict[str, Any]]:
    """Messages that fit ``limit`` tokens: opening messages + the newest turns (AgentBench style).

    ``messages`` alternate after the ``n_open`` opening ones and end with a user message.
    Drops whole (assistant, user) pairs from the oldest end; raises ContextLimit when even the
    opening messages plus the last observation do not fit.
    """
    if limit is None or count(messages) <= limit:
        return messages
    head, tail = messages[:n_open], messages[n_open:]
    for drop in range(2, len(tail), 2):
        # The opening messages end with the task's user turn and the kept tail starts with an
        # assistant turn, so alternation holds; the notice goes at the end of that user turn.
        last = dict(head[-1])
        last["content"] = last["content"] + "\n" + OMITTED_NOTICE.format(n=drop)
        candidate = head[:-1] + [last] + tail[drop:]
        if count(candidate) <= limit:
            return candidate
    raise ContextLimit(f"prompt needs more than {limit} tokens even with the history truncated")


# ----------------------------------------------------------------------------- policies


@dataclass
class PolicySpec:
    """A policy as the rollout deployment runs it: its config plus what the job resolved for it."""

    config: PolicyConfig
    app_name: Optional[str] = None  # kind=model/eft: the Serve app of its model server
    deployment: str = "LLMServer"  # that app's ingress deployment (EFTServer for kind=eft)
    system_prompt: Optional[str] = None  # kind=model: part of every prompt (counted for the context)
    chat_template: str = "llama2"  # how `config.tokenizer` renders a conversation when counting tokens


class ChatPolicy:
    """Base of the policies that query a chat model; subclasses implement ``_complete``."""

    def __init__(self, spec: PolicySpec):
        self.spec, self.cfg = spec, spec.config
        self.model_name = self.cfg.model or ""
        self._tok = None
        if self.cfg.tokenizer and self.cfg.context_limit is not None:  # only needed to count tokens

            self._tok = load_tokenizer(self.cfg.tokenizer, spec.chat_template)

    def count(self, messages: List[Dict[str, Any]]) -> int:
        if self._tok is not None:

            return len(prompt_ids(self._tok, messages, self.spec.system_prompt)) + self.cfg.max_tokens
        return sum(_approx_tokens(m["content"]) + 4 for m in messages) + self.cfg.max_tokens

    def body(self, messages: List[Dict[str, Any]], max_tokens: Optional[int] = None) -> Dict[str, Any]:
        return {"model": self.model_name, "messages": messages, "max_tokens": max_tokens or self.cfg.max_tokens,
                "temperature": self.cfg.temperature, "top_p": self.cfg.top_p, "stop": list(self.cfg.stop) or None}

    async def act(self, history: List[Dict[str, Any]], n_open: int) -> Tuple[str, Dict[str, Any]]:
        """(action text, info) for the conversation; raises ContextLimit."""
        msgs = [{"role": m["role"], "content": m["content"]} for m in history]
        limit = self.cfg.context_limit
        if self.cfg.context_policy == "end":
            if limit is not None and self.count(msgs) > limit:
                raise ContextLimit(f"prompt needs more than {limit} tokens")
        else:
            msgs = fit_context(msgs, n_open, limit, self.count)
        text, usage = await self._complete_usage(msgs)
        return text, {"prompt_messages": len(msgs), "usage": usage}

    async def _complete(self, messages: List[Dict[str, Any]], max_tokens: Optional[int] = None) -> str:
        raise NotImplementedError

    async def _complete_usage(self, messages: List[Dict[str, Any]],
                              max_tokens: Optional[int] = None) -> Tuple[str, Dict[str, int]]:
        """(reply, token usage); the usage is estimated here, endpoints that report it override."""
        text = await self._complete(messages, max_tokens)
        return text, self.estimate_usage(messages, text)

    def estimate_usage(self, messages: List[Dict[str, Any]], text: str) -> Dict[str, int]:
        """Prompt/completion tokens with the policy's tokenizer if it has one, else ~4 chars/token."""
        if self._tok is not None:

            prompt = len(prompt_ids(self._tok, messages, self.spec.system_prompt))
            completion = len(self._tok(text, add_special_tokens=False)["input_ids"])
        else:
            prompt = sum(_approx_tokens(m["content"]) + 4 for m in messages)
            completion = _approx_tokens(text)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "estimated": 1}


def _raise_for_error(resp: Dict[str, Any]) -> None:
    err = resp.get("error") if isinstance(resp, dict) else None
    if not err:
        return
    msg = str(err.get("message", err))
    if err.get("param") == "messages" and ("context" in msg or "tokens" in msg):
        raise ContextLimit(msg)
    raise RuntimeError(f"model server error: {msg}")


class DeploymentPolicy(ChatPolicy):
    """Our model deployment, through its Serve handle (no HTTP hop inside the cluster)."""

    def __init__(self, spec: PolicySpec):
        super().__init__(spec)
        self.handle = serve.get_deployment_handle(spec.deployment, app_name=spec.app_name)

    async def _complete(self, messages: List[Dict[str, Any]], max_tokens: Optional[int] = None) -> str:
        return (await self._complete_usage(messages, max_tokens))[0]

    async def _complete_usage(self, messages: List[Dict[str, Any]],
                              max_tokens: Optional[int] = None) -> Tuple[str, Dict[str, int]]:
        body = self.body(messages, max_tokens)
        if not body["model"]:
            body["model"] = self.model_name = await self.handle.model_id.remote()
        resp = await self.handle.chat.remote(body)
        _raise_for_error(resp)
        text = resp["choices"][0]["message"]["content"]
        u = resp.get("usage") or {}
        if isinstance(u.get("prompt_tokens"), int):
            return text, {"prompt_tokens": u["prompt_tokens"], "completion_tokens": int(u.get("completion_tokens") or 0),
                          "estimated": 0}
        return text, self.estimate_usage(messages, text)


class OpenAIPolicy(ChatPolicy):
    """Any OpenAI-compatible endpoint, with the official client.

    Transient failures (timeouts, connection errors, HTTP 429 and 5xx, malformed replies) are
    retried ``max_retries`` times with exponential backoff and full jitter (``backoff_s`` doubling
    per attempt, capped at ``backoff_max_s``); then, or at once for other 4xx, TeacherError.
    """

    def __init__(self, spec: PolicySpec):
        super().__init__(spec)
        import openai

        cfg = self.cfg
        if not cfg.base_url or not cfg.model:
            raise ValueError("an openai policy needs 'base_url' and 'model'")
        key = os.environ.get(cfg.api_key_env or "OPENAI_API_KEY", "EMPTY")
        # The client's own retries are off: ours count malformed replies too and use jitter.
        self.client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=key, timeout=cfg.timeout_s, max_retries=0)
        self.max_retries, self.backoff_s, self.backoff_max_s = cfg.max_retries, cfg.backoff_s, cfg.backoff_max_s
        self.retries = 0  # transient failures retried by this policy object (all episodes)
        self._openai = openai

    async def _complete(self, messages: List[Dict[str, Any]], max_tokens: Optional[int] = None) -> str:
        return (await self._complete_usage(messages, max_tokens))[0]

    def _transient(self, exc: Exception) -> bool:
        o = self._openai
        if isinstance(exc, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError,
                            o.APIResponseValidationError, ValueError, TypeError, AttributeError, IndexError)):
            return True  # ValueError covers JSONDecodeError; the others a reply missing its fields
        return isinstance(exc, o.APIStatusError) and (exc.status_code == 429 or exc.status_code >= 500)

    async def _complete_usage(self, messages: List[Dict[str, Any]],
                              max_tokens: Optional[int] = None) -> Tuple[str, Dict[str, int]]:
        body = self.body(messages, max_tokens)
        if body["stop"] is None:
            body.pop("stop")
        last: Optional[Exception] = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                await asyncio.sleep(random.uniform(0, delay))
            try:
                r = await self.client.chat.completions.create(**body)
                text = r.choices[0].message.content
                if not isinstance(text, str):
                    raise TypeError(f"reply without message content: {str(r)[:200]}")
            except self._openai.BadRequestError as exc:
                msg = str(exc)
                if "context" in msg or "tokens" in msg:
                    raise ContextLimit(msg) from None
                raise TeacherError(f"endpoint refused the request: {msg[:300]}") from None
            except Exception as exc:  # noqa: BLE001 - classified: transient ones are retried
                if not self._transient(exc):
                    raise TeacherError(f"{type(exc).__name__}: {str(exc)[:300]}") from None
                log.info("teacher call failed (attempt %d/%d): %s: %s", attempt + 1, self.max_retries + 1,
                         type(exc).__name__, str(exc)[:200])
                last = exc
                continue
            u = getattr(r, "usage", None)
            if u is not None and isinstance(getattr(u, "prompt_tokens", None), int):
                usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": int(u.completion_tokens or 0),
                         "estimated": 0}
            else:
                usage = self.estimate_usage(messages, text)
            return text, usage
        raise TeacherError(f"no valid reply after {self.max_retries + 1} attempts; "
                           f"last: {type(last).__name__}: {str(last)[:300]}")


class ExpertPolicy:
    """The environment's scripted expert; needs the live environment object."""

    def __init__(self, spec: PolicySpec):
        self.spec = spec


def make_policy(spec: PolicySpec):
    """The policy object for ``spec.config.kind`` (model | openai | expert)."""
    kinds = {"expert": ExpertPolicy, "openai": OpenAIPolicy, "model": DeploymentPolicy, "eft": DeploymentPolicy}
    return kinds[str(spec.config.kind)](spec)


# ----------------------------------------------------------------------------- episodes


def to_agentinstruct(history: List[Dict[str, Any]], n_open: int) -> List[Dict[str, Any]]:
    """Chat history → AgentInstruct ``conversations`` (few-shot answers get ``loss: false``)."""
    out = []
    for i, m in enumerate(history):
        if m["role"] == "system":
            out.append({"from": "system", "value": m["content"], "loss": False})
        elif m["role"] == "user":
            out.append({"from": "human", "value": m["content"], "loss": None})
        else:
            out.append({"from": "gpt", "value": m["content"], "loss": i >= n_open})
    return out


async def play(env: Any, task_id: str, policy: Any,
               demo: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Run one episode of ``task_id`` on ``env`` (a spawned copy) with ``policy``.

    ``demo``: messages of a demonstration episode (its task message, actions and observations,
    ending with an assistant turn), put between the environment's instruction turns and the
    task's own message; they count as opening messages (shown to the policy, ``loss: false``).
    Environment calls block (SQL, shell), so they run in a worker thread; statuses, never
    exceptions, report what went wrong inside the episode.
    """

    t0 = time.time()
    opening = await asyncio.to_thread(env.reset, task_id)
    if demo:
        at = len(opening) - 1  # before the task's message, which ends the opening turns
        env.history[at:at] = [{"role": m["role"], "content": m["content"]} for m in demo]
    n_open = len(env.history)
    result, info = None, {}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0, "estimated": 0}
    try:
        while not env.done:
            if isinstance(policy, ExpertPolicy):
                action = await asyncio.to_thread(env.expert_action)
            else:
                try:
                    action, pinfo = await policy.act(env.prompt_view(n_open), n_open)
                    for k, v in pinfo.get("usage", {}).items():
                        usage[k] = usage.get(k, 0) + int(v)
                    usage["calls"] += 1
                except ContextLimit as exc:
                    result = await asyncio.to_thread(env.abort, Status.CONTEXT_LIMIT, str(exc))
                    break
            result = await asyncio.to_thread(env.step, action)
    finally:
        if not env.done:  # the policy failed (network, server): end the episode before re-raising
            await asyncio.to_thread(env.close)
    info = dict(result.info) if result is not None else {}
    status = result.status.value if result is not None and result.status is not None else "completed"
    return {
        "conversations": to_agentinstruct(env.history, n_open),
        "task_id": str(task_id),
        "reward": float(result.reward) if result is not None else 0.0,
        "status": status,
        "turns": int(env.turns),
        "info": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "usage": usage,
        "elapsed_s": round(time.time() - t0, 3),
    }


@serve.deployment(name="RolloutServer")
class RolloutServer:
    """Runs episodes for configured tasks (environments) and policies; one env copy per episode."""

    def __init__(self, tasks: List[EvalTaskConfig], policies: Dict[str, PolicySpec]):
        self.task_cfgs = {t.name: t for t in tasks}
        self.policy_cfgs = policies
        self._envs: Dict[str, Any] = {}
        self._policies: Dict[str, Any] = {}

    def _env(self, task: str):
        if task not in self.task_cfgs:
            raise KeyError(f"unknown task {task!r}; configured: {sorted(self.task_cfgs)}")
        if task not in self._envs:

            t = self.task_cfgs[task]
            self._envs[task] = load(t.env, t.path, **dict(t.options))
        return self._envs[task]

    def _policy(self, name: str):
        if name not in self._policies:
            if name not in self.policy_cfgs:
                raise KeyError(f"unknown policy {name!r}; configured: {sorted(self.policy_cfgs)}")
            self._policies[name] = make_policy(self.policy_cfgs[name])
        return self._policies[name]

    async def task_ids(self, task: str) -> Dict[str, Any]:
        """Runnable task ids of a configured task (its split applied; callers apply their limit) and
        skipped ones."""
        env = await asyncio.to_thread(self._env, task)
        return {"ids": env.tasks(self.task_cfgs[task].split), "skipped": dict(env.skipped)}

    async def run(self, task: str, task_id: str, policy: str,
                  demo: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        """One whole episode (``demo``: see :func:`play`); returns the episode record (see module
        docstring). A chat policy that keeps failing raises TeacherError."""
        base = await asyncio.to_thread(self._env, task)
        env = base.spawn()
        rec = await play(env, task_id, self._policy(policy), demo)
        rec.update({"id": f"{task}_{task_id}", "task": task, "env": self.task_cfgs[task].env, "policy": policy})
        return rec

    async def score(self, task: str, episodes: List[Dict[str, Any]]) -> Dict[str, Any]:
        """The paper's score of ``task`` from finished episode records (``Env.paper_score``)."""
        env = await asyncio.to_thread(self._env, task)
        return {"metric": env.metric, **env.paper_score(episodes)}

    async def chat(self, policy: str, messages: List[Dict[str, Any]], max_tokens: Optional[int] = None) -> str:
        """One reply of a chat policy (general tasks use the same policies as episodes)."""
        pol = self._policy(policy)
        if isinstance(pol, ExpertPolicy):
            raise ValueError("the expert policy only acts inside environments")
        return await pol._complete(messages, max_tokens)

    def pid(self) -> int:
        return os.getpid()

    def __del__(self):
        for env in self._envs.values():
            try:
                env.shutdown()
            except Exception:  # noqa: BLE001 - best effort at replica teardown
                log.warning("env shutdown failed", exc_info=True)
