"""Whole fine-tuning runs, LitGPT's LoRA against Skip2-LoRA: the time a user waits, from process start to ``final/``.

Each run is a fresh process of the command users run, ``litgpt-skip2lora finetune_lora|finetune_skip2lora --config
<yaml>``, with the same data, seed and batch for every method, timed from just before the process starts until its
``final/lit_model.pth`` is written (``wall_s``; ``exit_s`` until the process ends). ``train_s`` is the synchronized
training time the run itself logs, validation and checkpoints left out in both: for LoRA the sum of LitGPT's
per-iteration ``iter_time`` (taken after ``loss.item()``), for Skip2-LoRA the epochs in its wall-clock breakdown.
``epoch1_s`` is the first epoch's share of it. Ratios are against the median of the LoRA runs with the same number
of epochs, in the same invocation.

Writes ``<out>/end_to_end-<UTC timestamp>.json`` (a list of rows) and a plot of wall time against epochs::

    # CPU, the real SmolLM2-135M-Instruct and WordNet, the demo's setting
    python -m benchmarks.end_to_end --methods lora faithful --epochs 3 \\
        --set data.init_args.num_train=600 --set data.init_args.num_val=100
    # GPU, random weights of the Llama-3.2-1B shape, 5,000 samples of about 300 tokens
    python -m benchmarks.end_to_end --random-model Llama-3.2-1B --samples 5000 --tokens 300 --epochs 1 3 10
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import yaml

from benchmarks.random_checkpoint import model_config, write_checkpoint, write_sentences
from litgpt_skip2lora.model import spaced_blocks

REPO = Path(__file__).resolve().parents[1]
METHODS = {  # name: (subcommand, the YAML users run, under --configs)
    "lora": ("finetune_lora", "lora_baseline.yaml"),
    "faithful": ("finetune_skip2lora", "skip2lora.yaml"),
    "tail": ("finetune_skip2lora", "skip2lora_tail.yaml"),
}
VAL_FRACTION = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 3, 10])
    parser.add_argument("--lora-runs", type=int, default=2, help="LoRA runs per epoch count, to show its spread")
    parser.add_argument("--configs", type=Path, default=REPO / "config_hub/finetune/SmolLM2-135M-Instruct")
    parser.add_argument(
        "--set", action="append", default=[], metavar="[METHOD:]KEY=VALUE", help="a YAML override, e.g. train.epochs=1"
    )
    parser.add_argument("--random-model", help="a LitGPT config name: random weights and random sentences")
    parser.add_argument("--n-layer", type=int, help="with --random-model: this many blocks")
    parser.add_argument("--vocab", type=int, default=32000, help="with --random-model: vocabulary size")
    parser.add_argument("--samples", type=int, default=5000, help="with --random-model: samples, 5%% for validation")
    parser.add_argument("--tokens", type=int, default=300, help="with --random-model: words per sample")
    parser.add_argument("--work", type=Path, default=REPO / "out/end_to_end")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_results")
    return parser.parse_args(argv)


def method_configs(args: argparse.Namespace) -> dict[str, Path]:
    """Each method's YAML with the overrides applied (and, for a random model, its checkpoint and data), written
    under ``args.work``."""
    shared = random_model_overrides(args) if args.random_model else {}
    n_layer = model_config(args.random_model, args.vocab, args.n_layer).n_layer if args.random_model else None
    paths = {}
    for name in args.methods:
        config = yaml.safe_load((args.configs / METHODS[name][1]).read_text())
        overrides = {**shared, **(block_overrides(name, n_layer) if n_layer else {})}
        for item in args.set:  # KEY=VALUE for every method, METHOD:KEY=VALUE for one
            key, _, value = item.partition("=")
            method, _, key = key.rpartition(":")
            if method in ("", name):
                overrides[key] = yaml.safe_load(value)
        for key, value in overrides.items():
            set_key(config, key, value)
        paths[name] = args.work / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(config))
    return paths


def random_model_overrides(args: argparse.Namespace) -> dict:
    """A random checkpoint of ``--random-model`` and JSON data in its words, made once per work folder."""
    words = [f"w{i}" for i in range(args.vocab - 3)]
    config = model_config(args.random_model, args.vocab, args.n_layer)
    checkpoint = args.work / "checkpoint"
    if not (checkpoint / "lit_model.pth").is_file():
        write_checkpoint(checkpoint, config, words, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    data = write_sentences(args.work / "data.json", args.samples, args.tokens, words)
    return {
        "checkpoint_dir": str(checkpoint),
        "precision": "bf16-true" if torch.cuda.is_available() else "32-true",
        "data": {
            "class_path": "litgpt.data.JSON",
            "init_args": {"json_path": str(data), "val_split_fraction": VAL_FRACTION},
        },
        "train.max_seq_length": args.tokens + 64,
    }


def block_overrides(name: str, n_layer: int) -> dict:
    """The YAMLs name blocks of SmolLM2's 30: the same design for ``n_layer`` blocks (four spaced blocks; the tail's
    last four blocks train)."""
    if name == "faithful":
        return {"skip2lora_block_indices": spaced_blocks(4, n_layer)}
    if name == "tail":
        start = max(1, n_layer - 4)
        return {
            "skip2lora_block_indices": sorted({*spaced_blocks(4, start), start}),
            "skip2lora_output_layer": f"block.{start}",
        }
    return {}


def set_key(config: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[last] = value


def train_samples(config_path: Path) -> int:
    """How many training samples the YAML's data module yields (WordNetInstruct's ``num_train``, or a JSON file's
    share after the validation split)."""
    data = yaml.safe_load(config_path.read_text())["data"]["init_args"]
    if "num_train" in data:
        return data["num_train"]
    total = len(json.loads(Path(data["json_path"]).read_text()))
    return total - int(total * data["val_split_fraction"])


def timed_run(command: str, config: Path, epochs: int, out_dir: Path) -> dict:
    """One fresh process, its wall time and what its own log says of its training time."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    args = [sys.executable, "-m", "litgpt_skip2lora", command, "--config", str(config)]
    args += ["--train.epochs", str(epochs), "--train.log_interval", "1", "--out_dir", str(out_dir)]
    start = time.time()
    with open(out_dir / "output.log", "w") as log:
        done = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    exit_s = time.time() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed (exit {done.returncode}); see {out_dir / 'output.log'}")
    metrics = pd.read_csv(sorted(out_dir.glob("logs/csv/version_*/metrics.csv"))[-1])
    row = {"wall_s": (out_dir / "final" / "lit_model.pth").stat().st_mtime - start, "exit_s": exit_s}
    row["val_loss"] = float(metrics["val_loss"].dropna().iloc[-1])
    if command == "finetune_lora":
        steps = metrics.dropna(subset=["iter_time"])
        row["train_s"] = float(steps["iter_time"].sum())
        row["epoch1_s"] = float(steps.loc[steps["epoch"] == steps["epoch"].min(), "iter_time"].sum())
    else:
        wall = metrics.filter(like="wall_").ffill().iloc[-1]
        row["breakdown"] = {k.removeprefix("wall_"): round(float(v), 3) for k, v in wall.items()}
        row["train_s"] = float(wall["wall_epoch_1"] + wall["wall_later_epochs"])
        row["epoch1_s"] = float(wall["wall_epoch_1"])
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each row's times over the median LoRA run's with the same number of epochs."""
    for row in rows:
        lora = [r for r in rows if r["method"] == "lora" and r["epochs"] == row["epochs"]]
        for figure in ("wall_s", "train_s", "epoch1_s"):
            if lora:
                row[f"{figure[:-2]}_vs_lora"] = round(row[figure] / statistics.median(r[figure] for r in lora), 4)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        epochs = sorted({r["epochs"] for r in mine})
        medians = [statistics.median(r["wall_s"] for r in mine if r["epochs"] == e) for e in epochs]
        line = ax.plot(epochs, medians, marker="o", label=method)[0]
        ax.scatter([r["epochs"] for r in mine], [r["wall_s"] for r in mine], color=line.get_color(), s=12)
    ax.set(xlabel="epochs", ylabel="wall time, process start to final/ (s)", title=rows[0]["model"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    configs = method_configs(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    model = args.random_model or yaml.safe_load(configs[args.methods[0]].read_text())["checkpoint_dir"]
    rows = []
    for epochs in args.epochs:
        for method in args.methods:
            for run in range(args.lora_runs if method == "lora" else 1):
                out_dir = args.work / f"{method}-{epochs}ep-{run}"
                row = {"method": method, "run": run, "epochs": epochs, "samples": train_samples(configs[method])}
                row.update(timed_run(METHODS[method][0], configs[method], epochs, out_dir), device=device, model=model)
                print(json.dumps(row), flush=True)
                rows.append(row)
    add_ratios(rows)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"end_to_end-{stamp}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, path.with_suffix(".png"))
    for row in rows:
        ratios = " ".join(f"{k}={row[k]}" for k in ("wall_vs_lora", "train_vs_lora", "epoch1_vs_lora") if k in row)
        times = f"wall {row['wall_s']:8.1f} s, train {row['train_s']:8.1f} s"
        print(f"{row['method']:>9} {row['epochs']:>3} epochs: {times}  {ratios}")
    print(f"Wrote {path} and {path.with_suffix('.png').name}")
    return path


if __name__ == "__main__":
    main()
