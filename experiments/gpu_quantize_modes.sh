#!/usr/bin/env bash
# Each further --quantize mode, trained and generated from, on a small random checkpoint (EVALUATION_GUIDE.md §7).
set -uo pipefail
OUT=${OUT:-out/gpu-quantize}
source experiments/gpu_setup.sh
python3 - <<'PY'
from pathlib import Path
import torch
from benchmarks.random_checkpoint import model_config, write_checkpoint, write_sentences
words = [f"w{i}" for i in range(509)]
write_checkpoint(Path("/tmp/q/ckpt"), model_config("pythia-160m", 512), words, torch.float16)
write_sentences(Path("/tmp/q/data.json"), 40, 60, words)
PY
for q in bnb.nf4-dq:bf16-true bnb.int8:16-true; do
  mode=${q%%:*}; prec=${q##*:}
  timeout 45 python3 -m litgpt_skip2lora finetune_skip2lora /tmp/q/ckpt --quantize $mode --precision $prec \
    --data JSON --data.json_path /tmp/q/data.json --data.val_split_fraction 0.2 --train.epochs 2 \
    --train.micro_batch_size 4 --train.global_batch_size 4 --train.lr_warmup_steps 1 --eval.max_new_tokens 2 \
    --out_dir /tmp/q/$mode 2>&1 | grep -E "Skip-Cache|^Epoch [0-9]:|Validation loss|Saved|rror" | tee "$OUT/$mode.log"
  timeout 25 python3 -m litgpt_skip2lora generate /tmp/q/$mode/final --quantize $mode --precision $prec \
    --max_new_tokens 3 --prompt "w1 w2" 2>&1 | tail -3 | tee -a "$OUT/$mode.log"
done
