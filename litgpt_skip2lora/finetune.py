"""finetune_skip2lora: train Skip2-LoRA adapters without ever back-propagating the backbone. Epoch 1 runs the frozen
backbone once per sample and keeps what the tail needs in the Skip-Cache; later epochs run only the tail.
"""

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from inspect import signature
from pathlib import Path
from pprint import pprint
from typing import Literal

import lightning as L
import litgpt.finetune.lora as litgpt_lora
import psutil
import torch
import yaml
from lightning.fabric.plugins import BitsandbytesPrecision
from litgpt.args import EvalArgs, LogArgs, TrainArgs
from litgpt.data import Alpaca, DataModule
from litgpt.generate.base import generate
from litgpt.parser_config import save_hyperparameters
from litgpt.prompts import save_prompt_style
from litgpt.tokenizer import Tokenizer
from litgpt.types import LoggerChoice
from litgpt.utils import (
    auto_download_checkpoint,
    check_valid_checkpoint_dir,
    choose_logger,
    copy_config_files,
    load_checkpoint,
    num_parameters,
    parse_devices,
    select_sft_generate_example,
)
from torch.utils.data import DataLoader

from litgpt_skip2lora import checkpoints, ranks
from litgpt_skip2lora.backbone import cached_backbone
from litgpt_skip2lora.cache import CacheArgs, check_writable
from litgpt_skip2lora.checkpoints import latest_checkpoint
from litgpt_skip2lora.checks import (
    check_batch_split,
    check_json_data,
    check_out_dir,
    check_precision,
    check_quantize,
    check_train_args,
    download_hint,
    optimizer_spec,
    user_errors,
)
from litgpt_skip2lora.model import (
    GPT,
    LORA_FLAGS,
    Config,
    default_blocks,
    default_precision,
    mark_trainable,
    trainable_state,
)
from litgpt_skip2lora.sampler import RankShareSampler
from litgpt_skip2lora.sweep import (
    Configuration,
    Sweep,
    SweepArgs,
    build_sweep,
    check_fits,
    check_sweep,
    configuration_configs,
    configuration_name,
)
from litgpt_skip2lora.sweep_outputs import recorded, save_configuration, save_sweep, select
from litgpt_skip2lora.training import Trainer
from litgpt_skip2lora.wallclock import WallClock, format_report

OUR_SUBCOMMANDS = ["finetune_skip2lora", "finetune"]  # what save_hyperparameters looks for in sys.argv


