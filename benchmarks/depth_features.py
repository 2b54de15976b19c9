"""A depth sweep's later output places, the two ways to feed them: the stream at each place kept in the Skip-Cache as
one more tap (what ``--sweep.skip2lora_output_layer`` does), against running the frozen blocks between the earliest
place and each later one for every batch.

The sweep of the tail YAML's model (random weights) over ``block.18``, ``block.22`` and ``block.26``, adapters on
blocks 0, 6, 12, 18, 22 and 26: each round times ``--steps`` batches of each way after ``--warmup`` untimed ones, the
two alternating round by round. What differs between the ways is timed alone (the configurations' tails, the same
either way, are not). Writes ``<out>/depth_features-<UTC timestamp>.json``::

    python -m benchmarks.depth_features
"""

import argparse
from pathlib import Path

import torch

from benchmarks import tail_steps
from litgpt_skip2lora.adapters import Features, Reads
from litgpt_skip2lora.model import GPT, Config, pretrained_only

PLACES = (18, 22, 26)
BLOCKS = (0, 6, 12, 18, 22, 26)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return tail_steps.parser(__doc__.split("\n\n")[0]).parse_args(argv)


def frozen_blocks(model: GPT, features: Features, start: int, place: int) -> torch.Tensor:
    """The stream at ``place`` from the stream at ``start``: the frozen blocks between them, as the backbone runs."""
    cos, sin = (t[: features.stream.size(1)].unsqueeze(0) for t in (model.cos, model.sin))
    x = features.stream
    for block in model.transformer.h[start:place]:
        x = block(x, cos, sin)
    return x


def main(args: argparse.Namespace) -> Path:
    torch.manual_seed(0)
    config = Config.from_name(
        args.model,
        n_layer=args.n_layer or Config.from_name(args.model).n_layer,
        **tail_steps.tail_lora(),
        skip2lora_enabled=True,
        skip2lora_block_indices=BLOCKS[:4],
        skip2lora_output_layer=f"block.{PLACES[0]}",
    )
    model = GPT(config).eval()
    idx = torch.randint(0, config.padded_vocab_size, (args.batch, args.tokens))
    with torch.no_grad():
        features = model.backbone(idx, Reads(BLOCKS, PLACES[0]))
    later = [Reads(tuple(b for b in BLOCKS if b <= place), place) for place in PLACES[1:]]

    def cached() -> None:
        for reads in later:
            features.of(reads)

    def recomputed() -> None:
        with torch.no_grad(), pretrained_only(model.transformer.h[PLACES[0] :]):
            for reads in later:
                frozen_blocks(model, features, PLACES[0], reads.start)

    seconds = {"stream kept as a cached tap": [], "frozen blocks run each batch": []}
    for _ in range(args.rounds):
        for times, way in zip(seconds.values(), (cached, recomputed)):
            times += tail_steps.timed(way, args)
    return tail_steps.write_results(args, model, "depth_features", seconds, places=list(PLACES), blocks=list(BLOCKS))


if __name__ == "__main__":
    main(parse_args())
