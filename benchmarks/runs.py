"""What the whole-run benchmarks do alike: a training command in a fresh process, its output in a log file, and
the metrics the run logged, read back from its newest CSV logger version."""

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
    started, t0 = time.time(), time.perf_counter()
    with open(log_file, "w") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd).returncode
    return Finished(returncode, started, time.perf_counter() - t0)


def logged_metrics(out_dir: Path) -> "pd.DataFrame | None":
    """The ``metrics.csv`` of the newest CSV logger version under ``out_dir``, or None when it logged none."""
    import pandas as pd  # here: the step benchmark, which imports compare.py, runs without pandas

    files = sorted(out_dir.glob("logs/csv/version_*/metrics.csv"), key=lambda f: int(f.parent.name.split("_")[1]))
    return pd.read_csv(files[-1]) if files else None
