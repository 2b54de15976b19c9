"""A sweep's training step on the CPU with its dropout masks shared (:class:`litgpt_skip2lora.dropout.SharedMasks`)
against drawn by every configuration: ``--configurations`` learning rates of the trainable-tail YAML's tail, whose
streams start from one seed and so draw every mask alike, against as many seeds at one learning rate, whose streams
draw apart. Both compute the same steps in the same lanes; only the draws differ. Random weights of the model's
shape, a batch of the supersense task's shape.

Each round times ``--steps`` steps of each sweep after ``--warmup`` untimed ones; the sweeps alternate round by
round, so that a slower minute of the machine falls on both. Writes ``<out>/shared_masks-<UTC timestamp>.json`` with
every step's seconds, each sweep's median and their ratio::

    python -m benchmarks.shared_masks
"""

import argparse
from functools import partial
from pathlib import Path

import torch

from benchmarks import tail_steps
from litgpt_skip2lora.sweep import SweepArgs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return tail_steps.sweep_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    count = args.configurations
    grids = {
        "a seed each": SweepArgs(lr=[0.001], seed=list(range(1, count + 1))),
        "one seed": tail_steps.learning_rates(count),
    }
    trainers = {}
    for name, grid in grids.items():
        torch.manual_seed(0)  # the same weights
        trainers[name] = tail_steps.sweep_trainer(args, grid)
    batch = tail_steps.sweep_batch(trainers["one seed"], args)
    seconds = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            seconds[name] += tail_steps.timed(partial(trainer.step, batch), args)
    lane_counts = {name: len(trainer.sweep.lanes.models) for name, trainer in trainers.items()}
    facts = {"configurations": count, "lanes": lane_counts}
    return tail_steps.write_results(args, trainers["one seed"].model, "shared_masks", seconds, **facts)


if __name__ == "__main__":
    main(parse_args())
