"""``evaluate_accuracy``'s cost per item: whole processes, as a user runs it, for one or more source trees in turn.

Each round runs every tree once, alternating, so that a machine whose speed drifts treats them alike; the results
file has each run's seconds, their median, the median per item (start-up included) and, for two trees, the ratio
of the second's median to the first's. Every run's counts are recorded too: a faster scorer must score the same.

    git worktree add /tmp/before <commit>
    python -m benchmarks.evaluate_accuracy --trees /tmp/before . --items 40 --rounds 3
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.runs import run_logged

REPO = Path(__file__).resolve().parents[1]
SUPERSENSE = "--data litgpt_skip2lora.data.WordNetInstruct --data.task supersense --data.num_train 1200".split()
SUPERSENSE += "--data.num_val 400 --data.prompt_style smollm2".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints/SmolLM2-135M-Instruct")
    parser.add_argument("--trees", nargs="+", type=Path, default=[REPO], help="source trees, each a checkout")
    parser.add_argument("--items", type=int, default=40, help="items scored per run (--limit)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree")
    parser.add_argument("--data", nargs=argparse.REMAINDER, default=SUPERSENSE, help="evaluate_accuracy's data options")
    parser.add_argument("--work", type=Path, default=REPO / "out/evaluate_accuracy", help="logs and answers")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_results", help="where the results go")
    return parser.parse_args(argv)


def commit(tree: Path) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree, capture_output=True)
    return done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def timed(tree: Path, args: argparse.Namespace, name: str) -> dict:
    """One ``evaluate_accuracy`` process running ``tree``'s package: its seconds and its counts."""
    answers = args.work / f"{name}.json"
    entry = (
        f"import sys; sys.path.insert(0, {str(tree.resolve())!r}); from litgpt_skip2lora.__main__ import main; main()"
    )
    command = [sys.executable, "-c", entry]
    command += ["evaluate_accuracy", str(args.checkpoint), *args.data, "--limit", str(args.items)]
    finished = run_logged([*command, "--out_file", str(answers)], args.work / f"{name}.log", cwd=REPO)
    if finished.returncode:
        raise SystemExit(f"{name} failed: see {args.work / f'{name}.log'}")
    report = json.loads(answers.read_text())
    return {"seconds": finished.seconds, **{k: report.get(k) for k in ("count", "exact_match", "label_match")}}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {str(tree): [] for tree in args.trees}
    for round_ in range(args.rounds):
        for i, tree in enumerate(args.trees):
            runs[str(tree)].append(timed(tree, args, f"tree{i}-round{round_}"))
            print(f"round {round_ + 1}, {tree}: {runs[str(tree)][-1]}", flush=True)
    trees = []
    for tree in args.trees:
        median = statistics.median(r["seconds"] for r in runs[str(tree)])
        per_item = median / args.items
        trees.append(dict(tree=str(tree), commit=commit(tree), runs=runs[str(tree)], median_seconds=median))
        trees[-1]["median_seconds_per_item"] = per_item
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    command = " ".join(["python -m benchmarks.evaluate_accuracy", *(argv or sys.argv[1:])])
    results = dict(command=command, checkpoint=str(args.checkpoint), items=args.items, rounds=args.rounds, trees=trees)
    if len(trees) == 2:
        results["ratio_second_to_first"] = trees[1]["median_seconds"] / trees[0]["median_seconds"]
    path = args.out / f"evaluate_accuracy-{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({t["commit"]: round(t["median_seconds_per_item"], 3) for t in trees}), f"-> {path}")
    return path


if __name__ == "__main__":
    main()
