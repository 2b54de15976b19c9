#!/usr/bin/env bash
# The GPU measurements of the cache and 4-bit issues, as one script for a lent machine (EVALUATION_GUIDE.md):
# wheels from .whl (litgpt and the few packages the machine lacks), then (1) the end-to-end placement table on a
# random checkpoint shaped like Llama-3.2-1B, (2) the Llama-2-7B benchmark with its cache rows, (3) the same in
# nf4 beside LitGPT's QLoRA, (4) finetune_skip2lora --quantize bnb.nf4 end to end and generation from its result.
set -uo pipefail
OUT=${OUT:-out/gpu}
source experiments/gpu_setup.sh
bench="python3 benchmark_skip2lora.py --model Llama-2-7b-hf --precision bf16-true --batch-size 4 --seq-len 512 --repeats 5 --warmup 2"

timeout 270 python3 experiments/cache_placement.py --model Llama-3.2-1B --blocks 0,4,8,12 --samples 304 \
  --tokens 300 --seq-len 512 --work /tmp/cache_gpu \
  --runs lora,skip2lora-disk,skip2lora-uncached,skip2lora-memory,skip2lora-device 2>&1 | tee "$OUT/cache_placement.log"
cp /tmp/cache_gpu/results.json "$OUT/cache_placement.json"

timeout 140 $bench --blocks 4 --configs skip2-4,skip2-4-cached,skip2-4-memory,skip2-4-disk,skip2-4-disk-cold \
  --out /tmp/bench 2>&1 | tee "$OUT/benchmark.log"
timeout 80 $bench --blocks 4 --quantize bnb.nf4 --configs skip2-4,skip2-4-cached --out /tmp/bench-nf4 2>&1 \
  | tee "$OUT/benchmark-nf4.log"
cp /tmp/bench/benchmark-*.json "$OUT/benchmark-bf16.json"; cp /tmp/bench-nf4/benchmark-*.json "$OUT/benchmark-nf4.json"

ckpt=/tmp/cache_gpu/checkpoint
timeout 50 python3 -m litgpt_skip2lora finetune_skip2lora "$ckpt" --quantize bnb.nf4 --precision bf16-true \
  --skip2lora_block_indices '[0,4,8,12]' --data JSON --data.json_path /tmp/cache_gpu/data.json \
  --data.val_split_fraction 0.1 --train.epochs 1 --train.micro_batch_size 8 --train.global_batch_size 8 \
  --train.max_seq_length 512 --train.lr_warmup_steps 1 --eval.max_new_tokens 2 --eval.max_iters 2 \
  --out_dir /tmp/nf4 2>&1 | grep -v "^ " | tee "$OUT/finetune-nf4.log"
timeout 30 python3 -m litgpt_skip2lora generate /tmp/nf4/final --quantize bnb.nf4 --precision bf16-true \
  --max_new_tokens 5 --prompt "w1 w2 w3" 2>&1 | tail -5 | tee "$OUT/generate-nf4.log"
exit 0
