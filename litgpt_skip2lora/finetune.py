"""finetune_skip2lora: train Skip2-LoRA adapters without ever back-propagating the backbone, with the Skip-Cache.

Epoch 1 runs the frozen backbone once per sample (under ``no_grad``) and stores what the tail needs; every later
visit of a sample reads it back and runs only the adapters, the head and the loss. LitGPT's machinery is reused:
data modules, ``TrainArgs``/``EvalArgs``, loggers, ``chunked_cross_entropy``, ``get_lr_scheduler``, checkpoints.
"""

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from inspect import signature
from pathlib import Path
from pprint import pprint
from typing import Literal

import lightning as L
import litgpt.finetune.lora as litgpt_lora
import requests
import torch
import yaml
from lightning.fabric.plugins import BitsandbytesPrecision
from litgpt.args import EvalArgs, LogArgs, TrainArgs
from litgpt.data import JSON, Alpaca, DataModule
from litgpt.lora import LoRALayer, lora_filter, mark_only_lora_as_trainable
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
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from litgpt_skip2lora.cache import (
    IGNORE_INDEX,
    STORAGE_DTYPES,
    Batch,
    CacheArgs,
    FeatureLoader,
    SkipCache,
    check_writable,
    choose_placement,
    file_digest,
    open_store,
)
from litgpt_skip2lora.model import GPT, LORA_FLAGS, Config, Features, spaced_blocks
from litgpt_skip2lora.sampler import RankShareSampler
from litgpt_skip2lora.wallclock import WallClock, format_report

OUR_SUBCOMMANDS = ["finetune_skip2lora", "finetune"]  # what save_hyperparameters looks for in sys.argv


