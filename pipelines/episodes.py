"""Episodes through the rollout deployment, shared by the collect and eval jobs.

:class:`EpisodeStore` is the durable record: one JSON line per finished episode in a ``.jsonl``
file, flushed and fsynced before the next one is counted, keyed by (policy, task, task_id). A
crash can at worst leave a half-written last line, which is cut on open, so a re-run skips every
finished episode and redoes only the rest.

:func:`run_episodes` plays jobs with bounded concurrency on ``RolloutServer.run``, retries an
episode whose replica or server failed (a teacher that keeps failing is not retried here: the
policy already retried it with backoff, see ``serve.rollout``), and shows a progress bar.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, Dict, List, Tuple

from agenttuning.console import progress
from agenttuning.jsonl import iter_jsonl
from serve.rollout import TeacherError

log = logging.getLogger(__name__)

Key = Tuple[str, str, str]  # (policy, task, task_id)


class EpisodeStore:
    """Append-only, crash-safe store of finished episodes (see module docstring)."""

    def __init__(self, path: str, resume: bool = True) -> None:
        self.path = path
        if not resume and os.path.exists(path):
            os.remove(path)
        self._drop_torn_tail()
        self._f = None

    def _drop_torn_tail(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                log.warning("%s: cutting a half-written last line (interrupted run); that episode re-runs", self.path)
                f.truncate(data.rfind(b"\n") + 1)

    def load(self) -> Dict[Key, Dict[str, Any]]:
        """Finished episodes by (policy, task, task_id); the last record of a key wins."""
        done: Dict[Key, Dict[str, Any]] = {}
        if not os.path.exists(self.path):
            return done
        for _, ep, _ in iter_jsonl(self.path, on_error="skip"):  # a bad line's episode re-runs
            done[(ep["policy"], ep["task"], str(ep["task_id"]))] = ep
        return done

    def write(self, ep: Dict[str, Any]) -> None:
        """Append one finished episode and make it durable before returning."""
        if self._f is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(ep, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "EpisodeStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _is_teacher_error(exc: BaseException) -> bool:
    # Ray wraps the replica's exception: match on its type and on the remote type's name.

    return isinstance(exc, TeacherError) or "TeacherError" in f"{type(exc).__name__}: {exc}"


async def _run(handle: Any, jobs: List[Dict[str, Any]], store: EpisodeStore, concurrency: int, retries: int,
               bar: Any) -> Dict[Key, Dict[str, Any]]:
    sem = asyncio.Semaphore(concurrency)
    outcome: Dict[Key, Dict[str, Any]] = {}

    async def one(job: Dict[str, Any]) -> None:
        key = (job["policy"], job["task"], str(job["task_id"]))
        err = ""
        async with sem:
            for attempt in range(retries + 1):
                try:
                    ep = await handle.run.remote(job["task"], job["task_id"], job["policy"], job.get("demo"))
                except Exception as exc:  # noqa: BLE001 — classified below; never crashes the job
                    if _is_teacher_error(exc):
                        outcome[key] = {"error": "teacher_error", "detail": str(exc)[:500], "attempts": attempt + 1}
                        bar.update(1)
                        return
                    err = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning("episode %s/%s/%s failed (attempt %d of %d): %s", *key, attempt + 1, retries + 1,
                                err.splitlines()[0][:200])
                    if attempt < retries:  # give Serve time to replace a dead replica before replaying
                        await asyncio.sleep(min(2.0 ** attempt, 30.0))
                    continue
                ep.update(job.get("record", {}))
                if attempt:
                    ep["restarts"] = attempt  # counted in the report: the episode was replayed
                store.write(ep)
                outcome[key] = {"status": ep.get("status"), "attempts": attempt + 1}
                bar.update(1)
                return
        outcome[key] = {"error": "rollout_error", "detail": err, "attempts": retries + 1}
        bar.update(1)

    await asyncio.gather(*(one(j) for j in jobs))
    return outcome


def run_episodes(handle: Any, jobs: List[Dict[str, Any]], store: EpisodeStore, concurrency: int,
                 retries: int, desc: str = "episodes") -> Dict[Key, Dict[str, Any]]:
    """Play ``jobs`` ({policy, task, task_id, demo?, record?}) on ``handle`` (a RolloutServer).

    Each finished episode, updated with the job's ``record`` fields, is written to ``store``.
    Returns per key either ``{status, attempts}`` or ``{error: teacher_error|rollout_error, detail}``.
    """
    if not jobs:
        return {}
    with progress(total=len(jobs), desc=desc, unit="ep") as bar:
        return asyncio.run(_run(handle, jobs, store, concurrency, retries, bar))
