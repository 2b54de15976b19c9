"""Whole fine-tuning runs, LitGPT's LoRA against Skip2-LoRA: the time a user waits, from process start to ``final/``.

Each run is a fresh process of the command users run, ``litgpt-skip2lora finetune_lora|finetune_skip2lora --config
<yaml>``, with the same data, seed and batch for every method, timed from just before the process starts until its
``final/lit_model.pth`` is written (``wall_s``; ``exit_s`` until the process ends). ``train_s`` is the synchronized
training time the run itself logs, validation and checkpoints left out in both: for LoRA the sum of LitGPT's
per-iteration ``iter_time`` (taken after ``loss.item()``), for Skip2-LoRA the epochs in its wall-clock breakdown.
``epoch1_s`` is the first epoch's share of it. Ratios are against the median of the LoRA runs with the same number
of epochs, in the same invocation.

``--sweep KEY=LIST`` adds, for each Skip2-LoRA method, a ``<method>-sweep`` row: the same YAML with that sweep, every
configuration trained in one process; ``--keep`` gives one such row per value of ``--sweep.keep`` (successive
halving below 1), recorded as the row's ``keep``. A sweep row's ``wall_vs_solo`` is its wall time over the solo
run's of the same method and epochs, and ``wall_vs_solo_runs`` over ``configurations`` times that solo run: the
configurations' solo runs one after another. ``--lora-lrs`` runs LoRA once per learning rate of a grid, as a LoRA
user sweeps; a sweep row then holds ``lora_grid_wall_s`` (the LoRA runs one after another), their best validation
loss and ``wall_vs_lora_grid``.

Writes ``<out>/end_to_end-<UTC timestamp>.json`` (a list of rows) and a bar plot of the wall times::

    # CPU, the real SmolLM2-135M-Instruct and WordNet, the demo's setting
    python -m benchmarks.end_to_end --methods lora faithful --epochs 3 \\
        --set data.init_args.num_train=600 --set data.init_args.num_val=100
    # the same with a sweep of 8 configurations beside the solo run
    python -m benchmarks.end_to_end --methods faithful --epochs 3 --set data.init_args.num_train=600 \
        --set data.init_args.num_val=100 --sweep lr=[0.0003,0.001,0.003,0.01] --sweep lora_r=[4,8]
    # GPU, random weights of the Llama-3.2-1B shape, 5,000 samples of about 300 tokens
    python -m benchmarks.end_to_end --random-model Llama-3.2-1B --samples 5000 --tokens 300 --epochs 1 3 10
"""

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import yaml

from benchmarks.random_checkpoint import model_config, write_checkpoint, write_sentences
from benchmarks.runs import logged_metrics, run_logged
from litgpt_skip2lora.model import default_blocks, default_precision