@dataclass
class Run:
    """Everything ``main`` needs, decided and checked by ``setup`` before any output is written."""

    config: Config
    checkpoint_dir: Path
    out_dir: Path
    data: DataModule
    train: TrainArgs
    eval: EvalArgs
    cache: CacheArgs
    optimizer: str | dict
    accum: int
    """Micro-batches per optimizer step."""
    seed: int
    resume: Path | None
    """The step checkpoint to continue from."""
    precision: str
    """The precision the adapters train in, recorded in ``final/`` for generation."""
    quantize: str | None
    command: str
    """How this run was started, for the message that says how to resume it."""


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/skip2lora"),
    precision: str | None = None,
    quantize: Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8", "bnb.int8-training"] | None = None,
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
    skip2lora_side_width: int = 0,
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

    Args:
        checkpoint_dir: The LitGPT checkpoint folder of the pretrained model.
        out_dir: Where logs, step checkpoints, the Skip-Cache (disk placement) and ``final/`` go.
        precision: ``32-true``, ``bf16-true``, ``16-true``, ...; default bf16-true on a GPU that has it, else 32-true.
        quantize: Store the frozen weights in 4 or 8 bits with bitsandbytes (a CUDA GPU is needed).
        devices: How many devices to train on (DDP when more than one).
        num_nodes: How many machines.
        lora_r: Rank of every adapter (Skip2-LoRA's and ordinary LoRA's).
        lora_alpha: Scaling numerator: adapters are scaled by ``lora_alpha / lora_r``.
        lora_dropout: Dropout on the adapters' inputs while training.
        lora_query: Ordinary LoRA on the attention query, in the tail's blocks (``block.K`` places only).
        lora_key: Ordinary LoRA on the attention key, in the tail's blocks.
        lora_value: Ordinary LoRA on the attention value, in the tail's blocks.
        lora_projection: Ordinary LoRA on the attention output projection, in the tail's blocks.
        lora_mlp: Ordinary LoRA on the MLP, in the tail's blocks.
        lora_head: Ordinary LoRA on ``lm_head``.
        skip2lora_enabled: Train Skip2-LoRA adapters. With ``false`` this runs LitGPT's own ``finetune_lora``.
        skip2lora_block_indices: Blocks whose input feeds an adapter (negative counts from the end). Default: four
            evenly spaced blocks, the first being 0.
        skip2lora_output_layer: Where the adapters' sum is added: ``lm_head``, ``ln_f`` or ``block.K``.
        skip2lora_side_width: 0 for adapters; else the width of a side network that reads the inputs of the
            ``skip2lora_block_indices`` blocks (one narrow attention block each) and re-reads the whole prompt. The
            Skip-Cache stores this many channels per read block and token. Each side block starts as its backbone
            block cut down to the most important channels, heads and MLP units. ``lora_*`` settings do not apply.
        cache: Skip-Cache options.
        data: A LitGPT data module. The default, Alpaca, is downloaded from the internet; offline, use
            ``litgpt_skip2lora.data.WordNetInstruct`` or ``JSON`` with ``--data.json_path``.
        train: Training settings (epochs, batch sizes, learning-rate warm-up, save interval, ...).
        log: Logger settings.
        eval: Validation settings.
        optimizer: A torch optimizer name, or a class path with its arguments.
        logger_name: Where metrics go: ``csv``, ``tensorboard``, ``wandb``, ``mlflow`` or ``litlogger``.
        seed: Random seed.
        resume: Continue from the newest ``step-*`` checkpoint in ``out_dir`` (one is written at every epoch's end,
            every ``train.save_interval`` steps and on Ctrl-C or SIGTERM).
        access_token: Hugging Face token, only for downloading a checkpoint.
    """
    with user_errors():
        checkpoint_dir = auto_download_checkpoint(model_name=checkpoint_dir, access_token=access_token)
    data = Alpaca() if data is None else data
    if not skip2lora_enabled:  # LitGPT's own LoRA, given the arguments it takes
        lora_args = signature(litgpt_lora.setup).parameters
        return litgpt_lora.setup(**{name: value for name, value in locals().items() if name in lora_args})
    lora = dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_head=lora_head)
    lora.update(zip(LORA_FLAGS, (lora_query, lora_key, lora_value, lora_projection, lora_mlp)))
    with user_errors():
        check_valid_checkpoint_dir(checkpoint_dir, raise_error=True)
        check_train_args(train, eval)
        check_quantize(quantize, precision, skip2lora_side_width)
        config = Config.from_file(
            checkpoint_dir / "model_config.yaml",
            **lora,
            skip2lora_enabled=True,
            skip2lora_block_indices=skip2lora_block_indices or default_blocks(checkpoint_dir),
            skip2lora_output_layer=skip2lora_output_layer,
            skip2lora_side_width=skip2lora_side_width,
        )
        check_json_data(data)
        if cache.enabled and cache.placement in ("auto", "disk"):
            check_writable(cache.directory or out_dir / "skip_cache")
        checkpoint = latest_checkpoint(out_dir) if resume else None
        if resume and checkpoint is None:
            raise FileNotFoundError(f"--resume true, but {str(out_dir)!r} holds no step-*/state.pth to resume from.")
        check_out_dir(out_dir)  # last: it creates the folder
    pprint({k: v for k, v in locals().items() if k not in ("lora", "config", "checkpoint")})  # each argument once
    devices = parse_devices(devices)
    precision = precision or (
        "bf16-true" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    )
    plugins, trained_in = None, precision
    if quantize is not None:
        dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}[precision]
        plugins, precision = BitsandbytesPrecision(quantize[4:], dtype), None
    name, log_args = f"finetune-skip2lora-{config.name}", dataclasses.asdict(log)
    logger = choose_logger(logger_name, out_dir, name=name, log_interval=train.log_interval, log_args=log_args)
    strategy = "ddp" if devices * num_nodes > 1 else "auto"
    fabric = L.Fabric(
        devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, loggers=logger, plugins=plugins
    )
    command = " ".join(["litgpt-skip2lora", *sys.argv[1:]]) if sys.argv[1:2] else "the same command"
    accum = train.gradient_accumulation_iters(devices, num_nodes)
    run = Run(
        config,
        checkpoint_dir,
        out_dir,
        data,
        train,
        eval,
        cache,
        optimizer,
        accum,
        seed,
        checkpoint,
        trained_in,
        quantize,
        command,
    )
    fabric.launch(main, run)


def main(fabric: L.Fabric, run: Run) -> None:
    clock = WallClock(fabric.device)
    tokenizer = Tokenizer(run.checkpoint_dir)
    train_loader, val_loader = get_dataloaders(fabric, run.data, tokenizer, run.train, run.seed)
    max_steps = min(run.train.epochs * max(1, len(train_loader) // run.accum), run.train.max_steps or math.inf)

    fabric.seed_everything(run.seed)
    with fabric.init_module(empty_init=fabric.world_size > 1):
        model = GPT(run.config)
    mark_only_lora_as_trainable(model)
    fabric.print(f"Number of trainable parameters: {num_parameters(model, requires_grad=True):,}")
    fabric.print(f"Number of non-trainable parameters: {num_parameters(model, requires_grad=False):,}")
    load_checkpoint(fabric, model, run.checkpoint_dir / "lit_model.pth", strict=False)
    if fabric.world_size > 1:  # empty_init left the LoRA weights, which no checkpoint holds, uninitialised
        for module in model.modules():
            if isinstance(module, LoRALayer):
                module.reset_parameters()
    model.initialize_side()
    model.max_seq_length = min(run.config.block_size, run.train.max_seq_length or run.config.block_size)

    fabric_model = fabric.setup_module(model)
    fabric_model.mark_forward_method("tail")
    opt = fabric.setup_optimizers(
        instantiate_torch_optimizer(run.optimizer, [p for p in model.parameters() if p.requires_grad])
    )
    warmup = max(1, min(run.train.lr_warmup_steps or 0, max_steps - 1))  # LitGPT's scheduler divides by zero at 0
    scheduler = litgpt_lora.get_lr_scheduler(opt, warmup_steps=warmup, max_steps=max(max_steps, warmup + 1))

    features = feature_loader(fabric, model, run, train_loader)
    state = {"model": model, "optimizer": opt, "scheduler": scheduler, "iter_num": 0, "step_count": 0, "rng": None}
    if run.resume is not None:
        fabric.load(run.resume, state, strict=False)  # the checkpoint holds the trained parameters only
        fabric.print(f"Resumed from {str(run.resume)!r} (step {state['step_count']})")
    trainer = Trainer(
        fabric,
        fabric_model,
        model,
        opt,
        scheduler,
        features=features,
        train=run.train,
        eval=run.eval,
        accum=run.accum,
        max_steps=max_steps,
        state=state,
        out_dir=run.out_dir,
        clock=clock,
    )
    clock.started()
    try:
        finished = trainer.fit(train_loader, val_loader)
    finally:
        features.close()
    if not finished:
        fabric.print(f"Interrupted; a checkpoint is saved. Resume with: {run.command} --resume true")
        raise SystemExit(130)
    with clock.phase("final_save"):
        final_dir = save_final(fabric, model, run)
    report_wall_clock(fabric, clock, state["iter_num"])
    if fabric.global_rank == 0:
        fabric.print(f"Saved the fine-tuned model to {str(final_dir)!r}")
        litgpt_lora.generate_example(fabric, model, tokenizer, run.eval, run.data)


def report_wall_clock(fabric: L.Fabric, clock: WallClock, step: int) -> None:
    """Print and log where the run's time went, and close the loggers so that every row is on disk."""
    seconds = clock.report()
    fabric.print(f"Wall-clock time since the process started:\n{format_report(seconds)}")
    fabric.log_dict({f"wall_{name}": value for name, value in seconds.items()}, step=step)
    for logger in fabric.loggers:
        logger.finalize("success")


