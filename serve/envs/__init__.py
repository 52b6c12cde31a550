"""Agent environments: ``load(name, path=None, **options) -> Env``.

Environment modules are imported lazily (some need heavy optional packages), so listing or
loading one environment never imports the others. See ``serve/envs/base.py`` for the protocol
and how to add an environment.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Type

from serve.envs.base import (
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
    _REGISTRY,
    register,
    run_episode,
)

# Environment name -> module that registers it. Names not listed here are looked up as
# serve.envs.<name>; "package.module:Class" loads an outside Env subclass.
_MODULES: Dict[str, str] = {
    "db": "serve.envs.db",
    "dbbench": "serve.envs.db",
    "os": "serve.envs.os_shell",
    "os_interaction": "serve.envs.os_shell",
    "alfworld": "serve.envs.alfworld",
    "sciworld": "serve.envs.scienceworld",
    "scienceworld": "serve.envs.scienceworld",
    "miniwob": "serve.envs.miniwob",
    "hotpotqa": "serve.envs.hotpotqa",
}


def get_class(name: str) -> Type[Env]:
    """The Env subclass registered as ``name`` (importing its module on first use)."""
    if ":" in name:
        mod, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(mod), attr, None)
        if not (isinstance(cls, type) and issubclass(cls, Env)):
            raise EnvError(f"{name!r} is not an Env subclass")
        return cls
    if name not in _REGISTRY:
        module = _MODULES.get(name, f"serve.envs.{name}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but lacks a dependency: say which
                raise EnvError(f"environment {name!r} needs the missing module {exc.name!r}") from exc
            raise EnvError(f"unknown environment {name!r}; known: {', '.join(available())}") from None
    if name not in _REGISTRY:
        raise EnvError(f"module {_MODULES.get(name, 'serve.envs.' + name)} did not register {name!r}")
    return _REGISTRY[name]


def load(name: str, path: Optional[str] = None, **options: Any) -> Env:
    """Instantiate environment ``name`` on task file ``path`` (None: its default data)."""
    cls = get_class(name)
    try:
        return cls(path, **options)
    except TypeError as exc:  # unknown option names: say which environment rejected them
        raise EnvError(f"environment {name!r}: bad options {sorted(options)}: {exc}") from exc


def available() -> List[str]:
    """Known environment names (registered or importable by name)."""
    return sorted(set(_MODULES) | set(_REGISTRY))


__all__ = [
    "Env", "EnvError", "Episode", "EpisodeOver", "InvalidAction", "InvalidFormat", "Status",
    "StepResult", "Task", "TaskSetupError", "UnknownTask", "available", "get_class", "load", "register", "run_episode",
]
