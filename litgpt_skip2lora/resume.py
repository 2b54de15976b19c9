"""Stopping and resuming a run exactly.

A step checkpoint holds the trained parameters (nothing frozen), the optimizer, the scheduler, the counters and every
rank's RNG states. It is written under a temporary name and renamed, so a crash never leaves half of one behind;
one is written at every epoch's end, every ``train.save_interval`` steps and when SIGINT or SIGTERM stops the run.
A resumed run passes over the batches it already trained without computing them (the samplers' order depends on
the seed and the epoch only), then restores the RNG: its losses are those of an uninterrupted run.
"""

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from tqdm import tqdm

from litgpt_skip2lora.model import trainable_state


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(out_dir.glob("step-*/state.pth"))
    return found[-1] if found else None


def load(fabric: L.Fabric, path: Path, state: dict) -> None:
    """Fill ``state`` from a step checkpoint, which holds the trained parameters only."""
    fabric.load(path, state, strict=False)
    fabric.print(f"Resumed from {str(path)!r} (step {state['step_count']})")


def save(fabric: L.Fabric, out_dir: Path, state: dict) -> None:
    """Write ``out_dir/step-<step_count>/state.pth`` atomically, with every rank's RNG under ``state["rng"]``."""
    state["rng"] = rng_states(fabric)
    trained = trainable_state(state["model"])
    path = out_dir / f"step-{state['step_count']:06d}"
    partial_dir = path.with_name(f".{path.name}.partial")
    fabric.save(partial_dir / "state.pth", state, filter={"model": lambda name, _: name in trained})
    if fabric.global_rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial_dir, path)
    fabric.barrier()


class Replay:
    """The batches a resumed run already trained: ``skip`` passes over them, epoch by epoch, then restores the RNG."""

    def __init__(self, fabric: L.Fabric, state: dict) -> None:
        self.fabric, self.state, self.remaining = fabric, state, state["iter_num"]

    def skip(self, batches: Iterator, length: int) -> int:
        """Consume this epoch's already trained batches from ``batches``; return how many."""
        skipped = min(self.remaining, length)
        for _ in range(skipped):
            next(batches)
        self.remaining -= skipped
        if skipped and not self.remaining:
            restore_rng(self.fabric, self.state["rng"])
        return skipped


def rng_states(fabric: L.Fabric) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, one row per rank: each rank's dropout draws numbers of its own, and only rank 0
    writes the checkpoint."""
    states = {"cpu": torch.get_rng_state()}
    if fabric.device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(fabric.device)
    gathered = {name: fabric.all_gather(state.to(fabric.device)) for name, state in states.items()}
    return {name: rows.reshape(fabric.world_size, -1).cpu() for name, rows in gathered.items()}


def restore_rng(fabric: L.Fabric, states: dict[str, torch.Tensor]) -> None:
    """This rank's RNG states as saved: the tail's dropout continues as if never interrupted."""
    torch.set_rng_state(states["cpu"][fabric.global_rank].clone())
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"][fabric.global_rank].clone(), fabric.device)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event that SIGINT and SIGTERM set: the loop lets the current step finish, then stops with a checkpoint."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame) -> None:
        stop.set()
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step ...")

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