def feature_loader(fabric: L.Fabric, model: GPT, run: Run, train_loader: DataLoader) -> FeatureLoader:
    """The training loop's source of features, with the Skip-Cache placed where the whole of it fits best."""
    dtype = model.transformer.wte.weight.dtype
    position_wise = model.config.skip2lora_position_wise
    cache = None
    if not run.cache.enabled:
        fabric.print("Skip-Cache: off (--cache.enabled false); every step runs the backbone.")
    elif model.backbone_requires_grad():
        warnings.warn("Ordinary LoRA trains blocks before the Skip2-LoRA output place: the Skip-Cache is off.")
    else:
        stored = STORAGE_DTYPES.get(run.cache.dtype) or dtype
        estimate = estimate_bytes(train_loader.dataset, model.config, stored, position_wise)
        max_bytes = None if run.cache.max_size_gb is None else int(run.cache.max_size_gb * 1e9)
        placement, why = choose_placement(run.cache.placement, estimate, fabric.device, max_bytes)
        fabric.print(f"Skip-Cache: {placement} ({why}; about {estimate / 1e9:.2f} GB for the training set).")
        directory = run.cache.directory or run.out_dir / "skip_cache"
        stamp = fingerprint(run, fabric, model.config)
        with fabric.rank_zero_first():
            store = open_store(placement, fabric.device, directory, stamp)
        cache = SkipCache(store, max_bytes, STORAGE_DTYPES.get(run.cache.dtype))
    return FeatureLoader(model.features, cache, fabric.device, dtype, position_wise, run.cache.prefetch)


