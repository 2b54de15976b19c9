"""finetune_skip2lora: train Skip2-LoRA adapters without ever back-propagating the backbone, with the Skip-Cache.

Epoch 1 runs the frozen backbone once per sample (under ``no_grad``) and stores what the tail needs; every later
visit of a sample reads it back and runs only the adapters, the head and the loss. LitGPT's machinery is reused:
data modules, ``TrainArgs``/``EvalArgs``, loggers, ``chunked_cross_entropy``, ``get_lr_scheduler``, checkpoints.
"""

import dataclasses
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from pprint import pprint
from typing import Literal

import lightning as L
import torch
import yaml
from lightning.fabric.plugins import BitsandbytesPrecision
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import litgpt.finetune.lora as litgpt_lora
from litgpt.args import EvalArgs, LogArgs, TrainArgs
from litgpt.data import Alpaca, DataModule
from litgpt.lora import LoRALayer, mark_only_lora_as_trainable, merge_lora_weights
from litgpt.parser_config import save_hyperparameters
from litgpt.prompts import save_prompt_style
from litgpt.tokenizer import Tokenizer
from litgpt.types import LoggerChoice
from litgpt.utils import (
    auto_download_checkpoint,
    check_valid_checkpoint_dir,
    choose_logger,
    chunked_cross_entropy,
    copy_config_files,
    instantiate_torch_optimizer,
    load_checkpoint,
    num_parameters,
    parse_devices,
)

from litgpt_skip2lora.cache import CacheError, Entry, SkipCache, file_digest, sample_key
from litgpt_skip2lora.model import GPT, LORA_FLAGS, Config, Features

