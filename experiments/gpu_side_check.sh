#!/usr/bin/env bash
# The side network on a lent GPU (EVALUATION_GUIDE.md): wheels from .whl, then (1) the Llama-2-7B benchmark, LoRA
# against the side network uncached, cached in GPU memory and on disk, with each cache's bytes per token, beside
# the 4-block adapters cached in GPU memory and in pinned host RAM; (2) end to end on a random checkpoint shaped
# like Llama-3.2-1B: LitGPT LoRA against the adapters and the side network, both with the disk cache, 3 epochs.
# MODEL, N_LAYER and SAMPLES shrink it for a CPU rehearsal.
set -uo pipefail
OUT=${OUT:-out/gpu-side}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
layers=${N_LAYER:+--n-layer $N_LAYER}
timeout 240 python3 benchmark_skip2lora.py --model "${MODEL:-Llama-2-7b-hf}" $layers --batch-size 4 --seq-len 512 \
  --repeats 5 --warmup 2 --blocks 4 --configs skip2-4-cached,skip2-4-memory,side,side-cached,side-disk \
  --out /tmp/bench-side 2>&1 | tee "$OUT/benchmark.log"
cp /tmp/bench-side/benchmark-*.json "$OUT/benchmark-side.json"
timeout 240 python3 experiments/cache_placement.py --model "${PLACEMENT_MODEL:-Llama-3.2-1B}" --blocks 0,4,8,12 \
  --samples "${SAMPLES:-304}" --tokens 300 --seq-len 512 --work /tmp/side_gpu \
  --runs lora,skip2lora-disk,side-disk 2>&1 | tee "$OUT/cache_placement.log"
cp /tmp/side_gpu/results.json "$OUT/cache_placement_side.json"
exit 0
