"""Stopping and resuming a run exactly. A step checkpoint holds every configuration's trained state, every rank's
dropout streams and accumulated gradients, and the counters, written atomically at each epoch's end, every
``train.save_interval`` steps and on SIGINT or SIGTERM. A resumed run passes over the batches it already trained.
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


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(out_dir.glob("step-*/state.pth"))
    return found[-1] if found else None


def check_resumable(path: Path, names: list[str], world_size: int) -> None:
    """Refuse, in one line, to resume ``path`` with another sweep or on another number of devices (each rank's
    samples and streams depend on how many there are)."""
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    saved = list(state["sweep"]["configurations"])
    if "best_val_loss" not in state["sweep"]["configurations"][saved[0]]:
        raise ValueError(f"--resume true: {path.parent.name} was written by an earlier version: start the run anew.")
    if sorted(saved) != sorted(names):
        raise ValueError(
            f"--resume true: {path.parent.name} trained {', '.join(saved)}, but this command's sweep is"
            f" {', '.join(names)}: resume with the --sweep options the run started with."
        )
    ranks = next(iter(state["rng"][saved[0]].values())).size(0)
    if ranks != world_size:
        raise ValueError(
            f"--resume true: {path.parent.name} was trained on {ranks} device(s), this command runs on {world_size}:"
            f" resume with --devices {ranks}."
        )


def load(fabric: L.Fabric, path: Path, state: dict) -> None:
    """Fill ``state`` from a step checkpoint, with this rank's dropout streams and gradients."""
    fabric.load(path, state, strict=True)
    rank = fabric.global_rank
    for c in state["sweep"].configurations:
        c.rng = {device: rows[rank].clone() for device, rows in state["rng"][c.name].items()}
        if c.name in state["gradients"]:  # written in the middle of an accumulation
            flat = state["gradients"][c.name]["accumulated"][rank].to(fabric.device)
            for p, g in zip(c.parameters(), flat.split([p.numel() for p in c.parameters()])):
                p.grad = g.view_as(p).to(p.dtype)
    fabric.print(f"Resumed from {str(path)!r} (step {state['step_count']})")


def save(fabric: L.Fabric, out_dir: Path, state: dict) -> None:
    """Write ``out_dir/step-<step_count>/state.pth`` atomically, with every rank's dropout streams and, in the middle
    of an accumulation, its gradients (only rank 0 writes)."""
    configurations = state["sweep"].configurations
    state["rng"] = {c.name: gathered(fabric, c.rng) for c in configurations}
    accumulating = any(p.grad is not None for c in configurations for p in c.parameters())  # alike on every rank
    gradients = {c.name: {"accumulated": accumulated(c.parameters())} for c in configurations if accumulating}
    state["gradients"] = {name: gathered(fabric, g) for name, g in gradients.items()}
    path = out_dir / f"step-{state['step_count']:06d}"
    with atomic_directory(path, fabric) as partial_dir:
        fabric.save(partial_dir / "state.pth", state)


@contextlib.contextmanager
def atomic_directory(path: Path, fabric: L.Fabric | None = None) -> Iterator[Path]:
    """A folder written under a temporary name and renamed by rank 0 when whole: a crash never leaves half of one."""
    partial_dir = path.with_name(f".{path.name}.partial")
    first, barrier = (True, lambda: None) if fabric is None else (fabric.global_rank == 0, fabric.barrier)
    if first:
        shutil.rmtree(partial_dir, ignore_errors=True)
        partial_dir.mkdir(parents=True)
    barrier()
    yield partial_dir
    barrier()
    if first:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(partial_dir, path)
    barrier()


class Replay:
    """The batches a resumed run already trained, passed over epoch by epoch."""

    def __init__(self, state: dict) -> None:
        self.remaining = state["iter_num"]

    def skip(self, batches: Iterator, length: int) -> int:
        """Consume this epoch's already trained batches from ``batches``; return how many."""
        skipped = min(self.remaining, length)
        for _ in range(skipped):
            next(batches)
        self.remaining -= skipped
        return skipped


def accumulated(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """The gradients accumulated so far, flat in float32 (zero where none is)."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
    return torch.cat([g.flatten().float() for g in grads])


def gathered(fabric: L.Fabric, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's tensors (random generator states, gradients), one row per rank."""
    rows = {name: fabric.all_gather(state.to(fabric.device)) for name, state in states.items()}
    return {name: r.reshape(fabric.world_size, -1).cpu() for name, r in rows.items()}


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
