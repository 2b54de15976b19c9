"""A sweep's training step on the CPU in one lane against one lane a thread (:mod:`litgpt_skip2lora.lanes`), through
``Trainer.step`` (every configuration's forward, loss, backward and optimizer step): ``--configurations`` learning
rates of the trainable-tail YAML's tail (``skip2lora_tail.yaml``), random weights of the model's shape, a batch of
the supersense task's shape.

Each round times ``--steps`` steps of each way after ``--warmup`` untimed ones; the ways alternate round by round,
so that a slower minute of the machine falls on both. Writes ``<out>/lanes-<UTC timestamp>.json`` with every step's
seconds, each way's median and their ratio::

    python -m benchmarks.lanes
"""

import argparse
import math
from pathlib import Path

import lightning as L
import torch
from litgpt.args import EvalArgs, TrainArgs

from benchmarks import tail_steps
from litgpt_skip2lora.backbone import Batch
from litgpt_skip2lora.lanes import Lanes
from litgpt_skip2lora.sweep import SweepArgs, build_sweep
from litgpt_skip2lora.training import Trainer
from litgpt_skip2lora.wallclock import WallClock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tail_steps.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--configurations", type=int, default=4, help="learning rates swept")
    return parser.parse_args(argv)


def learning_rates(count: int) -> SweepArgs:
    """A sweep of ``count`` learning rates, 1e-3 apart."""
    return SweepArgs(lr=[0.001 * (k + 1) for k in range(count)])


def sweep_trainer(args: argparse.Namespace, grid: SweepArgs) -> Trainer:
    """A trainer of the ``grid``'s configurations over the tail model, as ``finetune_skip2lora`` builds it."""
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    model = tail_steps.tail_model(args)
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {}}
    sweep = build_sweep(fabric, model, grid, optimizer, 1, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1))
    sweep.set_training(True)
    train = TrainArgs(global_batch_size=args.batch, micro_batch_size=args.batch)
    state = {"sweep": sweep, "iter_num": 0, "step_count": 0}
    return Trainer(fabric, sweep, None, state, train, EvalArgs(), math.inf, args.out, WallClock(fabric.device))


def main(args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    trainer = sweep_trainer(args, learning_rates(args.configurations))
    features, targets = tail_steps.tail_batch(trainer.model, args)
    batch = Batch(features, targets, targets.numel(), 0.0)
    ways = {"one lane": Lanes(trainer.model, 1), "one lane a thread": trainer.sweep.lanes}
    seconds = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, lanes in ways.items():
            trainer.sweep.lanes = lanes
            seconds[name] += tail_steps.timed(lambda: trainer.step(batch), args)
    facts = {"configurations": args.configurations, "lanes": {name: len(lanes.models) for name, lanes in ways.items()}}
    return tail_steps.write_results(args, trainer.model, "lanes", seconds, **facts)


if __name__ == "__main__":
    main(parse_args())