REPO = Path(__file__).resolve().parents[1]
METHODS = {  # name: (subcommand, the YAML users run, under --configs)
    "lora": ("finetune_lora", "lora_baseline.yaml"),
    "faithful": ("finetune_skip2lora", "skip2lora.yaml"),
    "tail": ("finetune_skip2lora", "skip2lora_tail.yaml"),
}
VAL_FRACTION = 0.05
RUNNER = "litgpt_skip2lora"
"""The module a run's command is given to (``python -m <runner> <command>``): the package's CLI."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="what to run")
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 3, 10], help="epoch counts, each a set of runs")
    parser.add_argument("--lora-runs", type=int, default=2, help="LoRA runs per epoch count, to show its spread")
    parser.add_argument(
        "--lora-lrs", nargs="+", type=float, help="LoRA's learning rates, one run each; unset: the YAML's"
    )
    parser.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=LIST", help="a Skip2-LoRA sweep row, e.g. lr=[0.001,0.003]"
    )
    parser.add_argument(
        "--keep", nargs="+", type=float, default=[1.0], help="a sweep row per value of --sweep.keep (halving below 1)"
    )
    parser.add_argument(
        "--configs", type=Path, default=REPO / "config_hub/finetune/SmolLM2-135M-Instruct", help="the methods' YAMLs"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="[METHOD:]KEY=VALUE", help="a YAML override, e.g. train.epochs=1"
    )
    parser.add_argument("--random-model", help="a LitGPT config name: random weights and random sentences")
    parser.add_argument("--n-layer", type=int, help="with --random-model: this many blocks")
    parser.add_argument("--vocab", type=int, default=32000, help="with --random-model: vocabulary size")
    parser.add_argument("--samples", type=int, default=5000, help="with --random-model: samples, 5%% for validation")
    parser.add_argument("--tokens", type=int, default=300, help="with --random-model: words per sample")
    parser.add_argument("--work", type=Path, default=REPO / "out/end_to_end", help="runs' folders (replaced)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_results", help="where the results go")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only derive a file's ratios, plot again")
    parser.add_argument("--task", help="with --replot: the task's name, for files that do not record it")
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
        "precision": default_precision(),
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
        return {"skip2lora_block_indices": default_blocks(n_layer)}
    if name == "tail":
        start = max(1, n_layer - 4)
        return {
            "skip2lora_block_indices": sorted({*default_blocks(start), start}),
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


def runs(args: argparse.Namespace) -> list[tuple[str, list[str], dict]]:
    """The runs of each epoch count: each row's method name, the options it adds to its YAML's and what the row
    records of them."""
    planned = []
    for method in args.methods:
        if method == "lora":
            lrs = [["--optimizer.lr", str(lr)] for lr in args.lora_lrs] if args.lora_lrs else [[]]
            planned += [("lora", lr, {}) for lr in lrs for _ in range(args.lora_runs)]
            continue
        planned.append((method, [], {}))
        if args.sweep:
            keys_and_lists = [item.partition("=") for item in args.sweep]
            options = [part for key, _, values in keys_and_lists for part in (f"--sweep.{key}", values)]
            planned += [(f"{method}-sweep", [*options, "--sweep.keep", str(k)], {"keep": k}) for k in args.keep]
    return planned


def handed_over_val_loss(log: str) -> float | None:
    """The validation loss of the step a Skip2-LoRA run hands over (its best, ``--sweep.best_step``), as it prints
    it; None for a run that hands over its last step (LitGPT's LoRA)."""
    handed = re.search(r"Handed over the parameters of step \d+, validation loss ([\d.]+)", log)
    return float(handed[1]) if handed else None


def timed_run(command: str, config: Path, epochs: int, out_dir: Path, options: list[str], runner: str = RUNNER) -> dict:
    """One fresh process of ``python -m <runner> <command>``, its wall time and what its own log says of its
    training time; ``val_loss`` is the handed-over model's (``last_val_loss`` the last validation's)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    args = [sys.executable, "-m", runner, command, "--config", str(config), *options]
    args += ["--train.epochs", str(epochs), "--train.log_interval", "1", "--out_dir", str(out_dir)]
    done = run_logged(args, out_dir / "output.log", cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed (exit {done.returncode}); see {out_dir / 'output.log'}")
    metrics = logged_metrics(out_dir)
    row = {"wall_s": (out_dir / "final" / "lit_model.pth").stat().st_mtime - done.started, "exit_s": done.seconds}
    row["last_val_loss"] = float(metrics.filter(regex="^val_loss").ffill().iloc[-1].min())
    row["val_loss"] = handed_over_val_loss((out_dir / "output.log").read_text()) or row["last_val_loss"]
    if (out_dir / "sweep.csv").is_file():
        table = pd.read_csv(out_dir / "sweep.csv")
        chosen = table[table["chosen"] == 1].iloc[0]
        row.update(configurations=len(table), chosen=chosen["name"], last_val_loss=float(chosen["val_loss"]))
        row["val_loss"] = float(chosen.get("best_val_loss", chosen["val_loss"]))
        row["sweep"] = table.to_dict(orient="records")
    if command == "finetune_lora":
        steps = metrics.dropna(subset=["iter_time"])
        row["train_s"] = float(steps["iter_time"].sum())
        row["epoch1_s"] = float(steps.loc[steps["epoch"] == steps["epoch"].min(), "iter_time"].sum())
        row["lr"] = yaml.safe_load((out_dir / "final" / "hyperparameters.yaml").read_text())["optimizer"]
    else:
        wall = metrics.filter(like="wall_").ffill().iloc[-1]
        row["breakdown"] = {k.removeprefix("wall_"): round(float(v), 3) for k, v in wall.items()}
        row["train_s"] = float(wall["wall_epoch_1"] + wall["wall_later_epochs"])
        row["epoch1_s"] = float(wall["wall_epoch_1"])
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each row's times over the median LoRA run's with the same number of epochs; a sweep's over its solo run's."""
    for row in rows:
        lora = [r for r in rows if r["method"] == "lora" and r["epochs"] == row["epochs"]]
        for figure in ("wall_s", "train_s", "epoch1_s"):
            if lora:
                row[f"{figure[:-2]}_vs_lora"] = round(row[figure] / statistics.median(r[figure] for r in lora), 4)
        solo = [r for r in rows if r["method"] == row["method"].removesuffix("-sweep") and r["epochs"] == row["epochs"]]
        if row["method"].endswith("-sweep") and solo:
            row["wall_vs_solo"] = round(row["wall_s"] / solo[0]["wall_s"], 4)
            row["wall_vs_solo_runs"] = round(row["wall_s"] / (row["configurations"] * solo[0]["wall_s"]), 4)
        grid = len({json.dumps(r["lr"], sort_keys=True) for r in lora}) == len(lora) > 0  # a run per learning rate
        if row["method"].endswith("-sweep") and grid:  # LoRA's grid, its runs one after another
            row["lora_grid_wall_s"] = round(sum(r["wall_s"] for r in lora), 1)
            row["lora_grid_best_val_loss"] = min(r["val_loss"] for r in lora)
            row["wall_vs_lora_grid"] = round(row["wall_s"] / row["lora_grid_wall_s"], 4)


def label(row: dict) -> str:
    """A row's name in plots: the documents' names of the methods, LoRA's learning rate where a grid sets it."""
    names = {"lora": "LoRA", "faithful": "faithful", "tail": "4-block tail"}
    name = names[row["method"].removesuffix("-sweep")]
    if row["method"].endswith("-sweep"):
        halving = f", keep {row['keep']:g}" if row.get("keep", 1) < 1 else ""
        return f"{name} sweep\n({row['configurations']} configurations{halving})"
    lr = row.get("lr", {}).get("init_args", {}).get("lr")
    return f"{name}\nlr {lr:g}" if lr else name


def plot(rows: list[dict], task: str, path: Path) -> None:
    """Wall time of each run as a bar, grouped by epoch count, each annotated with its ratio to LoRA (and a sweep's
    to its solo run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    bars = ax.bar(range(len(rows)), [r["wall_s"] for r in rows], color=[COLORS[r["method"]] for r in rows])
    for bar, row in zip(bars, rows):
        notes = [f"{row['wall_vs_lora']:.2f}x LoRA" if "wall_vs_lora" in row else ""]
        notes.append(f"{row['wall_vs_solo']:.2f}x solo" if "wall_vs_solo" in row else "")
        text = "\n".join(n for n in notes if n)
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{label(r)}\n{r['epochs']} ep" for r in rows], fontsize=8)
    ax.set_ylabel("wall time, process start to final/ (s)")
    ax.set_ylim(0, 1.2 * max(r["wall_s"] for r in rows))
    setting = f"{rows[0]['samples']} training samples, {Path(rows[0]['model']).name}, {rows[0]['device']}"
    ax.set_title(f"{task}\n{setting}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLORS = {"lora": "tab:gray", "faithful": "tab:blue", "faithful-sweep": "tab:cyan", "tail": "tab:orange"}
COLORS["tail-sweep"] = "tab:red"


def task_name(config: Path, args: argparse.Namespace) -> str:
    """What the runs learn: WordNet's task, a JSON file's name, or the random model's sentences."""
    if args.random_model:
        return f"random sentences, {args.random_model} shape with random weights"
    data = yaml.safe_load(config.read_text())["data"]
    init = data.get("init_args", {})
    if "WordNet" in data["class_path"]:
        return {"words": "WordNet definitions", "supersense": "WordNet supersense labels"}[init.get("task", "words")]
    return Path(init.get("json_path", "data")).stem


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.replot:  # the ratios derived anew from the runs' raw times, and the plot
        rows = json.loads(args.replot.read_text())
        add_ratios(rows)
        args.replot.write_text(json.dumps(rows, indent=1) + "\n")
        plot(rows, rows[0].get("task") or args.task or "task not recorded", args.replot.with_suffix(".png"))
        return args.replot
    args.work.mkdir(parents=True, exist_ok=True)
    configs = method_configs(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    model = args.random_model or yaml.safe_load(configs[args.methods[0]].read_text())["checkpoint_dir"]
    rows, task = [], task_name(configs[args.methods[0]], args)
    for epochs in args.epochs:
        for run, (method, options, recorded) in enumerate(runs(args)):
            base = method.removesuffix("-sweep")
            out_dir = args.work / f"{method}-{epochs}ep-{run}"
            row = {"method": method, "run": run, "epochs": epochs, "samples": train_samples(configs[base])}
            row.update(recorded, task=task)
            row.update(timed_run(METHODS[base][0], configs[base], epochs, out_dir, options), device=device, model=model)
            print(json.dumps(row), flush=True)
            rows.append(row)
    add_ratios(rows)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"end_to_end-{stamp}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, task, path.with_suffix(".png"))
    for row in rows:
        keys = ("wall_vs_lora", "train_vs_lora", "epoch1_vs_lora", "wall_vs_solo", "wall_vs_solo_runs")
        ratios = " ".join(f"{k}={row[k]}" for k in keys if k in row)
        times = f"wall {row['wall_s']:8.1f} s, train {row['train_s']:8.1f} s"
        print(f"{row['method']:>14} {row['epochs']:>3} epochs: {times}, val {row['val_loss']:.4f}  {ratios}")
    print(f"Wrote {path} and {path.with_suffix('.png').name}")
    return path


if __name__ == "__main__":
    main()
