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
from pathlib import Path

import torch

from benchmarks import tail_steps
from litgpt_skip2lora.lanes import Lanes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return tail_steps.sweep_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    trainer = tail_steps.sweep_trainer(args, tail_steps.learning_rates(args.configurations))
    batch = tail_steps.sweep_batch(trainer, args)
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
