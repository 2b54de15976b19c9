"""The tail's LoRA dropout: ``torch.nn.Dropout`` against ``litgpt_skip2lora.dropout.Dropout``, which draws its mask
with ``torch.rand``, in the trainable-tail YAML's step (``skip2lora_tail.yaml``'s LoRA options in the last four
blocks), random weights of the model's shape, a batch of the supersense task's shape.

Each round times ``--steps`` steps (forward, loss, backward) of each variant after ``--warmup`` untimed ones; the
variants alternate round by round, so that a slower minute of the machine falls on both. Writes
``<out>/dropout-<UTC timestamp>.json`` with every step's seconds, each variant's median and their ratio::

    python -m benchmarks.dropout
"""

import argparse
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from litgpt.lora import LoRALayer

from benchmarks import tail_steps
from litgpt_skip2lora.dropout import Dropout
from litgpt_skip2lora.rows import IGNORE_INDEX

VARIANTS = {"torch.nn.Dropout": nn.Dropout, "litgpt_skip2lora Dropout": Dropout}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return tail_steps.parser(__doc__.split("\n\n")[0]).parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    model = tail_steps.tail_model(args)
    features, targets = tail_steps.tail_batch(model, args)
    supervised = targets != IGNORE_INDEX

    def step() -> None:
        F.cross_entropy(model.tail(features, supervised), targets[supervised]).backward()

    layers = [m for m in model.modules() if isinstance(m, LoRALayer) and hasattr(m, "lora_A")]  # they draw masks
    seconds = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, variant in VARIANTS.items():
            for layer in layers:
                layer.lora_dropout = variant(layer.lora_dropout.p)
            seconds[name] += tail_steps.timed(step, args)
    return tail_steps.write_results(args, model, "dropout", seconds, dropout_layers=len(layers))


if __name__ == "__main__":
    main(parse_args())
