"""What the whole-run benchmarks do alike: a training command in a fresh process, its output in a log file, and
the metrics the run logged, read back from its newest CSV logger version."""

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class Finished:
    returncode: int
    started: float
    """``time.time()`` just before the process started: file times after it measure the run."""
    seconds: float
    """From just before the start to the exit."""


def run_logged(command: list[str], log_file: Path, cwd: Path | None = None) -> Finished:
    """Run ``command`` to its end, its output and errors in ``log_file``."""
    started = time.time()
    with open(log_file, "w") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd).returncode
    return Finished(returncode, started, time.time() - started)


def logged_metrics(out_dir: Path) -> pd.DataFrame | None:
    """The ``metrics.csv`` of the newest CSV logger version under ``out_dir``, or None when it logged none."""
    files = sorted(out_dir.glob("logs/csv/version_*/metrics.csv"), key=lambda f: int(f.parent.name.split("_")[1]))
    return pd.read_csv(files[-1]) if files else None
