"""Agent environments: ``load(name, path=None, **options) -> Env``.

Environment modules are imported lazily (some need heavy optional packages), so listing or
loading one environment never imports the others. See ``serve/envs/base.py`` for the protocol
and how to add an environment.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Tuple, Type

from serve.envs.base import (
    _REGISTRY,
    Env,
    EnvError,
    Episode,
    EpisodeOver,
    InvalidAction,
    InvalidFormat,
    Status,
    StepResult,
    Task,
    TaskSetupError,
    UnknownTask,
    register,
    run_episode,
)

# The one table of environment names: canonical name -> (module that registers it, aliases).
# Aliases resolve here (`canonical`), so configs may use either; modules register the canonical
# name only. Names not listed are looked up as serve.envs.<name>; "package.module:Class" loads an
# outside Env subclass.
ENVIRONMENTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    # held-in (AgentBench)
    "os": ("serve.envs.os_shell", ("os_interaction",)),
    "db": ("serve.envs.db", ("dbbench",)),
    "kg": ("serve.envs.kg", ("knowledgegraph",)),
    "alfworld": ("serve.envs.alfworld", ()),
    "webshop": ("serve.envs.webshop", ()),
    "mind2web": ("serve.envs.mind2web", ()),
    # held-out (AgentTuning's eval_heldout)
    "scienceworld": ("serve.envs.scienceworld", ("sciworld",)),
    "miniwob": ("serve.envs.miniwob", ("miniwob++",)),
    "webarena": ("serve.envs.webarena", ()),
    "hotpotqa": ("serve.envs.hotpotqa", ()),
    "rewoo": ("serve.envs.rewoo", ()),
    "dcg": ("serve.envs.dcg", ("card_game",)),
}
_ALIASES: Dict[str, str] = {a: name for name, (_, aliases) in ENVIRONMENTS.items() for a in aliases}


def canonical(name: str) -> str:
    """The canonical environment name of ``name`` (an alias such as ``dbbench`` → ``db``)."""
    return _ALIASES.get(name, name)


def _module(name: str) -> str:
    return ENVIRONMENTS[name][0] if name in ENVIRONMENTS else f"serve.envs.{name}"


def get_class(name: str) -> Type[Env]:
    """The Env subclass registered as ``name`` or its canonical name (importing its module on first use)."""
    if ":" in name:
        mod, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(mod), attr, None)
        if not (isinstance(cls, type) and issubclass(cls, Env)):
            raise EnvError(f"{name!r} is not an Env subclass")
        return cls
    key = name if name in _REGISTRY else canonical(name)
    if key not in _REGISTRY:
        module = _module(key)
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but lacks a dependency: say which
                raise EnvError(f"environment {name!r} needs the missing module {exc.name!r}") from exc
            raise EnvError(f"unknown environment {name!r}; known: {', '.join(available())}") from None
    if key not in _REGISTRY:
        raise EnvError(f"module {_module(key)} did not register {key!r}")
    return _REGISTRY[key]


def load(name: str, path: Optional[str] = None, **options: Any) -> Env:
    """Instantiate environment ``name`` on task file ``path`` (None: its default data)."""
    cls = get_class(name)
    try:
        return cls(path, **options)
    except TypeError as exc:  # unknown option names: say which environment rejected them
        raise EnvError(f"environment {name!r}: bad options {sorted(options)}: {exc}") from exc


def available() -> List[str]:
    """Canonical names of the known environments (listed above or registered by outside code)."""
    return sorted(set(ENVIRONMENTS) | {n for n in _REGISTRY if n not in _ALIASES})


__all__ = [
    "Env", "EnvError", "Episode", "EpisodeOver", "InvalidAction", "InvalidFormat", "Status",
    "StepResult", "Task", "TaskSetupError", "UnknownTask", "available", "canonical", "get_class", "load", "register",
    "run_episode", "ENVIRONMENTS",
]
