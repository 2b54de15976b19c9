"""The training loop, as LitGPT's LoRA ``fit`` reads, with the backbone behind the Skip-Cache.

Each batch's features come from :class:`~litgpt_skip2lora.backbone.CachedBackbone` (epoch 1 runs the backbone,
later epochs read the cache); the step is then the tail, the loss and the optimizer only (:func:`tail_loss`).
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.utils import chunked_cross_entropy
from torch.utils.data import DataLoader
from tqdm import tqdm

from litgpt_skip2lora import resume
from litgpt_skip2lora.backbone import Batch, CachedBackbone
from litgpt_skip2lora.model import GPT
from litgpt_skip2lora.rows import RowLayout
from litgpt_skip2lora.wallclock import WallClock


def tail_loss(model: torch.nn.Module, batch: Batch, layout: RowLayout) -> torch.Tensor:
    """Cross-entropy of the tail's logits at the supervised rows, the only ones the loss reads."""
    supervised = layout.supervised(batch.targets)
    logits = model.tail(batch.features, supervised)
    targets = batch.targets if supervised is None else batch.targets[supervised]
    return chunked_cross_entropy(logits, targets, chunk_size=0) if targets.numel() else logits.sum() * 0.0


@dataclass
class Trainer:
    """One run's training: ``fit`` trains every epoch, validating and saving step checkpoints on the way."""

    fabric: L.Fabric
    fabric_model: torch.nn.Module
    """The model as Fabric set it up; ``state["model"]`` is the model itself."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    backbone: CachedBackbone
    state: dict
    """``model``, ``optimizer``, ``scheduler``, ``iter_num``, ``step_count``, ``rng``: what a checkpoint holds."""
    train: TrainArgs
    eval: EvalArgs
    max_steps: float
    out_dir: Path
    clock: WallClock

    @property
    def model(self) -> GPT:
        return self.state["model"]

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step."""
        return self.train.gradient_accumulation_iters(self.fabric.world_size, 1)

    def fit(self, train_loader: DataLoader, val_loader: DataLoader) -> bool:
        """Train every epoch; False when a signal stopped it (a resumable checkpoint is then saved)."""
        fabric, state, train = self.fabric, self.state, self.train
        layout, replay = RowLayout.of(self.model.config), resume.Replay(fabric, state)
        self.model.eval()  # the frozen part never drops out; the tail switches to training mode after validation
        when = f"at resume (step {state['step_count']})" if replay.remaining else "before training"
        summary = [f"Validation loss {when}: {self.validate(val_loader):.4f}"]
        fabric.print(summary[0])
        deadline = time.perf_counter() + (train.max_time or math.inf)
        where = f"cache: {self.backbone.cache.placement}" if self.backbone.cache else "cache off"
        with resume.stop_on_signals() as stop:
            for epoch in range(train.epochs):
                epoch_t0, backbone_before, iters = time.perf_counter(), self.backbone.backbone_samples, 0
                batches = iter(train_loader)
                skipped = replay.skip(batches, len(train_loader))
                bar = tqdm(total=len(train_loader), initial=skipped, dynamic_ncols=True, disable=fabric.global_rank > 0)
                bar.set_description(f"Epoch {epoch + 1}/{train.epochs} [{where}]")
                with self.clock.phase("epoch_1" if epoch == 0 else "later_epochs"):
                    iter_t0 = time.perf_counter()  # as LitGPT's iter_time: loading and the optimizer step included
                    for batch in self.backbone.batches(batches, "train"):
                        if state["step_count"] >= self.max_steps or time.perf_counter() > deadline:
                            break
                        state["iter_num"] += 1
                        stepping = state["iter_num"] % self.accum == 0
                        with fabric.no_backward_sync(self.fabric_model, enabled=not stepping):
                            loss = tail_loss(self.fabric_model, batch, layout)
                            fabric.backward(loss / self.accum)
                        if stepping:
                            self.optimizer.step()
                            self.optimizer.zero_grad()
                            self.scheduler.step()
                            state["step_count"] += 1
                        iters += 1
                        bar.update()
                        if state["iter_num"] % train.log_interval == 0:
                            self.log(loss.item(), time.perf_counter() - iter_t0, batch, epoch, bar)
                        if stepping:
                            self.validate_and_save(val_loader)
                            if stop.is_set():
                                break
                        iter_t0 = time.perf_counter()
                bar.close()
                if stop.is_set():
                    self.save_checkpoint()
                    return False
                if iters:
                    summary.append(self.end_epoch(epoch, time.perf_counter() - epoch_t0, iters, backbone_before))
        val_loss = self.validate(val_loader)
        summary.append(f"Validation loss after training: {val_loss:.4f} | val ppl: {math.exp(val_loss):.3f}")
        fabric.log_dict(self.rank_counts(), step=state["iter_num"])
        fabric.print("\n".join(["", "Summary", *summary]))
        return True

    def validate_and_save(self, val_loader: DataLoader) -> None:
        """Validate and write a step checkpoint when this step is due for them."""
        step = self.state["step_count"]
        if step % self.eval.interval == 0:
            tqdm.write(f"step {step}: val loss {self.validate(val_loader):.4f}")
        if self.train.save_interval and step % self.train.save_interval == 0:
            self.save_checkpoint()

    def end_epoch(self, epoch: int, seconds: float, iters: int, backbone_before: int) -> str:
        """Log the epoch's time and per-rank counts, checkpoint, and say what the epoch ran."""
        ran = self.backbone.backbone_samples - backbone_before
        how = f"{ran} samples through the backbone" if ran else "tail only, every sample from the Skip-Cache"
        metrics = {"epoch_time": seconds, "epoch": epoch + 1, **self.rank_counts()}
        self.fabric.log_dict(metrics, step=self.state["iter_num"])
        self.save_checkpoint()
        self.backbone.warn_if_reads_are_slow()
        line = f"Epoch {epoch + 1}: {seconds:.2f} s, {seconds / iters * 1000:.1f} ms/iter ({how})"
        self.fabric.print(line)
        return line

    def save_checkpoint(self) -> None:
        with self.clock.phase("checkpoints"):
            resume.save(self.fabric, self.out_dir, self.state)

    @torch.no_grad()
    def validate(self, val_loader: DataLoader) -> float:
        """Mean of per-batch losses over the whole validation set, as LitGPT's ``validate`` averages them."""
        layout = RowLayout.of(self.model.config)
        with self.clock.phase("validation"):
            self.set_tail_training(False)
            losses = [tail_loss(self.model, b, layout) for b in self.backbone.batches(val_loader, "val")]
            self.set_tail_training(True)
            val_loss = self.fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean").item()
        self.fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=self.state["iter_num"])
        return val_loss

    def set_tail_training(self, mode: bool) -> None:
        for module in self.model.tail_modules:
            module.train(mode)

    def rank_counts(self) -> dict[str, int]:
        """Each rank's samples through the backbone and cache hits so far (every rank takes part in the gather)."""
        counts = torch.tensor([self.backbone.backbone_samples, self.backbone.cache_hits], device=self.fabric.device)
        gathered = self.fabric.all_gather(counts).reshape(-1, 2).tolist()
        names = ("backbone_samples", "cache_hits")
        return {f"{name}_rank{rank}": row[i] for rank, row in enumerate(gathered) for i, name in enumerate(names)}

    def log(self, loss: float, iter_time: float, batch: Batch, epoch: int, bar: tqdm) -> None:
        """The step's metrics; ``loss`` was read with ``.item()``, which waits for the step's queued GPU work."""
        cache = self.backbone.cache
        metrics = {
            "loss": loss,
            "iter": self.state["iter_num"],
            "step": self.state["step_count"],
            "epoch": epoch + 1,
            "iter_time": iter_time,
            "feature_wait": batch.wait,
            "tokens_per_sec": batch.tokens / iter_time,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "cache_hits": self.backbone.cache_hits,
            "cache_bytes": cache.bytes if cache else 0,
            "backbone_samples": self.backbone.backbone_samples,
        }
        self.fabric.log_dict(metrics, step=self.state["iter_num"])
        bar.set_postfix(loss=f"{loss:.3f}", ms=f"{iter_time * 1000:.0f}", hits=metrics["cache_hits"])
