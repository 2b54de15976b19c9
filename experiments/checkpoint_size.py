"""The size of a step checkpoint for a model too large to train here, from its real trained state.

The model is built on the meta device (no memory); its trainable parameters are then made real, one AdamW step
fills the optimizer's moments, and that state is saved as ``finetune_skip2lora`` saves it (trained parameters,
optimizer, scheduler, counters, RNG): the file's size is measured. The whole-model size that step checkpoints had
before they were trimmed is the parameter count times the bytes per parameter (computed, not written)::

    python experiments/checkpoint_size.py --model Llama-2-7b-hf --precision bf16-true --blocks 0,8,16,24
"""

import argparse
import tempfile
from pathlib import Path

import torch
from litgpt.finetune.lora import get_lr_scheduler
from litgpt.lora import mark_only_lora_as_trainable

from litgpt_skip2lora import GPT, Config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Llama-2-7b-hf")
    parser.add_argument("--precision", default="bf16-true", choices=("bf16-true", "32-true"))
    parser.add_argument("--blocks", default="0,8,16,24")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    blocks = [int(b) for b in args.blocks.split(",")]
    config = Config.from_name(
        args.model, lora_r=args.rank, lora_alpha=2 * args.rank, skip2lora_enabled=True, skip2lora_block_indices=blocks
    )
    with torch.device("meta"):
        model = GPT(config)
    mark_only_lora_as_trainable(model)
    trained = {
        n: torch.nn.Parameter(torch.randn(p.shape, dtype=dtype)) for n, p in model.named_parameters() if p.requires_grad
    }
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-3)
    sum(p.float().square().sum() for p in trained.values()).backward()
    optimizer.step()
    scheduler = get_lr_scheduler(optimizer, warmup_steps=1, max_steps=10)
    state = {
        "model": {n: p.detach() for n, p in trained.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "iter_num": 1,
        "step_count": 1,
        "rng": torch.get_rng_state(),
    }
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "state.pth"
        torch.save(state, path)
        size = path.stat().st_size
    total = sum(p.numel() for p in model.parameters())
    whole = total * dtype.itemsize
    print(f"{args.model}, {args.precision}, Skip2-LoRA blocks {blocks}, r={args.rank}")
    print(f"trained parameters: {sum(p.numel() for p in trained.values()):,} of {total:,}")
    print(f"step checkpoint now (measured): {size:,} bytes")
    print(f"whole-model state as before (computed, parameters alone): {whole:,} bytes ({whole / size:,.0f}x)")


if __name__ == "__main__":
    main()
