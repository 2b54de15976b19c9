"""Benchmark Skip2-LoRA training steps against LitGPT's own LoRA: time per step and peak memory.

The entry users know; the benchmark itself is ``benchmarks/step.py`` (``python benchmark_skip2lora.py --help``).
"""

from benchmarks.step import main

if __name__ == "__main__":
    main()
