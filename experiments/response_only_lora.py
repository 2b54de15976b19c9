"""Experiment (issue 7): is LoRA that leaves the prompt to the frozen model as good as ordinary LoRA?

If LoRA changed only the positions from the last prompt token on, the prompt's keys and values in every block
would be the frozen model's, fixed per sample and cacheable exactly like Skip2-LoRA's features, and training
would run the blocks over the response positions only (WordNet's responses are short). Before building that, this
script measures the quality side alone: LitGPT's LoRA (q+v, r=8, lr 2e-4, the baseline's settings) trained
with the LoRA branches switched off at prompt positions, against the same loop with them on everywhere:

    python experiments/response_only_lora.py

No time is saved here (every position still runs); only the validation losses are compared, in one loop,
same data (``WordNetInstruct``, 600 / 100, SmolLM2's chat template), seed, schedule and batches.
"""

import math
import time

import torch
from jsonargparse import CLI
from litgpt.lora import GPT, Config, LoRALinear, LoRAQKVLinear, mark_only_lora_as_trainable
from litgpt.tokenizer import Tokenizer
from litgpt.utils import chunked_cross_entropy

from litgpt_skip2lora.data import WordNetInstruct


class PositionGate:
    """Forward hooks that keep the LoRA layers' output only where ``adapted`` is true, the frozen one elsewhere."""

    def __init__(self, model: GPT) -> None:
        self.adapted: torch.Tensor | None = None
        for module in model.modules():
            if isinstance(module, (LoRALinear, LoRAQKVLinear)) and module.r > 0:
                module.register_forward_hook(self.gate)

    def gate(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if self.adapted is None:
            return output
        return torch.where(self.adapted[..., None], output, module.linear(args[0]))


def adapted_positions(labels: torch.Tensor) -> torch.Tensor:
    """From the last prompt token (whose next token is the first response token) to the end."""
    supervised = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)
    return supervised.cumsum(1) > 0


def main(checkpoint_dir: str = "checkpoints/SmolLM2-135M-Instruct", epochs: int = 2, lr: float = 2e-4) -> None:
    """Train LoRA with and without the prompt gate; print the validation loss every 50 steps and at the end."""
    data = WordNetInstruct(num_train=600, num_val=100, prompt_style="smollm2", num_workers=0)
    data.connect(Tokenizer(checkpoint_dir), batch_size=8, max_seq_length=128)
    data.setup()
    for gated in (True, False):
        torch.manual_seed(1337)
        config = Config.from_file(
            f"{checkpoint_dir}/model_config.yaml",
            lora_r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            lora_query=True,
            lora_value=True,
        )
        model = GPT(config)
        model.load_state_dict(torch.load(f"{checkpoint_dir}/lit_model.pth", mmap=True), strict=False)
        mark_only_lora_as_trainable(model)
        gate = PositionGate(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        train_loader = data.train_dataloader()
        steps = epochs * len(train_loader)
        schedule = lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        name = "LoRA off at prompt positions" if gated else "LoRA everywhere"

        def loss_of(batch: dict) -> torch.Tensor:
            gate.adapted = adapted_positions(batch["labels"]) if gated else None
            logits = model(batch["input_ids"], lm_head_chunk_size=128)
            logits[-1] = logits[-1][..., :-1, :]
            return chunked_cross_entropy(logits, batch["labels"][..., 1:])

        def validate() -> float:
            model.eval()
            with torch.no_grad():
                loss = torch.stack([loss_of(batch) for batch in data.val_dataloader()]).mean().item()
            model.train()
            return loss

        print(f"{name}: step 0 val loss {validate():.4f}", flush=True)
        step, t0 = 0, time.perf_counter()
        for _ in range(epochs):
            for batch in train_loader:
                loss_of(batch).backward()
                optimizer.step(), optimizer.zero_grad(), scheduler.step()
                step += 1
                if step % 50 == 0 or step == steps:
                    print(
                        f"{name}: step {step} val loss {validate():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True
                    )


if __name__ == "__main__":
    CLI(main, as_positional=False)
