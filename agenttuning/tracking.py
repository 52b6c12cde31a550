"""Weights & Biases the way Ray's integration does it: decided where the job is started, used
where the work runs, never blocking and never failing a job.

* :func:`resolve` runs on the driver (where ``ray job submit`` or ``agenttuning`` runs): the mode
  (``auto`` = online when an API key is found in ``$WANDB_API_KEY`` or ``~/.netrc``, else offline)
  and the key itself, which then travels to the rank-0 training worker inside the job's typed
  payload (Ray Train workers may run on nodes without the key).
* :func:`run_id` is stable: the same project, group, job type and name give the same id, so a
  resubmitted or resumed job continues its run (``resume="allow"``) instead of starting a new one.
* One experiment = one ``group`` (its collect, data, train and eval runs), each run with its
  ``job_type``. Offline runs land in the job's output folder; ``wandb sync <dir>`` uploads them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WandbRun:
    """Everything a process needs to open (or continue) its run; built by :func:`resolve`."""

    mode: str  # online | offline | disabled
    project: str
    group: str
    job_type: str
    name: str
    id: str
    tags: List[str]
    api_key: Optional[str] = None  # only for online mode; never logged (repr hides it)

    def __repr__(self) -> str:
        return (f"WandbRun(mode={self.mode!r}, project={self.project!r}, group={self.group!r}, "
                f"job_type={self.job_type!r}, name={self.name!r}, id={self.id!r})")


def _netrc_key() -> Optional[str]:
    path = os.path.expanduser("~/.netrc")
    if not os.path.isfile(path):
        return None
    try:
        import netrc

        auth = netrc.netrc(path).authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


def run_id(project: str, group: str, job_type: str, name: str) -> str:
    """A stable wandb run id (wandb allows [a-z0-9], up to 128 chars; 16 hex digits here)."""
    return hashlib.sha1(f"{project}/{group}/{job_type}/{name}".encode()).hexdigest()[:16]


def resolve(mode: str, project: str, group: str, job_type: str, name: str, tags: List[str]) -> WandbRun:
    """Decide mode and credentials here (the driver), for use here or in a worker."""
    env_mode = os.environ.get("WANDB_MODE")
    key = os.environ.get("WANDB_API_KEY") or _netrc_key()
    if mode == "auto":
        mode = env_mode if env_mode in ("offline", "disabled", "online") else ("online" if key else "offline")
    return WandbRun(mode=mode, project=project, group=group, job_type=job_type, name=name,
                    id=run_id(project, group, job_type, name), tags=list(tags),
                    api_key=key if mode == "online" else None)


def init(run: WandbRun, directory: str, config: Dict[str, Any]) -> Any:
    """Open (or continue) the run; None when disabled or when wandb is unavailable."""
    if run.mode == "disabled":
        return None
    try:
        import wandb

        if run.api_key:
            os.environ.setdefault("WANDB_API_KEY", run.api_key)
        # The eval job imports `openai` (its client), which makes wandb.init print a three-line Weave
        # advertisement into the console; a user who wants Weave sets the variable to false.
        os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
        os.makedirs(directory, exist_ok=True)
        return wandb.init(project=run.project, group=run.group, job_type=run.job_type, name=run.name, id=run.id,
                          resume="allow", tags=run.tags, config=config, mode=run.mode, dir=directory,
                          settings=wandb.Settings(init_timeout=60, silent=True))
    except Exception as exc:  # noqa: BLE001 - tracking must never stop a job
        log.warning("wandb disabled for this run: %s", exc)
        return None