def fingerprint(run: Run, fabric: L.Fabric, config: Config) -> dict:
    """Everything the cached activations depend on; a cache built for anything else is rebuilt."""
    return {
        "checkpoint": file_digest(run.checkpoint_dir / "lit_model.pth"),
        "tokenizer": {p.name: file_digest(p) for p in sorted(run.checkpoint_dir.glob("tokenizer*"))},
        "config": {k: v for k, v in dataclasses.asdict(config).items() if not k.startswith("lora_")},
        "precision": getattr(fabric.strategy.precision, "precision", type(fabric.strategy.precision).__name__),
        "quantize": run.quantize,  # a 4-bit backbone's activations differ from a bf16 one's
        "dtype": run.cache.dtype,
    }


def estimate_bytes(dataset: Dataset, config: Config, dtype: torch.dtype, position_wise: bool, sample: int = 256) -> int:
    """The training set's cache size, from the rows of up to ``sample`` samples (tokenising them is cheap)."""
    taken = [dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // sample))]
    if not taken:
        return 0
    rows = [int((s["labels"][1:] != IGNORE_INDEX).sum()) if position_wise else len(s["input_ids"]) for s in taken]
    per_row = (len(config.skip2lora_block_indices) * config.skip2lora_tap_width + config.n_embd) * dtype.itemsize + 8
    return int(sum(rows) / len(rows) * len(dataset) * per_row)


def default_blocks(checkpoint_dir: Path) -> list[int]:
    """Four evenly spaced blocks starting at 0, e.g. [0, 8, 16, 24] for 32 layers."""
    return spaced_blocks(4, yaml.safe_load((checkpoint_dir / "model_config.yaml").read_text())["n_layer"])


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Marks the errors raised inside as the user's: the CLI prints them as one line, without a traceback."""
    try:
        yield
    except Exception as err:
        err.user_error = True
        raise


def check_train_args(train: TrainArgs, eval: EvalArgs) -> None:
    if not train.epochs and not train.max_steps:
        raise ValueError(f"--train.epochs must be at least 1 (or set --train.max_steps); got epochs={train.epochs}.")
    if eval.max_new_tokens is None:
        raise ValueError("--eval.max_new_tokens must be set.")
    for name in ("max_tokens", "max_norm", "tie_embeddings", "lr_warmup_fraction"):
        if getattr(train, name) is not None:
            raise ValueError(f"finetune_skip2lora does not support --train.{name}; leave it unset.")


def check_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and write in it once, so that a path that cannot hold the run fails before the model loads
    (a permission check alone passes for root in places like ``/proc``)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise ValueError(f"--out_dir {str(out_dir)!r} cannot be created or written: {err.strerror}.") from None


def check_json_data(data: DataModule) -> None:
    """A ``JSON`` data set's files must parse: say which file and where, before the model loads."""
    if not isinstance(data, JSON):
        return
    path = Path(data.json_path)
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.json*") if p.stem in ("train", "val"))
    for file in files:
        text = file.read_text(encoding="utf-8")
        documents = text.splitlines() if file.suffix == ".jsonl" else [text]  # JSON Lines: one document a line
        for number, document in enumerate(documents, start=1):
            try:
                json.loads(document)
            except json.JSONDecodeError as err:
                line = number if file.suffix == ".jsonl" else err.lineno
                raise ValueError(f"{file}: invalid JSON at line {line}, column {err.colno}: {err.msg}.") from None


@contextlib.contextmanager
def download_hint(data: DataModule) -> Iterator[None]:
    """A data module that downloads (LitGPT's default ``Alpaca`` does) fails offline: say how to pass local data."""
    try:
        yield
    except requests.exceptions.RequestException as err:
        raise ConnectionError(
            f"--data {type(data).__name__} downloads its data, which failed ({type(err).__name__}). Without internet,"
            " pass local data: --data JSON --data.json_path FILE, or --data litgpt_skip2lora.data.WordNetInstruct."
        ) from None


def check_quantize(quantize: str | None, precision: str | None, side_width: int) -> None:
    """bitsandbytes quantizes on CUDA GPUs only, its int8 layers compute in float16: say so before anything starts."""
    if quantize is None:
        return
    if side_width:  # bitsandbytes would quantize the side network's own layers too
        raise ValueError(f"--quantize {quantize} does not support a side network (--skip2lora_side_width) yet.")
    if quantize.startswith("bnb.int8") and precision != "16-true":
        raise ValueError(f"--quantize {quantize} computes in float16: add --precision 16-true.")
    if not torch.cuda.is_available():
        raise ValueError(f"--quantize {quantize} needs a CUDA GPU (bitsandbytes); none is available here.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--quantize {quantize} needs bitsandbytes: pip install bitsandbytes")


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(out_dir.glob("step-*/state.pth"))
    return found[-1] if found else None


def collate_with_lengths(samples: list[dict], collate_fn) -> dict:
    """LitGPT's padded batch, plus each sample's real length: the Skip-Cache keys and stores real positions only."""
    batch = collate_fn(samples)
    batch["length"] = torch.tensor([len(s["input_ids"]) for s in samples]).clamp(max=batch["input_ids"].size(1))
    return batch


def get_dataloaders(
    fabric: L.Fabric, data: DataModule, tokenizer: Tokenizer, train: TrainArgs, seed: int
) -> tuple[DataLoader, DataLoader]:
    """The data module's datasets and collation, with sample lengths added to each batch, and samplers that keep
    each rank's share of the samples for the whole run (:mod:`litgpt_skip2lora.sampler`)."""
    data.connect(tokenizer=tokenizer, batch_size=train.micro_batch_size, max_seq_length=train.max_seq_length)
    with fabric.rank_zero_first(), user_errors(), download_hint(data):
        data.prepare_data()
    data.setup()
    loaders = []
    for loader, shuffle in ((data.train_dataloader(), True), (data.val_dataloader(), False)):
        collate = partial(collate_with_lengths, collate_fn=loader.collate_fn)
        sampler = RankShareSampler(len(loader.dataset), fabric.world_size, fabric.global_rank, shuffle, seed)
        options = dict(sampler=sampler, num_workers=loader.num_workers, collate_fn=collate)
        loaders.append(DataLoader(loader.dataset, loader.batch_size, **options))
    return fabric.setup_dataloaders(*loaders, use_distributed_sampler=False)


class Trainer:
    """The training loop: each batch's features from the ``FeatureLoader``, then the tail, loss and optimizer step."""

    def __init__(
        self,
        fabric: L.Fabric,
        fabric_model,
        model: GPT,
        optimizer,
        scheduler,
        *,
        features: FeatureLoader,
        train: TrainArgs = TrainArgs(),
        eval: EvalArgs = EvalArgs(),
        accum: int = 1,
        max_steps: float = math.inf,
        state: dict | None = None,
        out_dir: Path | None = None,
        clock: WallClock | None = None,
    ) -> None:
        self.fabric, self.fabric_model, self.model = fabric, fabric_model, model
        self.optimizer, self.scheduler, self.features = optimizer, scheduler, features
        self.train, self.eval, self.accum, self.max_steps = train, eval, accum, max_steps
        self.state = {"iter_num": 0, "step_count": 0, "rng": None} if state is None else state
        self.out_dir, self.clock = out_dir, clock or WallClock(fabric.device)
        self.replay = self.state["iter_num"]  # iterations a resumed run passes over without computing
        self.interrupted = False  # set by SIGINT or SIGTERM: stop after the current step
        self.t_start = self.iter_t0 = time.perf_counter()  # the run's and the current iteration's start

    def fit(self, train_loader: DataLoader, val_loader: DataLoader) -> bool:
        """Train every epoch; False when a signal stopped it (a resumable checkpoint is then saved)."""
        fabric, state = self.fabric, self.state
        self.model.eval()  # the frozen part never drops out; validation switches the tail to training mode after it
        when = f"at resume (step {state['step_count']})" if self.replay else "before training"
        summary = [f"Validation loss {when}: {self.log_validation(val_loader):.4f}"]
        fabric.print(summary[0])
        self.t_start = time.perf_counter()
        with stop_on_signals(self):
            for epoch in range(self.train.epochs):
                epoch_t0, backbone_before = time.perf_counter(), self.features.backbone_samples
                with self.clock.phase("epoch_1" if epoch == 0 else "later_epochs"):
                    iters = self.run_epoch(train_loader, val_loader, epoch)
                if self.interrupted:
                    self.save_checkpoint()
                    return False
                if not iters:
                    continue
                elapsed, ran = time.perf_counter() - epoch_t0, self.features.backbone_samples - backbone_before
                how = f"{ran} samples through the backbone" if ran else "tail only, every sample from the Skip-Cache"
                summary.append(f"Epoch {epoch + 1}: {elapsed:.2f} s, {elapsed / iters * 1000:.1f} ms/iter ({how})")
                fabric.print(summary[-1])
                metrics = {"epoch_time": elapsed, "epoch": epoch + 1, **self.rank_counts()}
                fabric.log_dict(metrics, step=state["iter_num"])
                self.save_checkpoint()
                self.features.warn_if_reads_are_slow()
        val_loss = self.log_validation(val_loader)
        fabric.log_dict(self.rank_counts(), step=state["iter_num"])
        summary.append(f"Validation loss after training: {val_loss:.4f} | val ppl: {math.exp(val_loss):.3f}")
        fabric.print("\n".join(["", "Summary", *summary]))
        return True

    def run_epoch(self, train_loader: DataLoader, val_loader: DataLoader, epoch: int) -> int:
        """One pass over the training data; returns the number of iterations it ran."""
        state, train, iters = self.state, self.train, 0
        batches, skip = iter(train_loader), min(self.replay, len(train_loader))
        for _ in range(skip):  # resuming: replay the sampler without computing, then restore the RNG as saved
            next(batches)
        self.replay -= skip
        if skip and not self.replay:
            self.restore_rng()
        deadline = self.t_start + (train.max_time or math.inf)
        desc = f"Epoch {epoch + 1}/{train.epochs} [{self.features.describe()}]"
        bar = tqdm(
            total=len(train_loader), initial=skip, desc=desc, dynamic_ncols=True, disable=self.fabric.global_rank > 0
        )
        self.iter_t0 = time.perf_counter()  # like LitGPT's iter_time: batch loading and optimizer step included
        for batch in self.features.batches(batches, "train"):
            if state["step_count"] >= self.max_steps or time.perf_counter() > deadline:
                break
            loss = self.training_step(batch)
            iters += 1
            bar.update()
            stepped = state["iter_num"] % self.accum == 0
            if stepped:
                self.optimizer_step()
            if state["iter_num"] % train.log_interval == 0:
                self.log(loss, batch, epoch, bar)
            if stepped:
                self.evaluate_and_save(val_loader)
                if self.interrupted:
                    break
            self.iter_t0 = time.perf_counter()
        bar.close()
        return iters

    def training_step(self, batch: Batch) -> torch.Tensor:
        self.state["iter_num"] += 1
        accumulating = self.state["iter_num"] % self.accum != 0
        with self.fabric.no_backward_sync(self.fabric_model, enabled=accumulating):
            loss = self.loss(self.fabric_model, batch.features, batch.targets)
            self.fabric.backward(loss / self.accum)
        return loss.detach()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.state["step_count"] += 1

    def evaluate_and_save(self, val_loader: DataLoader) -> None:
        step = self.state["step_count"]
        if step % self.eval.interval == 0:
            tqdm.write(f"step {step}: val loss {self.log_validation(val_loader):.4f}")
        if self.train.save_interval and step % self.train.save_interval == 0:
            self.save_checkpoint()

    def rank_counts(self) -> dict[str, int]:
        """Each rank's samples through the backbone and cache hits so far (every rank takes part in the gather)."""
        counts = torch.tensor([self.features.backbone_samples, self.features.cache_hits], device=self.fabric.device)
        gathered = self.fabric.all_gather(counts).reshape(-1, 2).tolist()
        names = ("backbone_samples", "cache_hits")
        return {f"{name}_rank{rank}": row[i] for rank, row in enumerate(gathered) for i, name in enumerate(names)}

    def save_checkpoint(self) -> None:
        """The trained parameters, optimizer, scheduler, counters and RNG: enough to resume exactly, nothing frozen.

        Written under a temporary name and renamed, so a crash never leaves a half-written checkpoint behind.
        """
        if self.out_dir is None:
            return
        with self.clock.phase("checkpoints"):
            self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        # under the one key ``rng``, which ``main`` hands ``fabric.load`` to fill
        self.state["rng"] = self.rng_states()
        path = self.out_dir / f"step-{self.state['step_count']:06d}"
        partial_dir = path.with_name(f".{path.name}.partial")
        self.fabric.save(partial_dir / "state.pth", self.state, filter={"model": lora_filter})
        if self.fabric.global_rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(partial_dir, path)
        self.fabric.barrier()

    def rng_states(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states, one row per rank: each rank's dropout draws numbers of its own, and only rank 0
        writes the checkpoint."""
        fabric = self.fabric
        states = {"cpu": torch.get_rng_state()}
        if fabric.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(fabric.device)
        gathered = {name: fabric.all_gather(state.to(fabric.device)) for name, state in states.items()}
        return {name: rows.reshape(fabric.world_size, -1).cpu() for name, rows in gathered.items()}

    def restore_rng(self) -> None:
        """This rank's RNG states as saved: the tail's dropout continues as if never interrupted."""
        rank, states = self.fabric.global_rank, self.state["rng"]
        torch.set_rng_state(states["cpu"][rank].clone())
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"][rank].clone(), self.fabric.device)

    def log_validation(self, val_loader: DataLoader) -> float:
        with self.clock.phase("validation"):
            val_loss = self.validate(val_loader)
        self.fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)}, step=self.state["iter_num"])
        return val_loss

    def log(self, loss: torch.Tensor, batch: Batch, epoch: int, bar: tqdm) -> None:
        loss_value = loss.item()  # waits for the step's queued GPU work, which LitGPT's LoRA also times
        iter_time = time.perf_counter() - self.iter_t0
        metrics = {
            "loss": loss_value,
            "iter": self.state["iter_num"],
            "step": self.state["step_count"],
            "epoch": epoch + 1,
            "iter_time": iter_time,
            "feature_wait": batch.wait,
            "tokens_per_sec": batch.tokens / iter_time,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "cache_hits": self.features.cache_hits,
            "cache_bytes": self.features.cache.bytes if self.features.cache else 0,
            "backbone_samples": self.features.backbone_samples,
        }
        self.fabric.log_dict(metrics, step=self.state["iter_num"])
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", ms=f"{iter_time * 1000:.0f}", hits=metrics["cache_hits"])

    @torch.no_grad()
    def validate(self, val_loader: DataLoader) -> float:
        """Mean of per-batch losses over the whole validation set, as LitGPT's ``validate`` averages them."""
        self.set_tail_training(False)
        losses = [self.loss(self.model, b.features, b.targets) for b in self.features.batches(val_loader, "val")]
        self.set_tail_training(True)
        mean = torch.stack(losses).mean()
        return self.fabric.all_reduce(mean, reduce_op="mean").item()

    def set_tail_training(self, mode: bool) -> None:
        for module in self.model.tail_modules:
            module.train(mode)

    def loss(self, model, features: Features, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the tail's logits at the supervised positions, the only ones the loss reads."""
        supervised = None if self.model.config.skip2lora_position_wise else targets != IGNORE_INDEX
        logits = model.tail(features, supervised)
        targets = targets if supervised is None else targets[supervised]
        return chunked_cross_entropy(logits, targets, chunk_size=0) if targets.numel() else logits.sum() * 0.0


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT and SIGTERM let the current step finish, then stop training with a resumable checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame) -> None:
        trainer.interrupted = True
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step ...")

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def save_config(config: Config, directory: Path) -> None:
    """LitGPT's ``model_config.yaml``, with tuples written as lists so that ``yaml.safe_load`` reads them back."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    (directory / "model_config.yaml").write_text(yaml.dump(fields), encoding="utf-8")


def save_final(fabric: L.Fabric, model: GPT, run: Run) -> Path:
    """A self-contained checkpoint: the model's weights and every trained parameter, unmerged.

    Nothing is merged: Skip2-LoRA's adapters read block inputs that no single weight matrix at the output place
    sees, and a 4-bit backbone has no matrix to merge a tail's LoRA into; so the adapters stay modules of their
    own. A quantized model cannot give its float weights back: they come from the checkpoint file instead, so
    the result is the same for a bf16 and a 4-bit run. It loads with this package's ``GPT``.
    """
    final_dir = free_final_dir(run.out_dir)
    partial_dir = final_dir.with_name(f".{final_dir.name}.partial")
    if fabric.global_rank == 0:
        partial_dir.mkdir(parents=True, exist_ok=True)
    litgpt_lora.save_lora_checkpoint(fabric, model, partial_dir / "lit_model.pth.lora")
    if fabric.global_rank == 0:
        if run.quantize is None:
            state = model.state_dict()
        else:
            state = torch.load(run.checkpoint_dir / "lit_model.pth", mmap=True, weights_only=True)
            state.update({k: v.detach().cpu() for k, v in model.state_dict().items() if lora_filter(k, v)})
        torch.save(state, partial_dir / "lit_model.pth")
        copy_config_files(run.checkpoint_dir, partial_dir)
        save_config(model.config, partial_dir)
        save_hyperparameters(setup, partial_dir, known_commands=OUR_SUBCOMMANDS)
        record_precision(partial_dir / "hyperparameters.yaml", run.precision)
        save_prompt_style(run.data.prompt_style, partial_dir)
        os.replace(partial_dir, final_dir)
    fabric.barrier()
    return final_dir


def record_precision(hyperparameters: Path, precision: str) -> None:
    """The precision the run trained in, where the command line left it to the default: generation uses it."""
    saved = yaml.safe_load(hyperparameters.read_text(encoding="utf-8"))
    hyperparameters.write_text(yaml.safe_dump({**saved, "precision": precision}, sort_keys=False), encoding="utf-8")


def free_final_dir(out_dir: Path) -> Path:
    """``final``, or when an earlier run's ``final`` is there, the first free ``final-N``: nothing is replaced."""
    final, n = out_dir / "final", 1
    while final.exists():
        final, n = out_dir / f"final-{n}", n + 1
    if n > 1:
        warnings.warn(f"{str(out_dir / 'final')!r} holds an earlier run's model; this run's goes to {str(final)!r}.")
    return final
