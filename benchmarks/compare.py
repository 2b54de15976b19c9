"""``python -m benchmarks.compare``: LitGPT's LoRA against Skip2-LoRA variants, same checkpoint, data, seed, budget.

Every variant trains in a fresh process, so its peak memory is its own, and its raw result is written as soon as it
finishes, so a crash loses nothing. The report is read back from each run's ``metrics.csv``, never estimated.
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import CLI

from benchmarks.runs import logged_metrics, run_logged

# The training commands a variant can name: the module run with ``python -m``, and what to add to its ``epoch``
# column to count epochs from 1: LitGPT logs ``CycleIterator.epoch``, which is 0 during the first pass;
# finetune_skip2lora logs ``epoch + 1``
TRAINERS = {"finetune_lora": ("litgpt", 1), "finetune_skip2lora": ("litgpt_skip2lora", 0)}

CURVES = {  # plot file: x axis, its label
    "val_loss_vs_step.png": ("step", "training iteration"),
    "val_loss_vs_time.png": ("train_time_s", "cumulative training time (s)"),
}
RATIOS = {"train_time_ratio": "train_time_s", "wall_time_ratio": "wall_time_s", "peak_rss_ratio": "peak_rss_mib"}

# runs the CLI in this very process and records its peak resident memory on the way out, even when it fails;
# a bare interpreter so that nothing but the CLI counts towards the peak
CHILD = """
import json, resource, runpy, sys
module, rss_file = sys.argv[1:3]
sys.argv = [module, *sys.argv[3:]]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    with open(rss_file, "w") as f:
        json.dump({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)
"""


def compare(
    variants: Path = Path("config_hub/compare/smollm2_variants.yaml"),
    out_dir: Path = Path("out/compare"),
    only: list[str] | None = None,
    extra_args: list[str] | None = None,
    rerun: bool = False,
) -> dict:
    """Fine-tune each variant in its own process, then tabulate and plot the measured figures.

    Args:
        variants: YAML with ``common_args`` (appended to every run) and ``variants``: name -> ``command``
            (``finetune_lora`` or ``finetune_skip2lora``), ``config``, ``args``, ``description``. The first variant
            run is the baseline for the ratios.
        out_dir: Each variant runs with ``--out_dir <out_dir>/<name>``; the comparison and plots are written here.
        only: Names of the variants to run; all of them by default.
        extra_args: Appended after ``common_args`` to every run, e.g. to point at other data or a checkpoint.
        rerun: Run a variant again even if its ``result.json`` exists with the same command.
    """
    spec = yaml.safe_load(variants.read_text())
    names = [name for name in spec["variants"] if only is None or name in only]
    if not names:
        raise ValueError(f"None of {only} is in {variants}: {list(spec['variants'])}")
    common = [*spec.get("common_args", []), *(extra_args or [])]
    runs = {name: run_variant(name, spec["variants"][name], common, out_dir / name, rerun) for name in names}
    for name, run in runs.items():
        run.update(summarize(out_dir / name, run))
    add_ratios(runs, runs[names[0]])
    title = describe(common_setup(runs))
    results = {
        "title": title,
        "variants_file": str(variants),
        "baseline": names[0],
        "common_args": common,
        "environment": environment(),
        "runs": runs,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison_results.json").write_text(json.dumps(results, indent=2))
    plot(runs, title, out_dir)
    print(markdown_table(runs, names[0]))
    return results


def run_variant(name: str, variant: dict, common: list[str], run_dir: Path, rerun: bool) -> dict:
    """Train one variant in a fresh process; its result lands in ``result.json`` the moment it exits."""
    module = TRAINERS[variant["command"]][0]
    config = ["--config", str(variant["config"])] if variant.get("config") else []
    argv = [variant["command"], *config, *variant.get("args", []), *common, "--out_dir", str(run_dir)]
    command = [sys.executable, "-m", module, *argv]
    result_file = run_dir / "result.json"
    if result_file.exists() and not rerun:
        result = json.loads(result_file.read_text())
        if result["command"] == command:
            print(f"{name}: kept the result in {result_file}")
            return result
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale Skip-Cache or CSV logger version would skew the run
    run_dir.mkdir(parents=True)
    print(f"{name}: {' '.join(argv)}", flush=True)
    child = [sys.executable, "-c", CHILD, module, str(run_dir / "peak_rss.json"), *argv]  # runs ``command``
    finished = run_logged(child, run_dir / "run.log")
    returncode, wall_time = finished.returncode, finished.seconds
    text = (run_dir / "run.log").read_text()
    trainable = re.search(r"Number of trainable parameters: ([\d,]+)", text)
    rss_file = run_dir / "peak_rss.json"
    result = {
        "name": name,
        "cli": variant["command"],
        "description": variant.get("description", ""),
        "command": command,
        "returncode": returncode,
        "wall_time_s": wall_time,
        "peak_rss_mib": json.loads(rss_file.read_text())["peak_rss_mib"] if rss_file.exists() else None,
        "trainable_params": int(trainable[1].replace(",", "")) if trainable else None,
        "log_tail": text[-3000:] if returncode else None,
    }
    result_file.write_text(json.dumps(result, indent=2))
    print(f"{name}: exit code {returncode} after {wall_time:.1f} s", flush=True)
    return result


def summarize(run_dir: Path, result: dict) -> dict:
    """The figures of one run, read back from its ``metrics.csv`` and ``final/hyperparameters.yaml``."""
    df = logged_metrics(run_dir)
    if result["returncode"] or df is None or "val_loss" not in df:
        status = f"failed (exit code {result['returncode']})" if result["returncode"] else "no val_loss logged"
        return {"status": status, "setup": None, "val_curve": [], "epoch_train_time_s": []}
    df["step"] = df["step"].cummax()  # rows are in logging order; LitGPT's final validation has no step: 0 here
    df["train_time_s"] = df["iter_time"].fillna(0).cumsum()
    val = df.dropna(subset=["val_loss"])
    curve = [{"step": int(r.step), "train_time_s": r.train_time_s, "val_loss": r.val_loss} for r in val.itertuples()]
    initial = curve[0]["val_loss"] if curve[0]["step"] == 0 else printed_initial_val_loss(run_dir / "run.log")
    if initial is not None and curve[0]["step"] != 0:
        curve.insert(0, {"step": 0, "train_time_s": 0.0, "val_loss": initial})
    iters = df.dropna(subset=["iter_time"])
    epochs = iters["epoch"].astype(int) + TRAINERS[result["cli"]][1]
    return {
        "status": "ok",
        "setup": yaml.safe_load((run_dir / "final" / "hyperparameters.yaml").read_text()),
        "initial_val_loss": initial,
        "final_val_loss": curve[-1]["val_loss"],
        "final_val_ppl": float(val["val_ppl"].iloc[-1]),
        "iterations": int(iters["iter"].max()),
        "iterations_logged": len(iters),  # fewer than ``iterations`` when train.log_interval > 1: time undercounted
        "epoch_train_time_s": iters["iter_time"].groupby(epochs).sum().tolist(),  # epoch 1 first
        "train_time_s": float(iters["iter_time"].sum()),
        "cache_mib": float(iters["cache_bytes"].max()) / 2**20 if "cache_bytes" in iters else None,
        "val_curve": curve,
    }


def printed_initial_val_loss(log_file: Path) -> float | None:
    """LitGPT's ``finetune_lora`` prints its validation before training (3 decimals) but does not log it."""
    match = re.search(r"loss train: \S+, val: ([\d.]+) \|", log_file.read_text())
    return float(match[1]) if match else None


def add_ratios(runs: dict[str, dict], baseline: dict) -> None:
    """Time and memory as multiples of the baseline's, validation loss as a difference from it."""
    for run in runs.values():
        ok = run["status"] == baseline["status"] == "ok"
        run.update({ratio: run[key] / baseline[key] if ok else None for ratio, key in RATIOS.items()})
        run["val_loss_diff"] = run["final_val_loss"] - baseline["final_val_loss"] if ok else None


def common_setup(runs: dict[str, dict]) -> dict:
    """The checkpoint, data, seed and budget every run was meant to share; warns when they do not."""
    setups = {
        name: {k: run["setup"].get(k) for k in ("checkpoint_dir", "data", "seed", "train")}
        for name, run in runs.items()
        if run["setup"]
    }
    first = next(iter(setups.values()), {})
    if any(setup != first for setup in setups.values()):
        print(f"Warning: the runs differ in checkpoint, data, seed or budget: {setups}", file=sys.stderr)
    return first


def describe(setup: dict) -> str:
    """A plot title: the model, the data and the budget."""
    if not setup:
        return "no successful run"
    data = setup["data"]["class_path"].rsplit(".", 1)[-1]
    num_train = setup["data"]["init_args"].get("num_train")
    return (
        f"{Path(setup['checkpoint_dir']).name} on {data}"
        + (f" ({num_train} training samples)" if num_train else "")
        + f", {setup['train']['epochs']} epochs"
    )


def environment() -> dict[str, Any]:
    """The machine and the versions a measurement ran with (``compare`` and ``benchmark_skip2lora.py``)."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "litgpt": version("litgpt"),
        "lightning": version("lightning"),
        "litgpt_skip2lora": _git_commit(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "torch_num_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def _git_commit() -> str | None:
    """The commit of this repository that ran (an uninstalled checkout has no package version to report)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    except OSError:  # no git
        return None
    return done.stdout.strip() or None


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo``: ``platform.processor()`` is often empty on Linux."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


LABELS = {"lora": "LoRA", "lora-lr1e-3": "LoRA, lr 1e-3", "skip2lora-4blocks": "faithful", "tail4": "4-block tail"}
"""The documents' names of the shipped variants, for the plots; another variant keeps its own name."""


def replot(results_dir: Path) -> None:
    """Draw a finished comparison's plots again from its ``comparison_results.json``."""
    results = json.loads((Path(results_dir) / "comparison_results.json").read_text())
    plot(results["runs"], results["title"], Path(results_dir))


def plot(runs: dict[str, dict], title: str, out_dir: Path) -> None:
    """``val_loss_vs_step.png``, ``val_loss_vs_time.png`` and ``time_and_memory.png`` in ``out_dir``, each
    variant under its documents' name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {name: run for name, run in runs.items() if run["status"] == "ok"}
    colors = plt.get_cmap("tab20").colors  # one color per variant, up to 20
    for png, (x, label) in CURVES.items():
        fig, ax = plt.subplots(figsize=(10, 6))
        for i, (name, run) in enumerate(ok.items()):
            xs, losses = zip(*[(p[x], p["val_loss"]) for p in run["val_curve"]])
            style = dict(marker="osD^v<>"[i % 7], color=colors[i % len(colors)], linewidth=3 if i == 0 else 1.5)
            ax.plot(xs, losses, label=LABELS.get(name, name), **style)
        ax.set(xlabel=label, ylabel="validation loss")
        ax.set_title(f"Validation loss: {title}", wrap=True, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / png, dpi=120)
        plt.close(fig)

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 5))
    names, bottom = list(ok), [0.0] * len(ok)
    for epoch in range(max(len(run["epoch_train_time_s"]) for run in ok.values())):
        times = [ok[name]["epoch_train_time_s"] for name in names]
        heights = [t[epoch] if epoch < len(t) else 0.0 for t in times]
        labels = [LABELS.get(name, name) for name in names]
        bars = ax_time.bar(labels, heights, bottom=bottom, label=f"epoch {epoch + 1}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_time.bar_label(bars, labels=[f"{total:.1f} s" for total in bottom])
    ax_time.set(ylabel="training time (s, sum of iter_time)", title="Training time")
    peaks = [ok[name]["peak_rss_mib"] for name in names]
    bars = ax_mem.bar([LABELS.get(name, name) for name in names], peaks, color="tab:gray", label="peak RSS")
    ax_mem.bar_label(bars, fmt="%.0f MiB")
    ax_mem.set(ylabel="peak resident memory of the process (MiB)", title="Peak memory")
    for ax in (ax_time, ax_mem):
        ax.legend()
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_dir / "time_and_memory.png", dpi=120)
    plt.close(fig)


# the report's columns: heading, the run's key, its format
COLUMNS = [
    ("final val loss", "final_val_loss", ".4f"),
    ("val ppl", "final_val_ppl", ".2f"),
    ("Δ val loss vs baseline", "val_loss_diff", "+.4f"),
    ("initial val loss", "initial_val_loss", ".4f"),
    ("train time (s)", "train_time_s", ".1f"),
    ("time ratio", "train_time_ratio", ".2f"),
    ("wall time (s)", "wall_time_s", ".1f"),
    ("peak RSS (MiB)", "peak_rss_mib", ".0f"),
    ("memory ratio", "peak_rss_ratio", ".2f"),
    ("Skip-Cache (MiB)", "cache_mib", ".1f"),
    ("trainable params", "trainable_params", ","),
]


def markdown_table(runs: dict[str, dict], baseline: str) -> str:
    """One row per variant; ratios and the loss difference are against ``baseline``."""
    rows = [["method", *(c[0].replace("baseline", baseline) for c in COLUMNS), "per epoch (s)", "status"]]
    rows.append(["---"] * len(rows[0]))
    for name, run in runs.items():
        cells = ["-" if run.get(key) is None else format(run[key], spec) for _, key, spec in COLUMNS]
        epochs = " / ".join(f"{t:.1f}" for t in run["epoch_train_time_s"]) or "-"
        rows.append([name, *cells, epochs, run["status"]])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


if __name__ == "__main__":
    CLI([compare, replot]) if sys.argv[1:2] == ["replot"] else CLI(compare)
