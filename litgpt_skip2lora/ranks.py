"""A rank lost alone: the others stop within seconds with one line saying which (not a traceback, a silent kill or
the process group's timeout), and the run resumes with ``--resume true``. Rank 0 watches the processes Lightning
launched; every other rank its parent, rank 0.
"""

import os
import signal
import sys
import threading
import time

import lightning as L

WATCH_PERIOD_S = 1.0
"""How often a rank looks: within Lightning's own observer's 5 s, so that its one line comes first."""


def lost_ranks(fabric: L.Fabric, parent: int) -> dict[int, int | None]:
    """The ranks whose process has ended, with their exit codes where known (negative: killed by that signal)."""
    if fabric.global_rank > 0:
        return {0: None} if os.getppid() != parent else {}
    children = getattr(fabric.strategy.launcher, "procs", [])  # Lightning's launcher, on rank 0
    return {rank: p.returncode for rank, p in enumerate(children, start=1) if p.poll() is not None}


def stop(lost: dict[int, int | None]) -> None:
    """Say which ranks were lost, in one line, and end this process at once (a collective may never return)."""
    how = {rank: "" if code is None else f" ({exited(code)})" for rank, code in lost.items()}
    ranks = ", ".join(f"rank {rank}{how[rank]}" for rank in lost)
    print(f"error: lost {ranks}: this rank stops too; continue with --resume true.", file=sys.stderr, flush=True)
    os._exit(1)


def exited(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def watch(fabric: L.Fabric) -> int:
    """Start this rank's watcher; returns its parent's pid, for :func:`stop_if_lost`."""
    parent = os.getppid()
    if fabric.world_size > 1:

        def run() -> None:
            while not (lost := lost_ranks(fabric, parent)):
                time.sleep(WATCH_PERIOD_S)
            stop(lost)

        threading.Thread(target=run, daemon=True, name="rank-watcher").start()
    return parent


def stop_if_lost(fabric: L.Fabric, parent: int, wait_s: float = 3 * WATCH_PERIOD_S) -> None:
    """After a failed collective: :func:`stop` if a rank was lost (its exit can take a moment to be seen)."""
    deadline = time.monotonic() + wait_s
    while fabric.world_size > 1 and time.monotonic() < deadline:
        if lost := lost_ranks(fabric, parent):
            stop(lost)
        time.sleep(0.1)
