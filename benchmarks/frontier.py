"""Accuracy against wall time: the points a user chooses from, each a whole run as users run it.

A frontier file (``benchmarks/frontier/*.yaml``) names the runs: LitGPT's LoRA at a learning rate, Skip2-LoRA tails
of several depths, sweeps, more epochs. Each point is one fresh process timed from its start until ``final/`` is
written (:func:`benchmarks.end_to_end.timed_run`), then scored: on a label task by greedy exact match on the
held-out items (``evaluate_accuracy --labels []``, not timed), on free text by its validation loss. Every point's
wall time is also given over the first LoRA point's, measured in the same invocation. A sweep point with
``score_each: true`` has every configuration scored, each exported as a full model (``export_configuration``): the
spread of its seeds, say, measures the noise of one score. A point with ``runner: benchmarks.full_tail`` trains its
tail in full (:mod:`benchmarks.full_tail`).

    python -m benchmarks.frontier benchmarks/frontier/supersense.yaml

Writes ``<out>/frontier-<task>-<UTC timestamp>.json`` (a list of points), each point's per-item answers beside it,
and a plot of accuracy against wall time.
"""

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

import litgpt_skip2lora.__main__ as cli
from benchmarks import end_to_end
from litgpt_skip2lora.sweep_outputs import export_configuration

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("points", type=Path, help="the frontier file: its task, end_to_end options and points")
    parser.add_argument("--only", nargs="+", help="run only the points of these names")
    parser.add_argument("--work", type=Path, default=REPO / "out/frontier", help="runs' folders (replaced)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_results", help="where the results go")
    return parser.parse_args(argv)


def scored(final: Path, data: dict, answers: Path) -> dict:
    """Greedy exact match of ``final`` on the data's held-out items, its per-item answers in ``answers``: the
    ``evaluate_accuracy`` command, run in this process from the repository (scoring is not timed)."""
    argv = ["litgpt-skip2lora", "evaluate_accuracy", str(final), "--data", json.dumps(data), "--labels", "[]"]
    before, sys.argv = (os.getcwd(), sys.argv), [*argv, "--out_file", str(answers)]
    try:
        os.chdir(REPO)
        cli.main()
    finally:
        os.chdir(before[0])
        sys.argv = before[1]
    report = json.loads(answers.read_text())
    return {"exact_match": report["exact_match"], "count": report["count"], "answers": answers.name}


def run_point(point: dict, configs: dict[str, Path], spec: dict, args: argparse.Namespace, stamp: str) -> dict:
    """One point: its run, timed, and its score."""
    method, epochs, options = point["method"], point.get("epochs", spec["epochs"]), point.get("options", [])
    out_dir = args.work / point["name"]
    row = {"name": point["name"], "method": method, "epochs": epochs, "options": options}
    runner = point.get("runner", end_to_end.RUNNER)  # benchmarks.full_tail for a tail trained in full
    row.update(end_to_end.timed_run(end_to_end.METHODS[method][0], configs[method], epochs, out_dir, options, runner))
    if spec["score"] == "exact_match":
        data = yaml.safe_load(configs[method].read_text())["data"]
        answers = args.out / f"frontier-{spec['task']}-{stamp}-{point['name']}.json"
        row.update(scored(out_dir / "final", data, answers))
        for c in row.get("sweep", []) if point.get("score_each") else []:  # e.g. the seeds of one configuration
            export_configuration(out_dir / "sweep" / c["name"])
            answers = answers.with_name(f"frontier-{spec['task']}-{stamp}-{point['name']}-{c['name']}.json")
            c.update(scored(out_dir / f"final-{c['name']}", data, answers))
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each point's wall time over the first LoRA point's."""
    lora = next((r for r in rows if r["method"] == "lora"), None)
    for row in rows if lora else ():
        row["wall_vs_lora"] = round(row["wall_s"] / lora["wall_s"], 4)


def plot(rows: list[dict], spec: dict, path: Path) -> None:
    """Each point at (wall time, score): up and to the left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = spec["score"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        y = row[metric] if metric == "exact_match" else row["val_loss"]
        color = "tab:red" if row["method"] == "lora" else "tab:blue"
        ax.scatter(row["wall_s"], y, color=color)
        ax.annotate(row["name"], (row["wall_s"], y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    count = next((r["count"] for r in rows if "count" in r), None)
    ax.set_ylabel(f"exact match of {count} held-out items" if metric == "exact_match" else "validation loss")
    ax.set_xlabel("wall time, process start to final/ (s)")
    ax.set_title(f"{spec['task']}: accuracy against wall time (red: LitGPT LoRA, blue: Skip2-LoRA)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    spec = yaml.safe_load(args.points.read_text())
    points = [p for p in spec["points"] if not args.only or p["name"] in args.only]
    methods = sorted({p["method"] for p in points})
    e2e = end_to_end.parse_args(["--methods", *methods, "--work", str(args.work), *spec.get("end_to_end", [])])
    args.work.mkdir(parents=True, exist_ok=True)
    configs = end_to_end.method_configs(e2e)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for point in points:
        rows.append(run_point(point, configs, spec, args, stamp))
        print(json.dumps(rows[-1]), flush=True)
    add_ratios(rows)
    path = args.out / f"frontier-{spec['task']}-{stamp}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, spec, path.with_suffix(".png"))
    for row in rows:
        score = f", exact {row['exact_match']}/{row['count']}" if "exact_match" in row else ""
        ratio = f" ({row['wall_vs_lora']}x LoRA's)" if "wall_vs_lora" in row else ""
        print(f"{row['name']:>20}: wall {row['wall_s']:8.1f} s{ratio}, val {row['val_loss']:.4f}{score}")
    print(f"Wrote {path} and {path.with_suffix('.png').name}")
    return path


if __name__ == "__main__":
    main()
