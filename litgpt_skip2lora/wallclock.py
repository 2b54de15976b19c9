"""Where a run's wall-clock time goes, from its process's start until the tuned model is saved, in exclusive
phases; every boundary waits for the GPU's queued work first.
"""

import contextlib
import time
from collections.abc import Iterator

import psutil
import torch

PHASES = {
    "startup": "start-up and model load",
    "validation": "validation (filling its cache included)",
    "epoch_1": "epoch 1 (filling the Skip-Cache)",
    "later_epochs": "later epochs",
    "checkpoints": "checkpoints",
    "final_save": "final save",
    "other": "other",
}


class WallClock:
    """Seconds per phase; the phase in force is the innermost ``phase`` block, ``startup`` until ``started``."""

    def __init__(self, device: torch.device, start: float | None = None) -> None:
        # the process's start on the time.time() clock: the interpreter's own start-up counts too
        self.device, self.start = device, psutil.Process().create_time() if start is None else start
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.stack, self.since = ["startup"], self.start

    def started(self) -> None:
        """Start-up ends here: time outside any phase from now on is ``other``."""
        self._switch()
        self.stack[0] = "other"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()

    def report(self) -> dict[str, float]:
        """Seconds per phase so far, and ``total`` since the process started (the phases add up to it)."""
        self._switch()
        return {**self.seconds, "total": self.since - self.start}

    def _switch(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.time()
        self.seconds[self.stack[-1]] += now - self.since
        self.since = now


def format_report(seconds: dict[str, float]) -> str:
    """The report as aligned lines, one per phase that took time, then the total."""
    rows = [(label, seconds[name]) for name, label in PHASES.items() if seconds[name] > 0]
    rows.append(("total", seconds["total"]))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value:9.2f} s" for label, value in rows)
