"""Where the project's benchmark data lives: ``$AGENTTUNING_DATA_DIR``, else the repo's ``data/``.

Configs name shipped files as ``${data:agentbench/dbbench_dev.jsonl}`` (an OmegaConf resolver
registered by ``agenttuning.config``), environments default to them through :func:`data_file`,
so no path depends on the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

ENV_VAR = "AGENTTUNING_DATA_DIR"
# The source checkout's data folder (editable installs, `ray job submit --working-dir .`, Docker).
REPO_DATA = Path(__file__).resolve().parents[1] / "data"


class DataFileMissing(FileNotFoundError):
    """A shipped data file is absent; the message names where it was looked for and the fix."""


def data_roots() -> List[Path]:
    """Folders searched in order: $AGENTTUNING_DATA_DIR, the checkout's data/, ./data."""
    roots = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    return roots + [REPO_DATA, Path.cwd() / "data"]


def data_file(relpath: str) -> str:
    """Absolute path of ``relpath`` under the first data root that has it."""
    for root in data_roots():
        if (root / relpath).exists():
            return str((root / relpath).resolve())
    where = ", ".join(str(r) for r in dict.fromkeys(data_roots()))
    hint = ("; it is optional data: fetch it with `agenttuning fetch-data` (see data/README.md)"
            if relpath.startswith("alfworld/json_2.1.1/train") else "")
    raise DataFileMissing(f"data file {relpath} not found under {where} "
                          f"(set ${ENV_VAR} to a folder that holds it, or pass the path){hint}")