IGNORE_INDEX = -100
COMMANDS = ["finetune_skip2lora", "finetune"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CacheArgs:
    """Skip-Cache options."""

    enabled: bool = True
    """Keep each sample's backbone activations and skip the backbone whenever the sample comes again."""
    directory: Path | None = None
    """Where to keep them; default ``<out_dir>/skip_cache``. A later run with the same fingerprint reuses them."""
    in_memory: bool = False
    """Keep them in RAM instead of on disk (small runs)."""
    max_size_gb: float | None = None
    """Size limit; samples that do not fit are recomputed each time."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Storage dtype; default: the dtype the backbone computes in, which keeps cached training exact."""


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/skip2lora"),
    precision: str | None = None,
    quantize: Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8-training"] | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = False,
    lora_key: bool = False,
    lora_value: bool = False,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    lora_head: bool = False,
    skip2lora_enabled: bool = True,
    skip2lora_block_indices: list[int] | None = None,
    skip2lora_output_layer: str = "lm_head",
    skip2lora_input: str = "raw",
    skip2lora_mix: str = "none",
    cache: CacheArgs = CacheArgs(),
    data: DataModule | None = None,
    train: TrainArgs = TrainArgs(
        save_interval=1000,
        log_interval=1,
        global_batch_size=16,
        micro_batch_size=1,
        lr_warmup_steps=100,
        epochs=5,
        max_seq_length=None,
    ),
    log: LogArgs = LogArgs(),
    eval: EvalArgs = EvalArgs(interval=100, max_new_tokens=100, max_iters=100),
    optimizer: str | dict = "AdamW",
    logger_name: LoggerChoice = "csv",
    seed: int = 1337,
    resume: bool = False,
    access_token: str | None = None,
) -> None:
    """Fine-tune with Skip2-LoRA: adapters from selected blocks straight to the output, backbone frozen and cached.

    Arguments are those of ``litgpt finetune_lora``, plus:
        skip2lora_enabled: Train Skip2-LoRA adapters. With ``false`` this runs LitGPT's own ``finetune_lora``.
        skip2lora_block_indices: Blocks whose input feeds an adapter (negative counts from the end). Default: four
            evenly spaced blocks, the first being 0.
        skip2lora_output_layer: Where the adapters' sum is added: ``lm_head``, ``ln_f`` or ``block.K``.
        skip2lora_input: What an adapter reads: ``raw`` block input, the block's ``norm_1`` of it, or ``rms``-normalised.
        skip2lora_mix: ``none``, or ``attention``: mix the adapters' codes across positions with the frozen blocks'
            attention probabilities (cached with the block inputs).
        cache: Skip-Cache options.
        resume: Continue from the newest ``step-*`` checkpoint in ``out_dir``.
    """
    checkpoint_dir = auto_download_checkpoint(model_name=checkpoint_dir, access_token=access_token)
    data = Alpaca() if data is None else data
    lora = dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_head=lora_head)
    lora.update(zip(LORA_FLAGS, (lora_query, lora_key, lora_value, lora_projection, lora_mlp)))
    if not skip2lora_enabled:
        return litgpt_lora.setup(
            checkpoint_dir, out_dir, precision, quantize, devices, num_nodes, **lora, data=data, train=train,
            log=log, eval=eval, optimizer=optimizer, logger_name=logger_name, seed=seed,
        )  # fmt: skip
    pprint(locals())
    check_valid_checkpoint_dir(checkpoint_dir, raise_error=True)
    base = Config.from_file(checkpoint_dir / "model_config.yaml")
    config = Config.from_file(
        checkpoint_dir / "model_config.yaml",
        **lora,
        skip2lora_enabled=True,
        skip2lora_block_indices=default_blocks(base.n_layer) if skip2lora_block_indices is None else skip2lora_block_indices,
        skip2lora_output_layer=skip2lora_output_layer,
        skip2lora_input=skip2lora_input,
        skip2lora_mix=skip2lora_mix,
    )
    devices = parse_devices(devices)
    precision = precision or ("bf16-true" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true")
    cache_dir = None if cache.in_memory or not cache.enabled else (cache.directory or out_dir / "skip_cache")
    if cache_dir is not None:
        check_writable(cache_dir)
    if resume and latest_checkpoint(out_dir) is None:
        raise FileNotFoundError(f"--resume true but {str(out_dir)!r} holds no step-*/state.pth to resume from.")

    plugins = None
    if quantize is not None:
        dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}[precision]
        plugins, precision = BitsandbytesPrecision(quantize[4:], dtype), None
    strategy = "ddp" if devices * num_nodes > 1 else "auto"
    logger = choose_logger(
        logger_name, out_dir, name=f"finetune-skip2lora-{config.name}", log_interval=train.log_interval,
        log_args=dataclasses.asdict(log),
    )  # fmt: skip
    fabric = L.Fabric(
        devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, loggers=logger, plugins=plugins
    )
    fabric.launch(main, devices, seed, config, data, checkpoint_dir, out_dir, train, eval, cache, cache_dir, optimizer, num_nodes, resume)


