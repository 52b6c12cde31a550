"""`agenttuning <job> CONFIG [dotted.key=value ...]` — the same as `python -m <module of the job>`.

`agenttuning <job> --help` lists what the job does and every config key it reads, with defaults;
`agenttuning <job> CONFIG [overrides] --print-config` prints the resolved config and exits.
"""

import sys
from typing import List, Optional

from agenttuning.cli import run_job

# job name → module; each module has `main(cfg)` and may have `cli(argv)` for sub-commands.
JOBS = {
    "run": "pipelines.run",  # every stage end to end (the quickstart)
    "sweep": "pipelines.sweep",  # Ray Tune sweep over config keys: data → train → eval per trial, results table
    "collect": "pipelines.collect",  # AgentInstruct construction
    "general": "pipelines.general",  # offline general train/eval data
    "data": "pipelines.data",  # the η-mixed, packed dataset (Ray Data)
    "train": "pipelines.train",  # Ray Train + DeepSpeed fine-tuning
    "eval": "pipelines.evaluate",  # evaluation suites through Ray Serve; report
    "serve": "serve.app",  # OpenAI-compatible model server
    "envs": "serve.env_server",  # environment server (HTTP API for outside agents)
    "eft": "serve.eft",  # EFT / up-scaling server
    "build-model": "agenttuning.models",  # model.name_or_path from model.gguf or model.tiny
}
# Commands that take their own arguments instead of CONFIG (module with `cli(argv) -> int`).
COMMANDS = {
    "fetch-data": "pipelines.fetch_data",  # optional data too large to ship (ALFWorld training games)
}


def usage() -> str:
    import importlib.util

    lines = ["usage: agenttuning <job> CONFIG [dotted.key=value ...] [--print-config]",
             "       agenttuning <job> --help      (what the job does, its config keys and defaults)",
             "       agenttuning data preview CONFIG [key=value ...]", "", "jobs:"]
    src = open(importlib.util.find_spec(__name__).origin, encoding="utf-8").read()  # the comments above
    for job, module in {**JOBS, **COMMANDS}.items():
        note = next((ln.split("#", 1)[1].strip() for ln in src.splitlines()
                     if ln.strip().startswith(f'"{job}":') and "#" in ln), "")
        lines.append(f"  {job:<12} {note}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    if argv[0] in COMMANDS:
        import importlib

        sys.exit(importlib.import_module(COMMANDS[argv[0]]).cli(argv[1:]))
    if argv[0] not in JOBS:
        print(f"error: unknown job {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    sys.exit(run_job(JOBS[argv[0]], argv[1:]))


if __name__ == "__main__":
    main()
