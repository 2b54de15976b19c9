"""Experiment (issue 7): adapters that mix positions with the frozen blocks' own attention, against position-wise ones.

A Skip2-LoRA adapter maps each position's block input to the output on its own. LoRA on a block's value
projection instead changes the block's output by ``P (x A^T) B^T``: the low-rank code of every position, mixed
by the block's attention probabilities ``P``. With the backbone frozen, ``P`` is fixed per sample, so it can be
cached with the block inputs and the skip stays exact. This script measures whether that mixing, added straight
before ``lm_head`` like the faithful method, lowers the validation loss:

    python experiments/attention_mixed_adapters.py --blocks '[0,4,8,12,16,20,24]'

Both kinds train on the same cached features (one backbone pass, in memory), with the same rank, learning
rate and schedule as ``finetune_skip2lora`` (AdamW, 10 warm-up steps, cosine decay, batch 8, 2 epochs), on
``WordNetInstruct`` (600 / 100, SmolLM2's chat template). It is a measurement, not part of the package.
"""

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from jsonargparse import CLI
from litgpt.model import GPT, Config
from litgpt.tokenizer import Tokenizer

from litgpt_skip2lora.data import WordNetInstruct

Sample = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]


class Adapters(nn.Module):
    """Rank-r adapters from the selected blocks' ``norm_1`` inputs; ``mix`` says whether attention mixes the codes."""

    def __init__(self, config: Config, n_blocks: int, rank: int, mix: bool) -> None:
        super().__init__()
        self.config, self.rank, self.mix = config, rank, mix
        groups, heads = (config.n_query_groups, config.n_head) if mix else (1, 1)
        self.A = nn.ParameterList(nn.Parameter(torch.empty(rank * groups, config.n_embd)) for _ in range(n_blocks))
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(config.n_embd, rank * heads)) for _ in range(n_blocks))
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, taps: list[torch.Tensor], probs: list[torch.Tensor]) -> torch.Tensor:
        heads, groups = self.config.n_head, self.config.n_query_groups
        z = 0
        for a, b, x, p in zip(self.A, self.B, taps, probs):
            codes = x @ a.T * (16 / self.rank)  # lora_alpha 16, as the YAMLs
            if self.mix:  # per value group, mixed by each of its heads' attention, as LoRA on `v` would be
                codes = codes.unflatten(-1, (groups, self.rank)).transpose(1, 2).repeat_interleave(heads // groups, 1)
                codes = (p @ codes).transpose(1, 2).flatten(2)
            z = z + codes @ b.T
        return z


def features(model: GPT, blocks: list[int], batch: dict) -> Sample:
    """One frozen forward: each selected block's ``norm_1`` output and attention probabilities, and ``ln_f(h)``."""
    idx, config = batch["input_ids"], model.config
    T, taps, probs, handles = idx.size(1), {}, {}, []
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)

    def recording(i: int, sdpa):
        def sdpa_and_probs(q, k, v, mask=None):
            probs[i] = ((q @ k.mT) / math.sqrt(config.head_size)).masked_fill(causal, -math.inf).softmax(-1)
            return sdpa(q, k, v, mask)

        return sdpa_and_probs

    for i in blocks:
        block = model.transformer.h[i]
        block.attn.scaled_dot_product_attention = recording(i, block.attn.scaled_dot_product_attention)
        handles.append(block.norm_1.register_forward_hook(lambda m, args, out, i=i: taps.__setitem__(i, out)))
    with torch.no_grad():
        x = model.transformer.wte(idx)
        for block in model.transformer.h:
            x = block(x, model.cos[:T].unsqueeze(0), model.sin[:T].unsqueeze(0), None)
        base = model.transformer.ln_f(x)
    for i, handle in zip(blocks, handles):
        handle.remove()
        del model.transformer.h[i].attn.scaled_dot_product_attention
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    return [taps[i] for i in blocks], [probs[i] for i in blocks], base, targets


def loss(model: GPT, adapters: Adapters, sample: Sample) -> torch.Tensor:
    taps, probs, base, targets = sample
    supervised = targets != -100
    return F.cross_entropy(model.lm_head((base + adapters(taps, probs))[supervised]), targets[supervised])


def main(
    blocks: list[int],
    rank: int = 8,
    lr: float = 1e-3,
    kinds: tuple[str, ...] = ("position-wise", "attention-mixed"),
    checkpoint_dir: str = "checkpoints/SmolLM2-135M-Instruct",
    epochs: int = 2,
) -> None:
    """Train each kind of adapter on the same cached features; print the validation loss every 50 steps."""
    config = Config.from_file(f"{checkpoint_dir}/model_config.yaml")
    model = GPT(config)
    model.load_state_dict(torch.load(f"{checkpoint_dir}/lit_model.pth", mmap=True))
    model.eval().requires_grad_(False)
    data = WordNetInstruct(num_train=600, num_val=100, prompt_style="smollm2", num_workers=0)
    data.connect(Tokenizer(checkpoint_dir), batch_size=8, max_seq_length=128)
    data.setup()
    t0 = time.perf_counter()
    train = [features(model, blocks, batch) for batch in data.train_dataloader()]
    val = [features(model, blocks, batch) for batch in data.val_dataloader()]
    print(f"features of {len(train)} training and {len(val)} validation batches: {time.perf_counter() - t0:.1f} s")
    steps = epochs * len(train)
    for kind in kinds:
        torch.manual_seed(1337)
        adapters = Adapters(config, len(blocks), rank, mix=kind == "attention-mixed")
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=lr, weight_decay=0.0)
        schedule = lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        t0, step = time.perf_counter(), 0
        for _ in range(epochs):
            for j in torch.randperm(len(train)).tolist():
                loss(model, adapters, train[j]).backward()
                optimizer.step(), optimizer.zero_grad(), scheduler.step()
                step += 1
                if step % 50 == 0:
                    with torch.no_grad():
                        val_loss = torch.stack([loss(model, adapters, sample) for sample in val]).mean().item()
                    print(f"{kind}, blocks {blocks}, r={rank}, lr={lr}: step {step} val loss {val_loss:.4f}"
                          f" ({time.perf_counter() - t0:.1f} s of training)")  # fmt: skip


if __name__ == "__main__":
    CLI(main, as_positional=False)
