"""What a person sees while a job runs, and where everything else goes.

The console shows the project's own INFO lines (stages, where outputs went), every WARNING+ as one
line, progress bars and the final table. Everything at INFO and above, from every library,
with tracebacks, goes to a log file (``$AGENTTUNING_LOG_DIR`` or ``outputs/logs``): third-party
chatter (Ray, Serve per-request lines, transformers) and the tracebacks behind an agent's bad SQL or
shell command, which are episode events, not errors of the job. Ray workers' and Serve replicas'
own logs stay in Ray's session folder (``ray_session`` starts Ray with ``log_to_driver=False``)
and the job prints that folder once.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable, Optional

OWN = ("agenttuning", "pipelines", "serve", "__main__")  # loggers whose INFO lines a person reads
_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_state: dict = {}


# Library warnings that say nothing a user of a job can act on (still in the log file).
BENIGN = (
    "Token authentication is enabled for this Ray cluster",  # every local Ray start (2.5x+)
    "Found multiple active Ray instances",  # Train's placement-group cleaner on shared test hosts
)


class _ConsoleFilter(logging.Filter):
    """INFO from our own loggers, WARNING+ from anyone; never a traceback (the file has it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in OWN
        if not own and any(b in record.getMessage() for b in BENIGN):
            return False
        return record.levelno >= logging.WARNING or (own and record.levelno >= logging.INFO)


class _OneLine(logging.Formatter):
    def __init__(self, log_path: Optional[str]) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        self.log_path = log_path

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None  # type: ignore[assignment]
        try:
            line = super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        if saved[0] and self.log_path:
            line += f" (details: {self.log_path})"
        return line


class _TqdmStream:
    """Console writes go through tqdm.write so log lines do not tear progress bars."""

    def write(self, msg: str) -> None:
        from tqdm import tqdm

        msg = msg.rstrip("\n")
        if msg:
            tqdm.write(msg, file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


def log_path() -> Optional[str]:
    """The current job's log file (None before setup_logging)."""
    return _state.get("path")


def setup_logging(job: str, log_dir: Optional[str] = None) -> str:
    """Console + file logging for ``job``; returns the log file path. Idempotent per process."""
    if "path" in _state:
        return _state["path"]
    level = os.environ.get("AGENTTUNING_LOG_LEVEL", "INFO").upper()
    # Ray Data re-reads its logging config at every execution: point it at ours (no console handler).
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG",
                          os.path.join(os.path.dirname(__file__), "assets", "ray_data_logging.yaml"))
    log_dir = log_dir or os.environ.get("AGENTTUNING_LOG_DIR") or os.path.join("outputs", "logs")
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.abspath(os.path.join(log_dir, f"{job}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"))
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if level == "DEBUG" else logging.INFO)
    for h in list(root.handlers):  # a job owns the root logger (basicConfig leftovers go)
        root.removeHandler(h)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FMT))
    console = logging.StreamHandler(_TqdmStream())
    console.addFilter(_ConsoleFilter())
    console.setFormatter(_OneLine(path))
    if level == "DEBUG":  # AGENTTUNING_LOG_LEVEL=DEBUG: everything on the console, tracebacks too
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(_FMT))
    root.addHandler(file_handler)
    root.addHandler(console)
    logging.captureWarnings(True)
    _state["path"] = path
    route_library_logs()
    logging.getLogger("agenttuning").info("%s: log file %s", job, path)
    return path


LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "deepspeed", "transformers",
                   "datasets", "py.warnings")


def route_library_logs() -> None:
    """Libraries that install their own console handlers (Ray, Ray Data on import, DeepSpeed) log
    through ours instead: their INFO to the file, their warnings to the console as one line.
    Call again after importing such a library; a no-op before setup_logging."""
    if "path" not in _state:
        return
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)


def progress(iterable: Optional[Iterable[Any]] = None, *, total: Optional[int] = None, desc: str = "",
             unit: str = "it", initial: int = 0) -> Any:
    """A tqdm bar on stderr with counts, rate and ETA (disabled when stderr is not a terminal and
    AGENTTUNING_PROGRESS=0)."""
    from tqdm.auto import tqdm

    disable = os.environ.get("AGENTTUNING_PROGRESS", "1") == "0"
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable,
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
