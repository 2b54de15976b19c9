"""What the trainable tail's step benchmarks (``benchmarks.dropout``, ``benchmarks.lanes``,
``benchmarks.shared_masks``) do alike: their options, the tail YAML's model with random weights, a sweep's trainer
over it, a batch of the supersense task's shape, the timing of steps after a warm-up, and the results file with each
variant's median."""

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
import yaml
from litgpt.args import EvalArgs, TrainArgs

from benchmarks.end_to_end import METHODS, REPO, block_overrides
from litgpt_skip2lora.adapters import Features
from litgpt_skip2lora.backbone import Batch
from litgpt_skip2lora.model import GPT, Config, mark_trainable
from litgpt_skip2lora.rows import IGNORE_INDEX
from litgpt_skip2lora.sweep import SweepArgs, build_sweep, configuration_configs
from litgpt_skip2lora.training import Trainer
from litgpt_skip2lora.wallclock import WallClock

TAIL_YAML = REPO / "config_hub/finetune/SmolLM2-135M-Instruct" / METHODS["tail"][1]


def parser(description: str) -> argparse.ArgumentParser:
    """Options of a benchmark that times the trainable tail's steps."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="a LitGPT config name")
    parser.add_argument("--n-layer", type=int, help="this many blocks instead of the model's")
    parser.add_argument("--batch", type=int, default=8, help="sequences a micro-batch")
    parser.add_argument("--tokens", type=int, default=48, help="tokens a sequence, the last 3 supervised")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each round")
    parser.add_argument("--steps", type=int, default=10, help="timed steps a round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each variant")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark_results", help="where the results go")
    return parser


def sweep_parser(description: str) -> argparse.ArgumentParser:
    """:func:`parser`'s options and the size of the sweep whose ``Trainer.step`` is timed."""
    parser_ = parser(description)
    parser_.add_argument("--configurations", type=int, default=4, help="configurations a sweep")
    return parser_


def tail_lora() -> dict:
    """The tail YAML's LoRA options."""
    return {k: v for k, v in yaml.safe_load(TAIL_YAML.read_text()).items() if k.startswith("lora_")}


def tail_model(args: argparse.Namespace) -> GPT:
    """The tail YAML's LoRA options and design (:func:`~benchmarks.end_to_end.block_overrides`) on ``args.model``."""
    n_layer = args.n_layer or Config.from_name(args.model).n_layer
    tail = block_overrides("tail", n_layer)
    config = Config.from_name(args.model, n_layer=n_layer, skip2lora_enabled=True, **tail_lora(), **tail)
    model = GPT(config)
    mark_trainable(model)
    for module in model.tail_modules:
        module.train()
    return model


def learning_rates(count: int) -> SweepArgs:
    """A sweep of ``count`` learning rates, 1e-3 apart."""
    return SweepArgs(lr=[0.001 * (k + 1) for k in range(count)])


def sweep_trainer(args: argparse.Namespace, grid: SweepArgs) -> Trainer:
    """A trainer of the ``grid``'s configurations over the tail model, as ``finetune_skip2lora`` builds it."""
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    model = tail_model(args)
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {}}
    constant = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1)  # noqa: E731
    sweep = build_sweep(fabric, model, grid, configuration_configs(model.config, grid), optimizer, 1, constant)
    sweep.set_training(True)
    train = TrainArgs(global_batch_size=args.batch, micro_batch_size=args.batch)
    state = {"sweep": sweep, "iter_num": 0, "step_count": 0}
    return Trainer(fabric, sweep, None, state, train, EvalArgs(), math.inf, 1, args.out, WallClock(fabric.device))


def tail_batch(model: GPT, args: argparse.Namespace) -> tuple[Features, torch.Tensor]:
    """Features of ``args.batch`` random sequences of ``args.tokens`` tokens, and their targets: the last 3 rows."""
    vocab = model.config.padded_vocab_size
    with torch.no_grad():
        features = model.backbone(torch.randint(0, vocab, (args.batch, args.tokens)))
    targets = torch.full((args.batch, args.tokens), IGNORE_INDEX)
    targets[:, -3:] = torch.randint(0, vocab, (args.batch, 3))
    return features, targets


def sweep_batch(trainer: Trainer, args: argparse.Namespace) -> Batch:
    """:func:`tail_batch` as ``Trainer.step`` takes it."""
    features, targets = tail_batch(trainer.model, args)
    return Batch(features, targets, targets.numel(), 0.0)


def timed(step: Callable[[], object], args: argparse.Namespace) -> list[float]:
    """Seconds of each of ``args.steps`` calls of ``step``, after ``args.warmup`` untimed ones."""
    seconds = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def write_results(args: argparse.Namespace, model: GPT, name: str, seconds: dict[str, list[float]], **facts) -> Path:
    """Write ``<out>/<name>-<UTC timestamp>.json``: the setting, every step's seconds, each variant's median and the
    ratio of the second variant's median to the first's."""
    medians = {variant: statistics.median(s) for variant, s in seconds.items()}
    baseline, variant = medians.values()
    result = {
        "model": args.model,
        "n_layer": model.config.n_layer,
        "batch": [args.batch, args.tokens],
        **facts,
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "median_step_s": medians,
        "ratio": variant / baseline,
        "step_s": seconds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"median step: {medians}; ratio {result['ratio']:.4f}; wrote {path}")
    return path
