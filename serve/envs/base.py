"""Environment protocol shared by every agent task (DB, OS, ALFWorld, HotpotQA, ...).

An environment is plain Python (never import Ray here): the env server, the rollout driver,
trajectory construction and tests all drive the same object.

How to add an environment
-------------------------
1. Create ``serve/envs/<name>.py`` with a subclass of :class:`Env`::

       from serve.envs.base import Env, InvalidFormat, StepResult, Task, register

       @register("mytask")
       class MyEnv(Env):
           default_max_turns = 10

           def load_tasks(self, path):          # -> list[Task]; call self.skip(id, reason)
               ...                              #    for records that cannot run
           def start(self, task):               # -> opening messages (instruction + few-shot)
               ...
           def act(self, action):               # -> StepResult; raise InvalidFormat /
               ...                              #    InvalidAction with the agent's feedback
           def expert_action(self):             # -> the scripted expert's next action text
               ...
           def end_episode(self):               # optional: free per-episode resources
               ...

2. Add the name (and any aliases) to ``ENVIRONMENTS`` in ``serve/envs/__init__.py`` (so ``load`` imports lazily)
   unless the module is ``serve/envs/<name>.py`` itself, which is found by convention.

The base class owns the shared mechanics, so every environment behaves the same way:
turn limit (``max_turns`` → status ``turn_limit``), observation truncation
(``max_observation_chars``), repetition detection (the same action ``repetition_k`` times in a
row → ``repetition``), bad agent output (``InvalidFormat``/``InvalidAction`` → those statuses),
and containment (any other exception inside ``act`` → ``task_error``; the caller never sees a
crash). ``history`` holds the whole conversation so far (opening messages, then alternating
assistant actions and user observations), which is what a trajectory is.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Type

from agenttuning import paths

log = logging.getLogger(__name__)

TRUNCATION_NOTE = "\n[truncated because the output is too long]"  # AgentBench's wording


class Status(str, Enum):
    """How an episode ended (DESIGN.md). ``str`` subclass: serialises as its value."""

    COMPLETED = "completed"  # the task ran to its end (reward says whether it was solved)
    INVALID_FORMAT = "invalid_format"  # agent output could not be parsed
    INVALID_ACTION = "invalid_action"  # parsed, but not an action this environment accepts
    REPETITION = "repetition"  # the same action repetition_k times in a row
    TURN_LIMIT = "turn_limit"  # max_turns agent actions without finishing
    CONTEXT_LIMIT = "context_limit"  # set by the policy side when the prompt outgrows the model
    TASK_ERROR = "task_error"  # the environment itself failed

    def __str__(self) -> str:
        return self.value


class EnvError(ValueError):
    """Misuse of the API by the caller (unknown task, step without reset, ...): a 4xx, not a crash."""


class UnknownTask(EnvError, KeyError):
    """A task id that this environment does not have (or skipped at load)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown task"


class EpisodeOver(EnvError):
    """step() after the episode ended, or before any reset()."""


class TaskSetupError(RuntimeError):
    """The environment could not set up an episode (backend down, sandbox unavailable)."""


class InvalidFormat(Exception):
    """Raised by ``act``: the agent's text does not parse; ``feedback`` is shown to the agent."""

    def __init__(self, feedback: str):
        super().__init__(feedback)
        self.feedback = feedback


class InvalidAction(InvalidFormat):
    """Raised by ``act``: the action parsed but is not allowed here."""


