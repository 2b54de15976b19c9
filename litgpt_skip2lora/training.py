"""The training loop, as LitGPT's LoRA ``fit`` reads: each batch's features come from the backbone behind the
Skip-Cache, and a step is the tail, loss and optimizer of every live configuration, in the sweep's lanes.
"""

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.utils import chunked_cross_entropy
from torch.utils.data import DataLoader
from tqdm import tqdm

from litgpt_skip2lora import checkpoints
from litgpt_skip2lora.backbone import Batch, CachedBackbone
from litgpt_skip2lora.dropout import SharedMasks, root
from litgpt_skip2lora.execution import factors_head, head_group_size
from litgpt_skip2lora.head import factored_cross_entropy
from litgpt_skip2lora.model import GPT
from litgpt_skip2lora.rows import RowLayout
from litgpt_skip2lora.sweep import Configuration, Sweep
from litgpt_skip2lora.wallclock import WallClock

SETTINGS_CHECK_BATCHES = 2  # validated before training without eval.initial_validation, as LitGPT checks settings


def rows_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the supervised rows' logits (zero, with a graph, for a batch without any)."""
    return chunked_cross_entropy(logits, targets, chunk_size=0) if targets.numel() else logits.sum() * 0.0


def loss_groups(
    model: GPT,
    batch: Batch,
    layout: RowLayout,
    configurations: list[Configuration],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    masks: SharedMasks | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Each configuration's loss on one batch, each from its own dropout stream (sharing ``masks``), under
    ``autocast``, in groups that share no graph: a step back-propagates each before computing the next. A group
    shares the head's pass: the factored head's for all of them, the plain one's for ``head_group_size``."""
    device, adapters = batch.targets.device, [c.adapters for c in configurations]
    with autocast():
        rows = batch.features.stream.numel() // model.config.n_embd
        factored = layout.flat and factors_head(model, rows, adapters, torch.is_grad_enabled())
    if not factored:
        yield from plain_loss_groups(model, batch, layout, configurations, autocast, masks)
        return
    with autocast():
        shared = model.shared_head(batch.features, adapters)
        codes = []
        for c in configurations:
            with c.random_stream(device, masks):
                codes.append(c.adapters.codes(batch.features.of(c.adapters.reads).taps))
        losses = factored_cross_entropy(shared.stream_logits, batch.targets, codes, shared.products)
    yield losses  # outside autocast, as each group is: the step back-propagates it


def plain_loss_groups(
    model: GPT,
    batch: Batch,
    layout: RowLayout,
    configurations: list[Configuration],
    autocast: Callable[[], contextlib.AbstractContextManager],
    masks: SharedMasks | None,
) -> Iterator[list[torch.Tensor]]:
    """``loss_groups`` with the plain head: a group's tails one after another, then the head over all their rows."""
    supervised = layout.supervised(batch.targets)
    targets = batch.targets if supervised is None else batch.targets[supervised]
    size = head_group_size(model, targets.numel(), len(configurations), torch.is_grad_enabled())
    for start in range(0, len(configurations), size):
        group, rows = configurations[start : start + size], []
        for c in group:
            c.install(model)
            with autocast(), c.random_stream(batch.targets.device, masks):
                rows.append(model.tail_rows(batch.features, supervised))
        # a head with a trained part, so with dropout, is in a group of its own: the installed configuration's
        with autocast(), group[-1].random_stream(batch.targets.device, masks):
            logits = model.head(torch.cat(rows))
            losses = [rows_loss(part, targets) for part in logits.tensor_split(len(group))]
        yield losses


@dataclass
class Trainer:
    """One run's training: ``fit`` trains every configuration every epoch, validating and checkpointing."""

    fabric: L.Fabric
    sweep: Sweep
    backbone: CachedBackbone
    state: dict
    """``sweep``, ``iter_num``, ``step_count``, and the ranks' ``rng`` and ``gradients``: what a checkpoint holds."""
    train: TrainArgs
    eval: EvalArgs
    max_steps: float
    accum: int  # micro-batches per optimizer step, decided in finetune.main only
    out_dir: Path
    clock: WallClock

    def __post_init__(self) -> None:
        self.model: GPT = self.sweep.model
        self.layout = RowLayout.of(self.model.config)
        self.validated: tuple[int, int] | None = None  # the last recorded validation's step and batch count

    def fit(self, train_loader: DataLoader, val_loader: DataLoader) -> bool:
        """Train every epoch; False when a signal stopped it (a resumable checkpoint is then saved)."""
        fabric, state, train = self.fabric, self.state, self.train
        replay = checkpoints.Replay(state)
        summary = [self.first_validation(val_loader, state["step_count"] if replay.remaining else None)]
        deadline = time.perf_counter() + (train.max_time or math.inf)
        where = f"cache: {self.backbone.cache.placement}" if self.backbone.cache else "cache off"
        with checkpoints.stop_on_signals() as stop:
            for epoch in range(train.epochs):
                phase = "epoch_1" if epoch == 0 else "later_epochs"
                epoch_before, backbone_before = self.clock.seconds[phase], self.backbone.backbone_samples
                hits_before = self.backbone.cache_hits
                batches = iter(train_loader)
                skipped = replay.skip(batches, len(train_loader))
                description = f"Epoch {epoch + 1}/{train.epochs} [{where}]"
                bar = tqdm(desc=description, total=len(train_loader), initial=skipped, disable=fabric.global_rank > 0)
                iters = 0
                with self.clock.phase(phase):
                    iter_t0 = time.perf_counter()  # as LitGPT's iter_time: loading and the optimizer step included
                    for batch in self.backbone.batches(batches, "train"):
                        if state["step_count"] >= self.max_steps or time.perf_counter() > deadline:
                            break
                        losses = self.step(batch)
                        iters += 1
                        bar.update()
                        if state["iter_num"] % train.log_interval == 0:
                            hits = self.backbone.cache_hits - hits_before
                            self.log(losses, time.perf_counter() - iter_t0, batch, epoch, bar, hits)
                        if state["iter_num"] % self.accum == 0:
                            self.validate_and_save(val_loader)
                            if stop.is_set():
                                break
                        iter_t0 = time.perf_counter()
                bar.close()
                if stop.is_set():
                    self.save_checkpoint()
                    return False
                if iters:
                    seconds = self.clock.seconds[phase] - epoch_before  # the breakdown's clock: no validation
                    summary.append(self.end_epoch(epoch, seconds, iters, backbone_before))
        if self.eval.final_validation:
            self.validate(val_loader, len(val_loader))
            summary.append(f"Validation loss after training: {self.sweep.describe_losses()}")
        if self.sweep.args.best_step:
            self.sweep.restore_best()
            summary.append(self.sweep.describe_best())
        fabric.log_dict(rank_counts(self.fabric, self.backbone), step=state["iter_num"])
        fabric.print("\n".join(["", "Summary", *summary]))
        return True

    def step(self, batch: Batch) -> torch.Tensor:
        """Every live configuration's loss on a micro-batch, back-propagated in its lane; optimizer steps when due."""
        state, alive = self.state, self.sweep.alive
        state["iter_num"] += 1
        masks = SharedMasks(root(c.rng[self.fabric.device.type]) for c in alive)
        losses = self.sweep.lanes.map(partial(self.backward, batch, masks), alive)
        if state["iter_num"] % self.accum == 0:
            for c in alive:
                c.optimizer_step(self.fabric, self.model, self.train.max_norm)
            state["step_count"] += 1
        return torch.stack(losses)

    def first_validation(self, val_loader: DataLoader, resumed_at: int | None) -> str:
        """All validation batches with ``eval.initial_validation`` or at resume, else LitGPT LoRA's settings check."""
        if self.eval.initial_validation or resumed_at is not None:
            self.validate(val_loader, len(val_loader), untrained=resumed_at is None, resumed=resumed_at is not None)
            when = f"at resume (step {resumed_at})" if resumed_at is not None else "before training"
            line = f"Validation loss {when}: {self.sweep.describe_losses()}"
            self.fabric.print(line)
            return line
        self.validate(val_loader, SETTINGS_CHECK_BATCHES, record=False, untrained=True)
        return "Validation loss before training: n/a (eval.initial_validation is off)"

    def validate_and_save(self, val_loader: DataLoader) -> None:
        """Validate, halve the sweep and write a step checkpoint when this step is due for them."""
        step = self.state["step_count"]
        if step % self.eval.interval == 0:
            self.validate(val_loader, self.eval.max_iters)
            dropped = self.sweep.halve() if self.sweep.is_sweep else []
            after = f"; dropped {', '.join(c.name for c in dropped)}" if dropped else ""
            tqdm.write(f"step {step}: val loss {self.sweep.describe_losses()}{after}")
        if self.train.save_interval and step % self.train.save_interval == 0:
            self.save_checkpoint()

    def end_epoch(self, epoch: int, seconds: float, iters: int, backbone_before: int) -> str:
        """Log the epoch's time and per-rank counts, checkpoint, and say what the epoch ran."""
        ran = self.backbone.backbone_samples - backbone_before
        how = f"{ran} samples through the backbone" if ran else "tail only, every sample from the Skip-Cache"
        metrics = {"epoch_time": seconds, "epoch": epoch + 1, **rank_counts(self.fabric, self.backbone)}
        self.fabric.log_dict(metrics, step=self.state["iter_num"])
        self.save_checkpoint()
        self.backbone.warn_if_reads_are_slow()
        line = f"Epoch {epoch + 1}: {seconds:.2f} s of training, {seconds / iters * 1000:.1f} ms/iter ({how})"
        self.fabric.print(line)
        return line

    def save_checkpoint(self) -> None:
        with self.clock.phase("checkpoints"):
            checkpoints.save(self.fabric, self.out_dir, self.state)

    @torch.no_grad()
    def validate(
        self, loader: DataLoader, max_batches: int, record: bool = True, untrained: bool = False, resumed: bool = False
    ) -> None:
        """Each live configuration's mean loss over the first ``max_batches`` batches, as LitGPT's ``validate``.
        ``untrained``: all are still the base model. A best step must cover the whole validation set, and is never
        the validation at resume, which the uninterrupted run did not have."""
        alive, done = self.sweep.alive, (self.state["step_count"], min(max_batches, len(loader)))
        if record and done == self.validated:
            return  # the same as the last one (the final validation after a due one): its losses stand
        with self.clock.phase("validation"):
            self.sweep.set_training(False)
            batches = self.backbone.batches(itertools.islice(loader, max_batches), "val")
            scored, lane = alive[:1] if untrained else alive, partial(validation_losses, self.layout)
            losses = [torch.stack(self.sweep.lanes.map(partial(lane, b), scored)) for b in batches]
            self.sweep.set_training(True)
            means = self.fabric.all_reduce(torch.stack(losses).mean(0), reduce_op="mean").tolist()
        if record:
            self.validated = done
            candidate = done[1] == len(loader) and not resumed
            metrics = self.sweep.record(means * len(alive) if untrained else means, done[0], candidate)
            self.fabric.log_dict(metrics, step=self.state["iter_num"])

    def backward(self, batch: Batch, masks: SharedMasks, model: GPT, share: list[Configuration]) -> list[torch.Tensor]:
        """A lane's ``share`` of the configurations: their losses, each group back-propagated before the next."""
        losses = []
        for group in loss_groups(model, batch, self.layout, share, self.fabric.autocast, masks):
            self.fabric.backward(torch.stack(group).sum() / self.accum)
            losses += [loss.detach() for loss in group]
        return losses

    def log(self, losses: torch.Tensor, iter_time: float, batch: Batch, epoch: int, bar: tqdm, hits: int) -> None:
        """The step's metrics, each configuration's tagged; ``hits``: this epoch's samples from the Skip-Cache."""
        alive, losses = self.sweep.alive, losses.tolist()
        metrics = {"iter": self.state["iter_num"], "step": self.state["step_count"], "epoch": epoch + 1}
        metrics.update(iter_time=iter_time, feature_wait=batch.wait, tokens_per_sec=batch.tokens / iter_time)
        metrics.update(self.backbone.counters(), **{c.tagged("loss"): loss for c, loss in zip(alive, losses)})
        metrics.update({c.tagged("learning_rate"): c.scheduler.get_last_lr()[0] for c in alive})
        self.fabric.log_dict(metrics, step=self.state["iter_num"])
        bar.set_postfix(loss=f"{min(losses):.3f}", ms=f"{iter_time * 1000:.0f}", hits=hits, **self.sweep.progress())


def validation_losses(layout: RowLayout, batch: Batch, model: GPT, share: list[Configuration]) -> list[torch.Tensor]:
    """A lane's ``share`` of the configurations: their losses on a validation batch, computed by ``model``."""
    return sum(loss_groups(model, batch, layout, share), [])


def rank_counts(fabric: L.Fabric, backbone: CachedBackbone) -> dict[str, int]:
    """Each rank's samples through the backbone and cache hits so far (every rank takes part in the gather)."""
    counts = torch.tensor([backbone.backbone_samples, backbone.cache_hits], device=fabric.device)
    gathered = fabric.all_gather(counts).reshape(-1, 2).tolist()
    names = ("backbone_samples", "cache_hits")
    return {f"{name}_rank{rank}": row[i] for rank, row in enumerate(gathered) for i, name in enumerate(names)}
