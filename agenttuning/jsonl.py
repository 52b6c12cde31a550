"""Reading JSON-lines files, with the error policy chosen at each call.

Every caller states what a bad line means for it: ``on_error="raise"`` (a task file: the error
names the file and line and the fix), ``"skip"`` (a crash-torn log such as an episode store: the
line is reported and skipped), or ``"keep"`` (data sources: the caller counts and writes it to a
rejects file; the line comes back as ``(lineno, None, reason)``).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator, Optional, Tuple, Type

log = logging.getLogger(__name__)


def iter_jsonl(path: str, on_error: str = "raise", error: Type[Exception] = ValueError, who: str = "",
               objects: bool = True) -> Iterator[Tuple[int, Optional[Any], Optional[str]]]:
    """(line number, record, problem) for every non-empty line of ``path``.

    ``objects``: a record must be a JSON object. ``error``/``who``: the exception raised (and the
    prefix of its message, e.g. the environment's name) under ``on_error="raise"``.
    """
    if on_error not in ("raise", "skip", "keep"):
        raise ValueError(f"on_error must be raise, skip or keep, got {on_error!r}")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            problem, rec = None, None
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                problem = f"not JSON: {exc}"
            if problem is None and objects and not isinstance(rec, dict):
                problem = "a record must be a JSON object"
            if problem is None:
                yield lineno, rec, None
            elif on_error == "raise":
                raise error(f"{who + ': ' if who else ''}{path}:{lineno}: {problem}")
            elif on_error == "skip":
                log.warning("%s:%d: %s; line skipped", path, lineno, problem)
            else:
                yield lineno, None, problem


def read_jsonl(path: str, **kwargs: Any) -> list:
    """The records of ``path`` (``iter_jsonl`` with on_error raise or skip)."""
    return [rec for _, rec, _ in iter_jsonl(path, **kwargs)]