def main(
    fabric: L.Fabric,
    devices: int,
    seed: int,
    config: Config,
    data: DataModule,
    checkpoint_dir: Path,
    out_dir: Path,
    train: TrainArgs,
    eval: EvalArgs,
    cache_args: CacheArgs,
    cache_dir: Path | None,
    optimizer: str | dict,
    num_nodes: int = 1,
    resume: bool = False,
) -> None:
    litgpt_lora.validate_args(train, eval)
    tokenizer = Tokenizer(checkpoint_dir)
    train_loader, val_loader = get_dataloaders(fabric, data, tokenizer, train)
    accum = train.gradient_accumulation_iters(devices, num_nodes)
    max_steps = min(train.epochs * max(1, len(train_loader) // accum), train.max_steps or math.inf)

    fabric.seed_everything(seed)
    with fabric.init_module(empty_init=fabric.world_size > 1):
        model = GPT(config)
    mark_only_lora_as_trainable(model)
    fabric.print(f"Number of trainable parameters: {num_parameters(model, requires_grad=True):,}")
    fabric.print(f"Number of non-trainable parameters: {num_parameters(model, requires_grad=False):,}")
    load_checkpoint(fabric, model, checkpoint_dir / "lit_model.pth", strict=False)
    if fabric.world_size > 1:  # empty_init left the LoRA weights, which no checkpoint holds, uninitialised
        for module in model.modules():
            if isinstance(module, LoRALayer):
                module.reset_parameters()
    model.max_seq_length = min(config.block_size, train.max_seq_length or config.block_size)

    fabric_model = fabric.setup_module(model)
    fabric_model.mark_forward_method("skip2lora_logits")
    opt = fabric.setup_optimizers(instantiate_torch_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad]))
    warmup = max(1, min(train.lr_warmup_steps or 0, max_steps - 1))  # LitGPT's scheduler divides by zero at 0
    scheduler = litgpt_lora.get_lr_scheduler(opt, warmup_steps=warmup, max_steps=max(max_steps, warmup + 1))

    cache = open_cache(fabric, model, cache_args, cache_dir, checkpoint_dir, data, train)
    state = {"model": model, "optimizer": opt, "scheduler": scheduler, "iter_num": 0, "step_count": 0, "rng": None}
    if resume:
        fabric.load(latest_checkpoint(out_dir), state)
        fabric.print(f"Resumed from step {state['step_count']}")
    trainer = Trainer(
        fabric, fabric_model, model, opt, scheduler, cache=cache, cache_dtype=cache_args.dtype, train=train, eval=eval,
        accum=accum, max_steps=max_steps, state=state,
    )  # fmt: skip
    trainer.fit(train_loader, val_loader, out_dir)

    save_final(fabric, model, out_dir / "final", checkpoint_dir, data)
    if fabric.global_rank == 0:
        litgpt_lora.generate_example(fabric, model, tokenizer, eval, data)