@dataclass
class Run:
    """Everything ``main`` needs, decided and checked by ``setup`` before any output is written."""

    config: Config  # the model's: a sweep's longest tail
    grid: list[tuple[dict, Config]]
    checkpoint_dir: Path
    out_dir: Path
    data: DataModule
    train: TrainArgs
    eval: EvalArgs
    cache: CacheArgs
    optimizer: dict
    sweep: SweepArgs
    seed: int
    resume_from: Path | None
    precision: str  # what the adapters train in, recorded in final/ for generation
    quantize: str | None


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
    cache: CacheArgs = CacheArgs(),
    sweep: SweepArgs = SweepArgs(),
    data: DataModule | None = None,
    train: TrainArgs = TrainArgs(
        save_interval=1000, log_interval=1, global_batch_size=16, micro_batch_size=1, lr_warmup_steps=100, epochs=5
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
        skip2lora_block_indices: Blocks feeding the adapters (negative from the end); default four spaced from 0.
        skip2lora_output_layer: Where the adapters' sum is added: ``lm_head``, ``ln_f`` or ``block.K``.
        cache: Skip-Cache options.
        sweep: Options swept in one run, each a list: the best combination by validation becomes ``final/``.
        data: A LitGPT data module; the default, Alpaca, downloads. Offline: ``JSON`` or ``WordNetInstruct``.
        train: Training settings (epochs, batch sizes, learning-rate warm-up, save interval, ...).
        log: Logger settings.
        eval: Validation settings.
        optimizer: A torch optimizer name, or a class path with its arguments; ``--optimizer.lr 0.003`` sets one.
        logger_name: Where metrics go: ``csv``, ``tensorboard``, ``wandb``, ``mlflow`` or ``litlogger``.
        seed: Random seed.
        resume: Continue from the newest ``step-*`` checkpoint in ``out_dir`` (written at each epoch's end, every
            ``train.save_interval`` steps and on Ctrl-C or SIGTERM).
        access_token: Hugging Face token, only for downloading a checkpoint.
    """
    world_size = parse_devices(devices) * num_nodes
    with user_errors():
        check_precision(precision)
        check_batch_split(train, world_size)
        checkpoint_dir = auto_download_checkpoint(model_name=checkpoint_dir, access_token=access_token)
    data = Alpaca() if data is None else data
    optimizer = optimizer_spec(optimizer)
    if not skip2lora_enabled:  # LitGPT's own LoRA, given the arguments it takes
        lora_args = signature(litgpt_lora.setup).parameters
        return litgpt_lora.setup(**{name: value for name, value in locals().items() if name in lora_args})
    lora = dict(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_head=lora_head)
    lora.update(zip(LORA_FLAGS, (lora_query, lora_key, lora_value, lora_projection, lora_mlp)))
    with user_errors():
        check_valid_checkpoint_dir(checkpoint_dir, raise_error=True)
        check_train_args(train, eval)
        check_sweep(sweep, eval.final_validation, precision)
        check_quantize(quantize, precision)
        options = Config.from_file(
            checkpoint_dir / "model_config.yaml",
            **lora,
            skip2lora_block_indices=skip2lora_block_indices or checkpoint_blocks(checkpoint_dir),
            skip2lora_output_layer=skip2lora_output_layer,
        )
        grid = configuration_configs(options, sweep)
        config = min((c for _, c in grid), key=lambda c: c.skip2lora_tail_start)  # the model's: the longest tail
        check_json_data(data)
        if cache.enabled and cache.placement in ("auto", "disk"):
            check_writable(cache.directory or out_dir / "skip_cache")
        resume_from = resumed_checkpoint(out_dir, grid, world_size) if resume else None
        check_out_dir(out_dir)  # last: it creates the folder
    hidden = ("lora", "config", "options", "grid", "resume_from", "world_size")
    pprint({k: v for k, v in locals().items() if k not in hidden})
    precision = precision or default_precision()
    run = Run(**{name: value for name, value in locals().items() if name in Run.__dataclass_fields__})
    plugins = None
    if quantize is not None:  # the run records the precision it trains in; Fabric takes the plugin's
        plugins, precision = bitsandbytes_plugin(quantize, precision), None
    name, log_args = f"finetune-skip2lora-{config.name}", dataclasses.asdict(log)
    logger = choose_logger(logger_name, out_dir, name=name, log_interval=train.log_interval, log_args=log_args)
    strategy, devices = "ddp" if world_size > 1 else "auto", parse_devices(devices)
    fabric = L.Fabric(
        devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, loggers=logger, plugins=plugins
    )
    fabric.launch(main, run)


def resumed_checkpoint(out_dir: Path, grid: list[tuple[dict, Config]], world_size: int) -> Path:
    """The step checkpoint ``--resume true`` continues from, refused in one line when none fits."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume true, but {str(out_dir)!r} holds no step-*/state.pth to resume from.")
    checkpoints.check_resumable(checkpoint, [configuration_name(values) for values, _ in grid], world_size)
    return checkpoint


def bitsandbytes_plugin(quantize: str, precision: str) -> BitsandbytesPrecision:
    """Fabric's plugin that stores the frozen weights as ``quantize`` says and computes in ``precision``'s dtype."""
    dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}[precision]
    return BitsandbytesPrecision(quantize.removeprefix("bnb."), dtype)


