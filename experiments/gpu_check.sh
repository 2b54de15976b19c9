#!/usr/bin/env bash
# What a lent GPU checks (EVALUATION_GUIDE.md §3): wheels from .whl, then (1) the tests whose GPU paths CI cannot
# run (the `device` placement, pinned collation, non-blocking copies, CUDA RNG in checkpoints, KV caches); (2) the
# Llama-2-7B benchmark: LoRA against the 4-block adapters cached in GPU memory with the factored and the plain head,
# and the side network uncached, cached in GPU memory and on disk.
# MODEL and N_LAYER shrink it for a CPU rehearsal.
set -uo pipefail
OUT=${OUT:-out/gpu-check}
source experiments/gpu_setup.sh
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_cache.py tests/test_model.py tests/test_side.py \
  2>&1 | tee "$OUT/tests.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_finetune.py \
  -k "every_placement or cached_epochs or resume or signal or sigkill" 2>&1 | tee -a "$OUT/tests.log"
layers=${N_LAYER:+--n-layer $N_LAYER}
timeout 300 python3 benchmark_skip2lora.py --model "${MODEL:-Llama-2-7b-hf}" $layers --batch-size 4 --seq-len 512 \
  --repeats 5 --warmup 2 --blocks 4 --configs skip2-4-cached,skip2-4-cached-plain-head,side,side-cached,side-disk \
  --out "$OUT" 2>&1 | tee "$OUT/benchmark.log"
exit 0
