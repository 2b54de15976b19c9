#!/usr/bin/env bash
# The GPU figures in one invocation on a lent GPU: (1) benchmarks/end_to_end.py on a random-weight Llama-3.2-1B
# shape, 5,000 samples of about 300 tokens; (2) on the same shape, a faithful sweep of 16 configurations (4 learning
# rates x 4 ranks) beside its solo run; (3) the peak GPU memory of a real `finetune_skip2lora` run of a random-weight
# Llama-2-7B with --quantize bnb.nf4, as nvidia-smi sees it (reserved memory and the CUDA context included).
# EPOCHS, LORA_RUNS, SAMPLES, MODEL_1B and MODEL_7B shrink it for a rehearsal.
set -uo pipefail
OUT=${OUT:-out/gpu-end-to-end}
source benchmarks/gpu/setup.sh
timeout "${E2E_TIMEOUT:-420}" python3 -m benchmarks.end_to_end --random-model "${MODEL_1B:-Llama-3.2-1B}" \
  --samples "${SAMPLES:-5000}" --tokens 300 --epochs ${EPOCHS:-1 3 10} --lora-runs "${LORA_RUNS:-2}" \
  --work /tmp/e2e --out "$OUT" 2>&1 | tee "$OUT/end_to_end.log"
timeout "${SWEEP_TIMEOUT:-240}" python3 -m benchmarks.end_to_end --random-model "${MODEL_1B:-Llama-3.2-1B}" \
  --samples "${SAMPLES:-5000}" --tokens 300 --epochs 3 --methods faithful \
  --sweep 'lr=[0.0003,0.001,0.003,0.01]' --sweep 'lora_r=[4,8,16,32]' \
  --work /tmp/e2e_sweep --out "$OUT" 2>&1 | tee "$OUT/sweep.log"
python3 - <<PY
from pathlib import Path
import torch
from benchmarks.random_checkpoint import model_config, write_checkpoint, write_sentences
words = [f"w{i}" for i in range(32000 - 3)]
dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
write_checkpoint(Path("/tmp/nf4/ckpt"), model_config("${MODEL_7B:-Llama-2-7b-hf}", 32000), words, dtype)
write_sentences(Path("/tmp/nf4/data.json"), 200, 300, words)
PY
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/nf4_memory_mib.csv" &
sampler=$!
timeout 240 python3 -m litgpt_skip2lora finetune_skip2lora /tmp/nf4/ckpt --quantize bnb.nf4 --precision bf16-true \
  --data JSON --data.json_path /tmp/nf4/data.json --data.val_split_fraction 0.1 --train.epochs 2 \
  --train.micro_batch_size 4 --train.global_batch_size 4 --train.max_seq_length 512 --eval.max_new_tokens 2 \
  --out_dir /tmp/nf4/out 2>&1 | grep -vE "it/s|s/it" | tee "$OUT/nf4_finetune.log"
kill $sampler
echo "peak GPU memory used during the nf4 run: $(sort -n "$OUT/nf4_memory_mib.csv" | tail -1) MiB" | tee -a "$OUT/nf4_finetune.log"
exit 0