def main(fabric: L.Fabric, run: Run) -> None:
    clock = WallClock(fabric.device)
    parent = ranks.watch(fabric)
    tokenizer = Tokenizer(run.checkpoint_dir)
    train_loader, val_loader = get_dataloaders(fabric, run.data, tokenizer, run.train, run.seed)
    accum = run.train.gradient_accumulation_iters(fabric.world_size, 1)  # micro-batches per optimizer step
    max_steps = min(run.train.epochs * max(1, len(train_loader) // accum), run.train.max_steps or math.inf)

    fabric.seed_everything(run.seed)
    with fabric.init_module(empty_init=True):
        model = GPT(run.config)
    mark_trainable(model)
    load_checkpoint(fabric, model, run.checkpoint_dir / "lit_model.pth", strict=False)
    model.max_seq_length = min(run.config.block_size, run.train.max_seq_length or run.config.block_size)
    fabric.setup_module(model)  # placed and converted for the precision; the loop averages gradients itself
    warmup = max(1, min(run.train.lr_warmup_steps or 0, max_steps - 1))
    schedule = partial(lr_schedule, warmup_steps=warmup, max_steps=max(max_steps, warmup + 1), min_lr=run.train.min_lr)
    sweep = build_sweep(fabric, model, run.sweep, run.grid, run.optimizer, run.seed, schedule)
    with user_errors(), fabric.autocast():  # the head's path depends on the dtype it computes in
        check_fits(sweep, run.train.micro_batch_size * model.max_seq_length, free_memory(fabric.device))
    fabric.print(f"Number of trainable parameters: {describe_trainable(sweep)}")
    fabric.print(f"Number of non-trainable parameters: {num_parameters(model, requires_grad=False):,}")
    state = {"sweep": sweep, "iter_num": 0, "step_count": 0, "rng": None, "gradients": None}
    if run.resume_from is not None:
        checkpoints.load(fabric, run.resume_from, state)

    backbone = cached_backbone(fabric, sweep, run.cache, run.out_dir, run.checkpoint_dir, run.quantize, train_loader)
    trainer = Trainer(fabric, sweep, backbone, state, run.train, run.eval, max_steps, accum, run.out_dir, clock)
    clock.started()
    try:
        finished = trainer.fit(train_loader, val_loader)
    except RuntimeError:  # a collective fails when a rank is gone: say which, in one line
        ranks.stop_if_lost(fabric, parent)
        raise
    finally:
        backbone.close()
    if not finished:
        command = " ".join(["litgpt-skip2lora", *sys.argv[1:]]) if sys.argv[1:2] else "the same command"
        fabric.print(f"Interrupted; a checkpoint is saved. Resume with: {command} --resume true")
        raise SystemExit(130)
    with clock.phase("final_save"):
        chosen = select(fabric, sweep, run.data, tokenizer)
        final_dir = save_final(fabric, model, chosen, run)
        if sweep.is_sweep:
            save_sweep(fabric, sweep, chosen, run.precision, final_dir)
    report_wall_clock(fabric, clock, state["iter_num"])
    if fabric.global_rank == 0:
        fabric.print(f"Saved the fine-tuned model to {str(final_dir)!r}")
        print_greedy_answer(fabric, model, tokenizer, run.eval, run.data)


def print_greedy_answer(fabric: L.Fabric, model: GPT, tokenizer: Tokenizer, eval: EvalArgs, data: DataModule) -> None:
    """The tuned model's greedy answer to LitGPT's example prompt (LitGPT samples at temperature 0.8, which on a
    small model often trails off into repeated tokens)."""
    instruction = select_sft_generate_example(eval, data)
    encoded = tokenizer.encode(data.prompt_style.apply(instruction), device=fabric.device)
    if len(encoded) + eval.max_new_tokens > model.max_seq_length:
        fabric.print(f"No example answer: the prompt and eval.max_new_tokens exceed {model.max_seq_length} tokens.")
        return
    model.eval()
    with fabric.init_tensor():
        model.set_kv_cache(batch_size=1)
    output = generate(model, encoded, len(encoded) + eval.max_new_tokens, top_k=1, eos_id=tokenizer.eos_id)
    model.clear_kv_cache()
    answer = tokenizer.decode(output[len(encoded) :]).strip()
    fabric.print(f"The tuned model's greedy answer to {instruction!r}:\n{answer}\n")


def free_memory(device: torch.device) -> int:
    """Bytes free where training runs: the GPU's free memory, or the host's available RAM."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available


def describe_trainable(sweep: Sweep) -> str:
    """What each configuration trains, once when they all train alike, and for a sweep what they train together."""
    counts = {c.name: sum(p.numel() for p in c.parameters()) for c in sweep.configurations}
    if not sweep.is_sweep:
        return f"{counts['run']:,}"
    if len(set(counts.values())) == 1:
        each = f"{next(iter(counts.values())):,} per configuration"
    else:
        each = "; ".join(f"{name} {count:,}" for name, count in counts.items())
    return f"{each}; {len(counts)} configurations, {sum(counts.values()):,} in all"


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr: float | None):
    """LitGPT's LoRA schedule, a linear warm-up then cosine annealing, down to ``min_lr`` (LitGPT's ends at 0)."""
    warm = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / warmup_steps)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps - warmup_steps, eta_min=min_lr or 0)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup_steps])


def report_wall_clock(fabric: L.Fabric, clock: WallClock, step: int) -> None:
    """Print and log where the run's time went, and close the loggers so that every row is on disk."""
    seconds = clock.report()
    fabric.print(f"Wall-clock time since the process started:\n{format_report(seconds)}")
    fabric.log_dict({f"wall_{name}": value for name, value in seconds.items()}, step=step)
    for logger in fabric.loggers:
        logger.finalize("success")


def checkpoint_blocks(checkpoint_dir: Path) -> list[int]:
    """The default blocks (:func:`default_blocks`) of the checkpoint's model."""
    return default_blocks(yaml.safe_load((checkpoint_dir / "model_config.yaml").read_text())["n_layer"])


def collate_with_lengths(samples: list[dict], collate_fn) -> dict:
    """LitGPT's padded batch, plus each sample's real length: the Skip-Cache keys and stores real positions only."""
    batch = collate_fn(samples)
    batch["length"] = torch.tensor([len(s["input_ids"]) for s in samples]).clamp(max=batch["input_ids"].size(1))
    return batch


def get_dataloaders(
    fabric: L.Fabric, data: DataModule, tokenizer: Tokenizer, train: TrainArgs, seed: int
) -> tuple[DataLoader, DataLoader]:
    """The data module's loaders, with sample lengths in each batch, sampling each rank's share for the whole run."""
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


def save_final(fabric: L.Fabric, model: GPT, chosen: Configuration, run: Run) -> Path:
    """A self-contained checkpoint of the chosen configuration, unmerged: the adapters read block inputs that no
    weight at the output place sees, and a 4-bit backbone has no matrix to merge into. A quantized run's float
    weights come from the checkpoint file. It loads with this package's ``GPT``."""
    chosen.install(model)
    final_dir = free_final_dir(run.out_dir)
    with checkpoints.atomic_directory(final_dir, fabric) as partial_dir:
        if fabric.global_rank == 0:
            trained, other = chosen.trained_state(), trainable_state(model)  # other: a longer tail's LoRA layers
            if run.quantize is None:
                state = {k: v for k, v in model.state_dict().items() if k in trained or k not in other}
            else:
                state = torch.load(run.checkpoint_dir / "lit_model.pth", mmap=True, weights_only=True)
                state.update({k: v.detach().cpu() for k, v in trained.items()})
            torch.save(state, partial_dir / "lit_model.pth")
            copy_config_files(run.checkpoint_dir, partial_dir)
            save_hyperparameters(setup, partial_dir, known_commands=OUR_SUBCOMMANDS)
            saved = yaml.safe_load((partial_dir / "hyperparameters.yaml").read_text(encoding="utf-8"))
            save_configuration(chosen, recorded(saved, chosen, run.precision), partial_dir)
            save_prompt_style(run.data.prompt_style, partial_dir)
    return final_dir


def free_final_dir(out_dir: Path) -> Path:
    """``final``, or when an earlier run's ``final`` is there, the first free ``final-N``: nothing is replaced."""
    final, n = out_dir / "final", 1
    while final.exists():
        final, n = out_dir / f"final-{n}", n + 1
    if n > 1:
        warnings.warn(f"{str(out_dir / 'final')!r} holds an earlier run's model; this run's goes to {str(final)!r}.")
    return final
