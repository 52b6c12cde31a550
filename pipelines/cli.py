"""`agenttuning <job> CONFIG [dotted.key=value ...]` — the same as `python -m pipelines.<job>`."""

import importlib
import logging
import os
import sys
from typing import List, Optional

from pipelines.config import ConfigError, load_config

# job name → module; each module has `main(cfg)` and may have `cli(argv)` for sub-commands.
JOBS = {
    "data": "pipelines.data",
    "train": "pipelines.train",
    "collect": "pipelines.collect",
    "eval": "pipelines.evaluate",
    "general": "pipelines.general",  # offline general train/eval data (configs/general_data.yaml)
    "run": "pipelines.run",
    "serve": "serve.app",
    "envs": "serve.env_server",  # environment server (configs/envs.yaml)
    "eft": "serve.eft",
    "build-model": "pipelines.tiny",
}

USAGE = (
    "usage: agenttuning <job> CONFIG [dotted.key=value ...]\n"
    "       agenttuning data preview CONFIG [key=value ...]\n"
    f"jobs: {', '.join(JOBS)}"
)


def setup_logging() -> None:
    level = os.environ.get("AGENTTUNING_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_job(module_name: str, argv: List[str]) -> int:
    """Load CONFIG + overrides and call the module's main(cfg); config errors exit with code 2."""
    setup_logging()
    module = importlib.import_module(module_name)
    if hasattr(module, "cli"):
        return int(module.cli(argv) or 0)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m {module_name} CONFIG [dotted.key=value ...]")
        return 0 if argv else 2
    try:
        # Jobs raise ConfigError too, for what only they can check before work (paths, data sizes).
        module.main(load_config(argv[0], argv[1:]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    sys.exit(run_job(JOBS[argv[0]], argv[1:]))


if __name__ == "__main__":
    main()
