"""Where the Skip-Cache's time goes: LitGPT LoRA against Skip2-LoRA with each cache placement, end to end.

Builds a random-weight checkpoint of a LitGPT config (vocabulary optionally shrunk, so that the head is cheap and
the cache's I/O shows) with a word-level tokenizer, and a JSON data set of random sentences of ``--tokens`` words,
every token supervised. Then runs ``finetune_lora`` and ``finetune_skip2lora`` once per placement, each in its own
process (``side-disk``: a side network of width ``n_embd / 8`` reading every second block), and reports from their
``metrics.csv`` the median ``iter_time`` of the first epoch and of the later (cached) ones, the median
``feature_wait`` and the summed training time against LoRA's::

    python experiments/cache_placement.py --model SmolLM2-135M-Instruct --vocab 512 --blocks all --samples 96
    python experiments/cache_placement.py --model Llama-3.2-1B --blocks 0,4,8,12 --samples 304 --tokens 330
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import litgpt
import pandas as pd
import torch
from litgpt.utils import save_config
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

RUNS = {
    "lora": ["finetune_lora", "--lora_query", "true", "--lora_value", "true"],
    "skip2lora-disk": ["finetune_skip2lora", "--cache.placement", "disk"],
    "skip2lora-memory": ["finetune_skip2lora", "--cache.placement", "memory"],
    "skip2lora-device": ["finetune_skip2lora", "--cache.placement", "device"],
    "skip2lora-uncached": ["finetune_skip2lora", "--cache.enabled", "false"],
    "side-disk": ["finetune_skip2lora", "--cache.placement", "disk"],  # a side network reading every second block
}


def write_checkpoint(directory: Path, model: str, vocab: int | None, precision_dtype: torch.dtype) -> None:
    """Random weights in a LitGPT checkpoint folder, built on the GPU when there is one (seconds for 1B)."""
    config = litgpt.Config.from_name(model, **({"vocab_size": vocab, "padded_vocab_size": vocab} if vocab else {}))
    words = [f"w{i}" for i in range(config.vocab_size - 3)]
    tokenizer = Tokenizer(WordLevel({t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"})
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        weights = litgpt.model.GPT(config).to(precision_dtype).state_dict()
    torch.save(weights, directory / "lit_model.pth")
    save_config(config, directory)


def write_data(path: Path, samples: int, tokens: int, vocab: int) -> None:
    rng = random.Random(0)
    sentence = lambda n: " ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(n))  # noqa: E731
    items = [{"instruction": sentence(8), "input": "", "output": sentence(tokens)} for _ in range(samples)]
    path.write_text(json.dumps(items))


def summarise(metrics: Path, lora_time: float | None) -> dict:
    rows = pd.read_csv(metrics).dropna(subset=["loss"])
    first, later = rows[rows["epoch"] == rows["epoch"].min()], rows[rows["epoch"] > rows["epoch"].min()]
    result = {
        "epoch1_ms": 1000 * statistics.median(first["iter_time"]),
        "later_ms": 1000 * statistics.median(later["iter_time"]) if len(later) else None,
        "train_s": float(rows["iter_time"].sum()),
        "final_loss": float(rows["loss"].iloc[-1]),
    }
    if "feature_wait" in rows:
        result["later_wait_ms"] = 1000 * statistics.median(later["feature_wait"]) if len(later) else None
    result["time_vs_lora"] = result["train_s"] / lora_time if lora_time else 1.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--vocab", type=int, help="shrink the vocabulary to this size")
    parser.add_argument("--blocks", default="all", help="'all' or comma-separated block indices")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--tokens", type=int, default=300, help="words per sample (max_seq_length cuts at --seq-len)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="bf16-true" if torch.cuda.is_available() else "32-true")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--work", type=Path, default=Path("out/cache_placement"))
    args = parser.parse_args()

    checkpoint, data = args.work / "checkpoint", args.work / "data.json"
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    write_checkpoint(checkpoint, args.model, args.vocab, dtype)
    n_layer = litgpt.Config.from_file(checkpoint / "model_config.yaml").n_layer
    vocab = litgpt.Config.from_file(checkpoint / "model_config.yaml").vocab_size
    write_data(data, args.samples + 8, args.tokens, vocab)
    blocks = list(range(n_layer)) if args.blocks == "all" else [int(b) for b in args.blocks.split(",")]
    config = litgpt.Config.from_file(checkpoint / "model_config.yaml")
    side_width = -(-config.n_embd // 8 // config.head_size) * config.head_size  # n_embd / 8 in whole heads
    side = [
        "--skip2lora_side_width",
        str(side_width),
        "--skip2lora_block_indices",
        json.dumps(list(range(0, n_layer, 2))),
    ]
    common = [
        str(checkpoint.resolve()),
        "--precision",
        args.precision,
        "--data",
        "JSON",
        "--data.json_path",
        str(data),
        "--data.val_split_fraction",
        str(8 / (args.samples + 8)),
        "--train.epochs",
        str(args.epochs),
        "--train.micro_batch_size",
        str(args.batch_size),
        "--train.global_batch_size",
        str(args.batch_size),
        "--train.max_seq_length",
        str(args.seq_len),
        "--train.lr_warmup_steps",
        "1",
        "--train.save_interval",
        "100000",
        "--eval.interval",
        "100000",
        "--eval.max_new_tokens",
        "2",
        "--eval.max_iters",
        "1",
        "--lora_r",
        "8",
    ]
    results, lora_time = {}, None
    for name in args.runs.split(","):
        out = args.work / name
        extra = (
            []
            if name == "lora"
            else side
            if name.startswith("side")
            else ["--skip2lora_block_indices", json.dumps(blocks)]
        )
        command = [sys.executable, "-m", "litgpt_skip2lora", *RUNS[name][:1], *common, *RUNS[name][1:], *extra]
        t0 = time.perf_counter()
        done = subprocess.run([*command, "--out_dir", str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name} failed:\n{done.stderr[-3000:]}", flush=True)
            continue
        placement = [line for line in done.stdout.splitlines() if line.startswith("Skip-Cache:")]
        results[name] = summarise(sorted(out.glob("logs/csv/version_*/metrics.csv"))[-1], lora_time)
        results[name].update(wall_s=time.perf_counter() - t0, cache=placement[0] if placement else None)
        lora_time = lora_time or (results[name]["train_s"] if name == "lora" else None)
        print(name, json.dumps(results[name]), flush=True)
    print(f"\n{'run':<20}{'epoch 1 ms/iter':>16}{'later ms/iter':>15}{'wait ms':>9}{'train s':>9}{'vs LoRA':>9}")
    for name, r in results.items():
        later = "-" if r["later_ms"] is None else f"{r['later_ms']:.1f}"
        wait = f"{r['later_wait_ms']:.1f}" if r.get("later_wait_ms") is not None else "-"
        print(f"{name:<20}{r['epoch1_ms']:>16.1f}{later:>15}{wait:>9}{r['train_s']:>9.1f}{r['time_vs_lora']:>9.2f}")
    (args.work / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
