"""How every job is started: ``python -m <module> CONFIG [dotted.key=value ...]``.

:func:`run_job` loads CONFIG + overrides through the typed schema, sets up the console (see
``agenttuning.console``), and calls the module's ``main(cfg)``. Every job also answers
``--help`` (what it does, the config sections it reads with every key's default and meaning,
taken from the schema's own comments) and ``--print-config`` (the resolved config after overrides).
A job module declares the sections it reads as ``CONFIG_SECTIONS``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import logging
import os
import signal
import sys
import tokenize
from typing import Any, Dict, List, Tuple

from omegaconf import OmegaConf

from agenttuning import schema as config_schema
from agenttuning.cluster import JobFailed
from agenttuning.config import ConfigError, load_config
from agenttuning.console import setup_logging
from agenttuning.schema import Config


def _field_comments() -> Dict[Tuple[str, str], str]:
    """(dataclass name, field name) -> the comment on that field's line, or the block just above."""
    src = inspect.getsource(config_schema)
    comments: Dict[int, str] = {}  # line -> trailing comment of a line with code
    blocks: Dict[int, str] = {}  # line -> a comment-only line
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            alone = not lines[tok.start[0] - 1][:tok.start[1]].strip()
            (blocks if alone else comments)[tok.start[0]] = tok.string.lstrip("#").strip()
    out: Dict[Tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(src)):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                text = comments.get(stmt.lineno)
                if text is None:  # a comment block right above the field
                    above, line = [], stmt.lineno - 1
                    while line in blocks:
                        above.insert(0, blocks[line])
                        line -= 1
                    text = " ".join(above) or None
                if text:
                    out[(node.name, stmt.target.id)] = text
    return out


def _fmt_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "(required)" if f.default == "???" else repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return "{...}" if dataclasses.is_dataclass(value) else repr(value)
    return "(required)"


def describe(sections: List[str]) -> str:
    """Every key of ``sections`` (top-level config sections) with its default and meaning."""
    comments = _field_comments()
    lines: List[str] = []

    def walk(cls: type, prefix: str, depth: int) -> None:
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}"
            sub = f.type if isinstance(f.type, type) and dataclasses.is_dataclass(f.type) else None
            if sub is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                value = f.default_factory()  # type: ignore[misc]
                sub = type(value) if dataclasses.is_dataclass(value) else None
            note = next((comments[(c.__name__, f.name)] for c in cls.__mro__ if (c.__name__, f.name) in comments), "")
            if sub is not None:
                lines.append(f"{'  ' * depth}{key}:" + (f"  # {note}" if note else ""))
                walk(sub, key, depth + 1)
            else:
                lines.append(f"{'  ' * depth}{key} = {_fmt_default(f)}" + (f"  # {note}" if note else ""))

    roots = {f.name: f for f in dataclasses.fields(Config)}
    for name in sections:
        cls = type(roots[name].default_factory())  # type: ignore[misc]
        doc = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
        lines.append(f"\n[{name}]" + (f"  {doc}" if doc and not doc.startswith(cls.__name__ + "(") else ""))
        walk(cls, name, 1)
    return "\n".join(lines)


def job_help(module: Any) -> str:
    """Usage, the module docstring's first paragraph, and its config sections."""
    doc = (inspect.getdoc(module) or "").strip()
    summary = doc.split("\n\n")[0]
    sections = list(getattr(module, "CONFIG_SECTIONS", [f.name for f in dataclasses.fields(Config)]))
    return (f"usage: python -m {module.__name__} CONFIG [dotted.key=value ...] [--print-config]\n\n"
            f"{summary}\n\nconfig sections read by this job (key = default  # meaning):"
            f"{describe(sections)}\n")


class JobStopped(KeyboardInterrupt):
    """SIGTERM (``ray job stop``, Kubernetes) or SIGINT (Ctrl-C) arrived: unwind, cleaning up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, _frame: Any) -> None:
    raise JobStopped(signum)


def run_job(module_name: str, argv: List[str]) -> int:
    """Load CONFIG + overrides and call the module's ``main(cfg)``. Exit codes: 0 done, 2 config
    error, 3 job failed (JobFailed: incomplete outputs, resources that never come), 128+N signal N."""
    module = importlib.import_module(module_name)
    if any(a in ("-h", "--help") for a in argv):
        print(job_help(module))
        return 0
    # Sub-commands (`data preview CONFIG`): SUBCOMMANDS maps a name to another main(cfg).
    entry = module.main
    subcommands = getattr(module, "SUBCOMMANDS", {})
    if argv and argv[0] in subcommands:
        entry, argv = subcommands[argv[0]], argv[1:]
    if not argv:
        print(f"usage: python -m {module_name} CONFIG [dotted.key=value ...]  (--help for the keys)",
              file=sys.stderr)
        return 2
    print_config = "--print-config" in argv
    args = [a for a in argv if a != "--print-config"]
    try:
        cfg = load_config(args[0], args[1:])
        if print_config:
            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        setup_logging(module_name.rsplit(".", 1)[-1])
        # Both signals unwind the job through its finally blocks (Serve apps it deployed are
        # deleted, episode files closed, a local Ray stopped); SIGINT explicitly too, because a
        # shell starts background jobs with SIGINT ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _stop)
        # Jobs raise ConfigError too, for what only they can check before work (paths, data sizes).
        entry(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"{module_name}: stopped by {signal.Signals(signum).name}; outputs written so far are kept "
              "(re-run to resume)", file=sys.stderr)
        # The job's finally blocks have run (apps deleted, files closed, Ray stopped); threads still
        # waiting on a request (model calls in flight) must not hold the exit up.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(128 + int(signum))
    return 0