@dataclass
class StepResult:
    """One environment transition. ``status`` is set exactly when ``done`` is true."""

    observation: str
    reward: float = 0.0
    done: bool = False
    status: Optional[Status] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready form (the env server's response body)."""
        return {
            "observation": self.observation,
            "reward": self.reward,
            "done": self.done,
            "status": None if self.status is None else self.status.value,
            "info": self.info,
        }


@dataclass
class Task:
    """One runnable task: id unique within the environment, its split, and the raw record."""

    id: str
    data: Any
    split: str = "dev"


def data_file(relpath: str) -> str:
    """Default task file shipped in the repo's ``data/`` (or under ``$AGENTTUNING_DATA_DIR``);
    EnvError naming where it was looked for when absent."""
    try:
        return paths.data_file(relpath)
    except paths.DataFileMissing as exc:
        raise EnvError(str(exc)) from None


def read_json(path: str, env: str, what: str) -> Any:
    """A JSON file an environment is configured with; EnvError naming the env, file and problem."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise EnvError(f"{env}: cannot read {what} {path}: {exc}") from None


def truncate(text: str, limit: Optional[int]) -> str:
    """Cut ``text`` to at most ``limit`` characters, saying so (AgentBench OS style)."""
    if limit is None or len(text) <= limit:
        return text
    keep = max(0, limit - len(TRUNCATION_NOTE))
    return text[:keep] + TRUNCATION_NOTE


def _normalise_action(action: str) -> str:
    return re.sub(r"\s+", " ", action).strip()


class Env(ABC):
    """Base class of all environments; one instance runs one episode at a time.

    Use :meth:`spawn` for concurrent episodes: the copy shares loaded tasks and backends
    (database server, sandbox root filesystem) but has its own episode state.
    """

    name: str = "env"
    # Attributes holding per-episode resources with a close() (a database, a sandbox): cleared
    # in spawn() copies and closed by the default end_episode().
    episode_attrs: Tuple[str, ...] = ()
    default_max_turns: int = 10
    default_max_observation_chars: Optional[int] = None
    # The task's reported metric (evaluation reports print it beside the paper's column), and how
    # much history a policy sees: None = the whole conversation; k = the opening turns plus the
    # last k (action, observation) pairs (WebArena shows only the current step: 0).
    metric: str = "mean_reward"
    prompt_history_turns: Optional[int] = None

    def __init__(
        self,
        path: Optional[str] = None,
        *,
        max_turns: Optional[int] = None,
        max_observation_chars: Optional[int] = None,
        repetition_k: int = 3,
        max_invalid: int = 0,
    ) -> None:
        """``max_invalid``: unparseable actions tolerated (feedback only) before the episode ends."""
        self.path = path
        self.max_turns = int(max_turns if max_turns is not None else self.default_max_turns)
        self.max_observation_chars = (
            max_observation_chars
            if max_observation_chars is not None
            else self.default_max_observation_chars
        )
        self.repetition_k = int(repetition_k)
        self.max_invalid = int(max_invalid)
        if self.max_turns < 1:
            raise EnvError(f"{self.name}: option 'max_turns' must be >= 1, got {self.max_turns}")
        if self.repetition_k < 0:
            raise EnvError(f"{self.name}: option 'repetition_k' must be >= 0 (0 = off)")
        self.skipped: Dict[str, str] = {}  # task id -> why it cannot run
        self._tasks: Dict[str, Task] = {}
        for task in self.load_tasks(path):
            if task.id in self._tasks:
                raise EnvError(f"{self.name}: duplicate task id {task.id!r} in {path}")
            if task.id not in self.skipped:
                self._tasks[task.id] = task
        for tid, reason in self.skipped.items():
            log.info("%s: skipping task %s: %s", self.name, tid, reason)
        self._clear_episode()

    # ------------------------------------------------------------------ to implement

    @abstractmethod
    def load_tasks(self, path: Optional[str]) -> List[Task]:
        """Read the task file (``path`` or the environment's default); ``self.skip`` bad records."""

    @abstractmethod
    def start(self, task: Task) -> List[Dict[str, Any]]:
        """Set up the episode for ``task``; return the opening messages (few-shot included)."""

    @abstractmethod
    def act(self, action: str) -> StepResult:
        """Apply one agent action; raise InvalidFormat/InvalidAction for bad agent output."""

    @abstractmethod
    def expert_action(self) -> str:
        """The scripted expert's next action for the current episode (from gold information)."""

    def end_episode(self) -> None:
        """Release per-episode resources. Must be idempotent. Default: ``close()`` and clear
        every attribute named in ``episode_attrs``."""
        for name in self.episode_attrs:
            res = getattr(self, name, None)
            setattr(self, name, None)
            if res is not None:
                res.close()

    def shutdown(self) -> None:
        """Release shared resources (servers) when the last user is done. Default: nothing."""

    # ------------------------------------------------------------------ public API

    def skip(self, task_id: str, reason: str) -> None:
        """Record that a task cannot run (missing fields, missing script file, ...)."""
        self.skipped[str(task_id)] = reason

    def tasks(self, split: Optional[str] = None) -> List[str]:
        """Runnable task ids, in file order, optionally of one split."""
        if split is not None and split not in self.splits():
            raise EnvError(f"{self.name}: unknown split {split!r}; have {sorted(self.splits())}")
        return [t.id for t in self._tasks.values() if split is None or t.split == split]

    def splits(self) -> Dict[str, List[str]]:
        """Split name -> runnable task ids."""
        out: Dict[str, List[str]] = {}
        for t in self._tasks.values():
            out.setdefault(t.split, []).append(t.id)
        return out

    def task(self, task_id: str) -> Task:
        """The task record; UnknownTask (naming skipped tasks' reason) otherwise."""
        tid = str(task_id)
        if tid in self._tasks:
            return self._tasks[tid]
        if tid in self.skipped:
            raise UnknownTask(f"{self.name}: task {tid!r} was skipped at load: {self.skipped[tid]}")
        raise UnknownTask(f"{self.name}: no task {tid!r} ({len(self._tasks)} tasks loaded)")

    def reset(self, task_id: str) -> List[Dict[str, Any]]:
        """Start an episode of ``task_id``; returns the opening chat messages."""
        task = self.task(task_id)
        self._end_quietly()
        self._clear_episode()
        self.current = task
        try:
            messages = [dict(m) for m in self.start(task)]
        except (EnvError, TaskSetupError):
            self._end_quietly()
            raise
        except Exception as exc:  # noqa: BLE001 — reported as a setup failure naming the task
            self._end_quietly()
            raise TaskSetupError(f"{self.name}: cannot set up task {task.id!r}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        self.history = [dict(m) for m in messages]
        self.done = False
        return messages

    def step(self, action: str) -> StepResult:
        """One agent turn. Never raises for anything the agent or the environment did wrong."""
        if self.current is None or self.done:
            raise EpisodeOver(f"{self.name}: no running episode; call reset(task_id) first")
        if not isinstance(action, str):
            raise EnvError(f"{self.name}: action must be a string, got {type(action).__name__}")
        self.turns += 1
        self.history.append({"role": "assistant", "content": action})
        key = _normalise_action(action)
        self._recent = (self._recent + [key])[-max(self.repetition_k, 1):]
        if self.repetition_k and len(self._recent) == self.repetition_k and len(set(self._recent)) == 1:
            result = StepResult(
                f"The same action was repeated {self.repetition_k} times; the episode ends.",
                done=True, status=Status.REPETITION,
            )
            return self._finish_step(result)
        try:
            result = self.act(action)
        except InvalidFormat as exc:
            status = Status.INVALID_ACTION if isinstance(exc, InvalidAction) else Status.INVALID_FORMAT
            self.invalid += 1
            result = StepResult(exc.feedback, done=self.invalid > self.max_invalid,
                                status=status if self.invalid > self.max_invalid else None)
            result.info["invalid"] = status.value
        except Exception as exc:  # noqa: BLE001 — containment: an env failure is an episode status
            log.warning("%s: task %s: error in step: %s", self.name, self.current.id, exc, exc_info=True)
            result = StepResult(f"Task error: {type(exc).__name__}: {exc}", done=True,
                                status=Status.TASK_ERROR)
        if not result.done and self.turns >= self.max_turns:
            result.done, result.status = True, Status.TURN_LIMIT
        if result.done and result.status is None:
            result.status = Status.COMPLETED
        return self._finish_step(result)

    def abort(self, status: Status, reason: str = "") -> StepResult:
        """End the running episode from outside (e.g. the policy hit its ``context_limit``)."""
        if self.current is None or self.done:
            raise EpisodeOver(f"{self.name}: no running episode to abort")
        return self._finish_step(StepResult(reason, done=True, status=Status(status)))

    def spawn(self) -> "Env":
        """A fresh instance for a concurrent episode, sharing tasks and backends with this one."""
        other = copy.copy(self)
        other._clear_episode()
        for name in self.episode_attrs:
            setattr(other, name, None)
        return other

    def close(self) -> None:
        """End the running episode (if any) and free its resources."""
        self._end_quietly()
        self._clear_episode()

    def __enter__(self) -> "Env":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def paper_score(self, episodes: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
        """The paper's task score (0-100) from finished episodes (records with ``reward``);
        default: 100 × mean reward. Environments whose benchmark aggregates otherwise override it."""
        r = [float(e["reward"]) for e in episodes]
        return {"metric": self.metric, "score": 100 * sum(r) / len(r) if r else 0.0, "n": len(r)}

    def prompt_view(self, n_open: int) -> List[Dict[str, Any]]:
        """What a policy is shown: ``history`` cut to ``prompt_history_turns`` (see above)."""
        k = self.prompt_history_turns
        if k is None:
            return self.history
        return self.history[:n_open - 1] + self.history[max(n_open - 1, len(self.history) - (2 * k + 1)):]

    # ------------------------------------------------------------------ internals

    def _clear_episode(self) -> None:
        self.current: Optional[Task] = None
        self.done = True
        self.turns = 0
        self.invalid = 0
        self.history: List[Dict[str, Any]] = []
        self.last: Optional[StepResult] = None
        self._recent: List[str] = []

    def _finish_step(self, result: StepResult) -> StepResult:
        result.observation = truncate(str(result.observation), self.max_observation_chars)
        result.info.setdefault("turn", self.turns)
        result.info.setdefault("task_id", self.current.id if self.current else None)
        self.history.append({"role": "user", "content": result.observation})
        self.last = result
        if result.done:
            self.done = True
            self._end_quietly()
        return result

    def _end_quietly(self) -> None:
        try:
            self.end_episode()
        except Exception as exc:  # noqa: BLE001 — cleanup failure must not mask the result
            log.warning("%s: cleanup failed: %s", self.name, exc, exc_info=True)


@dataclass
class Episode:
    """A finished episode: the conversation and how it ended."""

    env: str
    task_id: str
    messages: List[Dict[str, Any]]
    reward: float
    status: Status
    turns: int
    info: Dict[str, Any] = field(default_factory=dict)


def run_episode(env: Env, task_id: str, policy: Optional[Callable[[List[Dict[str, Any]]], str]] = None) -> Episode:
    """Play one episode with ``policy(history) -> action`` (default: the scripted expert)."""
    env.reset(task_id)
    result: Optional[StepResult] = None
    while not env.done:
        action = env.expert_action() if policy is None else policy(env.history)
        result = env.step(action)
    assert result is not None  # the loop runs at least once: reset leaves done False
    return Episode(env.name, str(task_id), list(env.history), float(result.reward),
                   result.status or Status.COMPLETED, env.turns, dict(result.info))


# ---------------------------------------------------------------------- registry

_REGISTRY: Dict[str, Type[Env]] = {}


def register(name: str) -> Callable[[Type[Env]], Type[Env]]:
    """Class decorator: make an Env subclass loadable as ``serve.envs.load(name)``."""

    def deco(cls: Type[Env]) -> Type[Env]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise EnvError(f"environment name {name!r} registered twice "
                           f"({_REGISTRY[name].__module__} and {cls.__module__})")
        _REGISTRY[name] = cls
        if cls.name == Env.name:
            cls.name = name
        return cls

    return deco