def default_blocks(n_layer: int) -> list[int]:
    """Four evenly spaced blocks starting at 0, e.g. [0, 8, 16, 24] for 32 layers."""
    return sorted({i * n_layer // 4 for i in range(4)})


def check_writable(directory: Path) -> None:
    """Fail before any output is written when the cache directory cannot be created or written."""
    existing = next(p for p in [directory, *directory.parents] if p.exists())
    if not os.access(existing, os.W_OK) or (existing != directory and not existing.is_dir()):
        raise CacheError(f"The Skip-Cache directory {str(directory)!r} cannot be created or written.")


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(out_dir.glob("step-*/state.pth"))
    return found[-1] if found else None


class IndexedDataset(Dataset):
    """A data module's dataset whose items also carry their index and length: the Skip-Cache's sample identity."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        return {**item, "index": index, "length": len(item["input_ids"])}


def collate_indexed(samples: list[dict], collate_fn) -> dict:
    batch = collate_fn(samples)
    batch["index"] = torch.tensor([s["index"] for s in samples])
    batch["length"] = torch.tensor([s["length"] for s in samples]).clamp(max=batch["input_ids"].size(1))
    return batch


def get_dataloaders(fabric: L.Fabric, data: DataModule, tokenizer: Tokenizer, train: TrainArgs) -> tuple[DataLoader, DataLoader]:
    """LitGPT's data module loaders, same sampler and collate, with sample indices added."""
    data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size, max_seq_length=train.max_seq_length)
    with fabric.rank_zero_first():
        data.prepare_data()
    data.setup()
    loaders = []
    for loader in (data.train_dataloader(), data.val_dataloader()):
        loaders.append(
            DataLoader(
                IndexedDataset(loader.dataset), batch_size=loader.batch_size, sampler=loader.sampler,
                num_workers=loader.num_workers, collate_fn=partial(collate_indexed, collate_fn=loader.collate_fn),
            )  # fmt: skip
        )
    return fabric.setup_dataloaders(*loaders)


def open_cache(
    fabric: L.Fabric, model: GPT, args: CacheArgs, directory: Path | None, checkpoint_dir: Path, data: DataModule, train: TrainArgs
) -> SkipCache | None:
    """The Skip-Cache, or None when it is off or cannot be exact (ordinary LoRA trains the cached part)."""
    if not args.enabled:
        return None
    if model.backbone_requires_grad():
        warnings.warn("Ordinary LoRA trains blocks before the Skip2-LoRA output place: the Skip-Cache is off.")
        return None
    fingerprint = {
        "checkpoint": file_digest(checkpoint_dir / "lit_model.pth"),
        "tokenizer": {p.name: file_digest(p) for p in sorted(checkpoint_dir.glob("tokenizer*"))},
        "config": {k: v for k, v in dataclasses.asdict(model.config).items() if not k.startswith("lora_")},
        "data": {"module": type(data).__name__, **{k: v if isinstance(v, (str, int, float, bool, Path, type(None))) else type(v).__name__ for k, v in vars(data).items()}},
        "max_seq_length": train.max_seq_length,
        "precision": getattr(fabric.strategy.precision, "precision", type(fabric.strategy.precision).__name__),
        "dtype": args.dtype,
    }
    max_bytes = None if args.max_size_gb is None else int(args.max_size_gb * 1e9)
    with fabric.rank_zero_first():
        return SkipCache(directory, fingerprint, max_bytes)


class Trainer:
    """The training loop: features from the cache or the backbone, then the tail, loss and optimizer step."""

    def __init__(
        self,
        fabric: L.Fabric,
        fabric_model,
        model: GPT,
        optimizer,
        scheduler,
        *,
        cache: SkipCache | None = None,
        cache_dtype: str | None = None,
        train: TrainArgs = TrainArgs(),
        eval: EvalArgs = EvalArgs(),
        accum: int = 1,
        max_steps: float = math.inf,
        state: dict | None = None,
    ) -> None:
        state = {"iter_num": 0, "step_count": 0, "rng": None} if state is None else state
        self.fabric, self.fabric_model, self.model = fabric, fabric_model, model
        self.optimizer, self.scheduler, self.cache = optimizer, scheduler, cache
        self.train, self.eval, self.accum, self.max_steps, self.state = train, eval, accum, max_steps, state
        config = model.config
        self.position_wise = config.skip2lora_tail_start == config.n_layer and config.skip2lora_mix == "none"
        self.dtype = DTYPES.get(cache_dtype) if cache else None
        self.backbone_samples = 0

    def fit(self, train_loader: DataLoader, val_loader: DataLoader, out_dir: Path) -> None:
        fabric, state = self.fabric, self.state
        self.model.eval()  # the frozen part never drops out; validation switches the tail to training mode after it
        summary = [f"Validation loss before training: {self.log_validation(val_loader):.4f}"]
        fabric.print(summary[0])
        self.skip, self.t_start = state["iter_num"], time.perf_counter()
        for epoch in range(self.train.epochs):
            epoch_t0, backbone_before = time.perf_counter(), self.backbone_samples
            iters = self.run_epoch(train_loader, val_loader, out_dir, epoch)
            if iters:
                epoch_time, ran = time.perf_counter() - epoch_t0, self.backbone_samples - backbone_before
                how = f"{ran} samples through the backbone" if ran else "tail only, every sample from the Skip-Cache"
                summary.append(f"Epoch {epoch + 1}: {epoch_time:.2f} s, {epoch_time / iters * 1000:.1f} ms/iter ({how})")
                fabric.print(summary[-1])
                fabric.log_dict({"epoch_time": epoch_time, "epoch": epoch + 1}, step=state["iter_num"])
        val_loss = self.log_validation(val_loader)
        summary.append(f"Validation loss after training: {val_loss:.4f} | val ppl: {math.exp(val_loss):.3f}")
        fabric.print("\n".join(["", "Summary", *summary]))

    def run_epoch(self, train_loader: DataLoader, val_loader: DataLoader, out_dir: Path, epoch: int) -> int:
        """One pass over the training data; returns the number of iterations it ran."""
        state, train, iters = self.state, self.train, 0
        bar = tqdm(train_loader, desc=f"Epoch {epoch + 1}/{train.epochs}", disable=self.fabric.global_rank != 0)
        self.iter_t0 = time.perf_counter()  # like LitGPT's iter_time: batch loading and optimizer step included
        for batch in bar:
            if self.skip > 0:  # resuming: replay the sampler without computing, then restore the RNG as saved
                self.skip -= 1
                if self.skip == 0:
                    torch.set_rng_state(state["rng"])
                continue
            if state["step_count"] >= self.max_steps or time.perf_counter() - self.t_start > (train.max_time or math.inf):
                break
            loss, tokens = self.training_step(batch)
            iters += 1
            stepped = state["iter_num"] % self.accum == 0
            if stepped:
                self.optimizer_step()
            if state["iter_num"] % train.log_interval == 0:
                self.log(loss, tokens, epoch, bar)
            if stepped:
                self.evaluate_and_save(val_loader, out_dir)
            self.iter_t0 = time.perf_counter()
        return iters

    def training_step(self, batch: dict) -> tuple[torch.Tensor, int]:
        self.state["iter_num"] += 1
        features, targets = self.batch_features(batch, "train")
        accumulating = self.state["iter_num"] % self.accum != 0
        with self.fabric.no_backward_sync(self.fabric_model, enabled=accumulating):
            loss = self.loss(self.fabric_model, features, targets)
            self.fabric.backward(loss / self.accum)
        return loss.detach(), int(batch["length"].sum())

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.state["step_count"] += 1

    def evaluate_and_save(self, val_loader: DataLoader, out_dir: Path) -> None:
        step = self.state["step_count"]
        if step % self.eval.interval == 0:
            self.fabric.print(f"step {step}: val loss {self.log_validation(val_loader):.4f}")
        if self.train.save_interval and step % self.train.save_interval == 0:
            self.state["rng"] = torch.get_rng_state()  # adapters' dropout continues as if never interrupted
            self.fabric.save(out_dir / f"step-{step:06d}" / "state.pth", self.state)  # enough to resume

    def log_validation(self, val_loader: DataLoader) -> float:
        val_loss = self.validate(val_loader)
        self.fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=self.state["iter_num"])
        return val_loss

    def log(self, loss: torch.Tensor, tokens: int, epoch: int, bar: tqdm) -> None:
        iter_time = time.perf_counter() - self.iter_t0
        cache = self.cache
        metrics = {
            "loss": loss.item(),
            "iter": self.state["iter_num"],
            "step": self.state["step_count"],
            "epoch": epoch + 1,
            "iter_time": iter_time,
            "tokens_per_sec": tokens / iter_time,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "cache_hits": cache.hits if cache else 0,
            "backbone_samples": self.backbone_samples,
        }
        self.fabric.log_dict(metrics, step=self.state["iter_num"])
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", ms=f"{iter_time * 1000:.0f}", hits=metrics["cache_hits"])

    @torch.no_grad()
    def validate(self, val_loader: DataLoader) -> float:
        """Mean of per-batch losses over the whole validation set, as LitGPT's ``validate`` averages them."""
        self.set_tail_training(False)
        losses = [self.loss(self.model, *self.batch_features(batch, "val")) for batch in val_loader]
        self.set_tail_training(True)
        mean = torch.stack(losses).mean()
        return self.fabric.all_reduce(mean, reduce_op="mean").item()

    def set_tail_training(self, mode: bool) -> None:
        for module in self.model.tail_modules:
            module.train(mode)

    def loss(self, model, features: Features, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the tail's logits at the supervised positions, the only ones the loss reads."""
        supervised = None if self.position_wise else targets != IGNORE_INDEX
        logits = model.skip2lora_logits(features, supervised)
        targets = targets if supervised is None else targets[supervised]
        return chunked_cross_entropy(logits, targets, chunk_size=0) if targets.numel() else logits.sum() * 0.0

    def batch_features(self, batch: dict, split: str) -> tuple[Features, torch.Tensor]:
        """Each sample's entry from the cache, or from one backbone pass over the samples it lacks."""
        input_ids, labels, lengths = batch["input_ids"], batch["labels"], batch["length"].tolist()
        keys = [
            sample_key(split, i, input_ids[j, :n], labels[j, :n]) for j, (i, n) in enumerate(zip(batch["index"].tolist(), lengths))
        ]
        entries = [self.cache.get(key) if self.cache else None for key in keys]
        missing = [j for j, entry in enumerate(entries) if entry is None]
        if missing:
            features = self.model.skip2lora_features(input_ids[missing, : max(lengths[j] for j in missing)])
            self.backbone_samples += len(missing)
            for row, j in enumerate(missing):
                entries[j] = self.entry(features, row, labels[j], lengths[j])
                if self.cache:
                    self.cache.put(keys[j], entries[j])
        return self.collate(entries)

    def entry(self, features: Features, row: int, labels: torch.Tensor, length: int) -> Entry:
        """One sample's tail input: every real position, or for a position-wise tail only the supervised ones."""
        targets = torch.full((length,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        targets[:-1] = labels[1:length]
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1) if self.position_wise else slice(0, length)
        entry = {
            "taps": torch.stack([t[row, keep] for t in features.taps]),
            "base": features.base[row, keep],
            "targets": targets[keep],
        }
        if features.probs:
            entry["probs"] = torch.stack([p[row, :, :length, :length] for p in features.probs])
        return {k: v.to(self.dtype) if self.dtype and v.is_floating_point() else v for k, v in entry.items()}

    def collate(self, entries: list[Entry]) -> tuple[Features, torch.Tensor]:
        device = self.fabric.device
        if self.position_wise:  # flat: rows of all samples together, no padding at all
            taps = torch.cat([e["taps"] for e in entries], dim=1).to(device)
            base = torch.cat([e["base"] for e in entries]).to(device)
            return Features(list(taps), base), torch.cat([e["targets"] for e in entries]).to(device)
        pad = partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
        taps = pad([e["taps"].transpose(0, 1) for e in entries]).permute(2, 0, 1, 3).to(device)
        base = pad([e["base"] for e in entries]).to(device)
        features = Features(list(taps), base, [p.to(device) for p in pad_square([e.get("probs") for e in entries])])
        return features, pad([e["targets"] for e in entries], padding_value=IGNORE_INDEX).to(device)


def pad_square(probs: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Per adapter block, the samples' ``(n, H, T, T)`` attention probabilities zero-padded to the longest ``T``."""
    if probs[0] is None:
        return []
    n, heads, longest = probs[0].size(0), probs[0].size(1), max(p.size(-1) for p in probs)
    padded = probs[0].new_zeros(n, len(probs), heads, longest, longest)
    for j, p in enumerate(probs):
        padded[:, j, :, : p.size(-1), : p.size(-1)] = p
    return list(padded)


def save_config(config: Config, directory: Path) -> None:
    """LitGPT's ``model_config.yaml``, with tuples written as lists so that ``yaml.safe_load`` reads them back."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    (directory / "model_config.yaml").write_text(yaml.dump(fields), encoding="utf-8")


def save_final(fabric: L.Fabric, model: GPT, final_dir: Path, checkpoint_dir: Path, data: DataModule) -> None:
    """A self-contained checkpoint: base weights (ordinary LoRA merged) plus the Skip2-LoRA adapters.

    Skip2-LoRA cannot be merged into the base weights: its adapters read block inputs that no single weight
    matrix at the output place sees, so they stay separate modules and load with this package's ``GPT``.
    """
    partial_dir = final_dir.with_name(final_dir.name + ".partial")
    if fabric.global_rank == 0:
        partial_dir.mkdir(parents=True, exist_ok=True)
    litgpt_lora.save_lora_checkpoint(fabric, model, partial_dir / "lit_model.pth.lora")
    if fabric.global_rank == 0:
        merge_lora_weights(model)
        state = {k: v for k, v in model.state_dict().items() if "lora_" not in k or ".skip2lora." in k}
        torch.save(state, partial_dir / "lit_model.pth")
        copy_config_files(checkpoint_dir, partial_dir)
        save_config(dataclasses.replace(model.config, **{flag: False for flag in (*LORA_FLAGS, "lora_head")}), partial_dir)
        save_hyperparameters(setup, partial_dir, known_commands=COMMANDS)
        save_prompt_style(data.prompt_style, partial_dir)
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(partial_dir, final_dir)
        fabric.print(f"Saved the fine-tuned model to {str(final_dir)!r}")
    fabric.barrier()
