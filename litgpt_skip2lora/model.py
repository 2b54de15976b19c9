"""Skip2-LoRA on top of LitGPT's LoRA model: the adapters' sum ``z`` is added once, at the output place, so the
backbone needs no backward pass and its activations can be cached. ``forward(x) == tail(backbone(x))``.
"""

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import litgpt.lora
import torch
import torch.nn as nn
import yaml
from litgpt.model import batched_index_select, do_softcapping
from typing_extensions import Self

from litgpt_skip2lora.adapters import Adapters, Features, Reads
from litgpt_skip2lora.dropout import Dropout

LORA_FLAGS = ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp")


class SharedHead(NamedTuple):
    """The frozen head's logits of the stream, and each configuration's ``W B``."""

    stream_logits: torch.Tensor
    products: list[torch.Tensor]


class Rope(NamedTuple):
    """RoPE tables and the attention mask for a run of positions; ``input_pos`` is set when the KV cache is used."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    input_pos: torch.Tensor | None
    input_pos_maxp1: int | None


@dataclass
class Config(litgpt.lora.Config):
    """LitGPT's LoRA config plus Skip2-LoRA.

    Args:
        skip2lora_enabled: add Skip2-LoRA adapters (rank ``lora_r``, ``lora_alpha``, ``lora_dropout``).
        skip2lora_block_indices: blocks whose input feeds an adapter (negative from the end); stored sorted.
        skip2lora_output_layer: where ``z`` is added: ``"lm_head"``, ``lm_head(ln_f(h) + z)`` (the paper's);
            ``"ln_f"``, ``lm_head(ln_f(h + z))``; ``"block.K"``, block K's input, blocks K.. then train in the tail.
    """

    skip2lora_enabled: bool = False
    skip2lora_block_indices: tuple[int, ...] = ()
    skip2lora_output_layer: str = "lm_head"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.skip2lora_block_indices = tuple(self.skip2lora_block_indices)
        # the output place, parsed once: the first block that runs in the tail, n_layer when it has none
        self.skip2lora_tail_start = self.n_layer
        self.skip2lora_after_ln_f = self.skip2lora_output_layer == "lm_head"
        """``z`` is added after ``ln_f`` (``lm_head(ln_f(h) + z)``); otherwise ``ln_f`` follows it."""
        if self.skip2lora_enabled:
            self.skip2lora_tail_start = output_block(self.skip2lora_output_layer, self.n_layer)
            self.skip2lora_block_indices = self._checked_indices()

    def _checked_indices(self) -> tuple[int, ...]:
        n, indices = self.n_layer, self.skip2lora_block_indices
        if self.lora_r <= 0:
            raise ValueError(f"Skip2-LoRA adapters need lora_r > 0, got lora_r={self.lora_r}.")
        if not indices:
            raise ValueError("skip2lora_block_indices is empty: select at least one block.")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"skip2lora_block_indices: {i!r} is not a block index of a {n}-layer model.")
        normalized = sorted(i % n for i in indices)
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"skip2lora_block_indices has duplicates: {list(indices)} selects {normalized}.")
        if normalized[-1] > self.skip2lora_tail_start:
            place = self.skip2lora_output_layer
            raise ValueError(f"skip2lora_block_indices: block {normalized[-1]} lies after the output place {place!r}.")
        return tuple(normalized)


def output_block(place: str, n_layer: int) -> int:
    """The first block an output place puts in the tail: ``K`` for ``block.K``, ``n_layer`` (none) otherwise."""
    if place in ("lm_head", "ln_f"):
        return n_layer
    tail_block = re.fullmatch(r"block\.(\d+)", place)
    if not (tail_block and 0 < int(tail_block[1]) < n_layer):
        choices = f"'lm_head', 'ln_f' or 'block.K' (0 < K < {n_layer})"
        raise ValueError(f"skip2lora_output_layer must be {choices}: {place!r}")
    return int(tail_block[1])


class Block(litgpt.lora.Block):
    """LitGPT's LoRA block. Before a ``block.K`` output place it has no ordinary LoRA: the frozen part stays frozen,
    so it can be cached; ordinary LoRA applies to the tail's blocks only."""

    def __init__(self, config: Config, block_idx: int) -> None:
        frozen = config.skip2lora_enabled and block_idx < config.skip2lora_tail_start < config.n_layer
        super().__init__(replace(config, **{flag: False for flag in LORA_FLAGS}) if frozen else config, block_idx)

    def forward(self, x: torch.Tensor, *rope: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        """LitGPT's block (``rope``: its cos, sin, mask and positions); with ``rows``, a ``(B, T)`` mask, only those
        rows come out, so the MLP runs on them alone (in the tail's last block, the rows the loss reads)."""
        if rows is None:
            return super().forward(x, *rope)
        x_normed = self.norm_1(x)
        attention_output = self.post_attention_norm(self.attn(x_normed, *rope))
        attention_output, x = attention_output[rows], x[rows]
        if self.config.parallel_residual:
            x_normed = x_normed[rows] if self.config.shared_attention_norm else self.norm_2(x)
            x = attention_output + x
        else:
            x = attention_output + x
            x_normed = self.norm_2(x)
        return self.post_mlp_norm(self.mlp(x_normed)) + x


class GPT(litgpt.lora.GPT):
    """LitGPT's LoRA GPT whose forward adds ``z = self.skip2lora(taps)`` at the output place: ``backbone`` and
    ``tail`` are LitGPT 0.5.13's ``GPT.forward`` split there. Its LoRA layers drop out from the running
    configuration's stream (:class:`~litgpt_skip2lora.dropout.Dropout`)."""

    def __init__(self, config: Config) -> None:
        # LitGPT's LoRA GPT would build blocks of its own class: build it without any, so no weight exists twice
        super().__init__(replace(config, n_layer=0, skip2lora_enabled=False))
        self.config = config
        self.transformer.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        for module in self.modules():  # at rate 0 too: a sweep's configuration may set its own rate
            if isinstance(module, litgpt.lora.LoRALayer):
                module.lora_dropout = Dropout(getattr(module.lora_dropout, "p", 0.0))
        if config.skip2lora_enabled:
            options = (config.lora_r, config.lora_alpha, config.lora_dropout)
            self.skip2lora = Adapters(reads(config), config.n_embd, *options)

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> Self:
        return cls(Config.from_name(name, **kwargs))

    @property
    def tail_modules(self) -> list[nn.Module]:
        """What trains, so what switches to training mode (dropout): the adapters and the tail's blocks."""
        return [self.skip2lora, *self.transformer.h[self.config.skip2lora_tail_start :]]

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        input_pos_maxp1: int | None = None,
        lm_head_chunk_size: int = 0,
    ) -> torch.Tensor | list[torch.Tensor]:
        if not self.config.skip2lora_enabled:
            return super().forward(idx, input_pos, input_pos_maxp1, lm_head_chunk_size)
        rope = self._rope_and_mask(idx.size(1), input_pos, input_pos_maxp1)
        features = self._backbone(idx, rope, self.skip2lora.reads)
        return self.tail(features, rope=rope, lm_head_chunk_size=lm_head_chunk_size)

    def backbone(self, idx: torch.Tensor, reads: Reads | None = None) -> Features:
        """Run the frozen part once, without autograd: the embeddings and the blocks before the output place, or
        before the last place ``reads`` names (a sweep's, :meth:`~litgpt_skip2lora.sweep.Sweep.reads`)."""
        return self._backbone(idx, self._rope_and_mask(idx.size(1), None, None), reads or self.skip2lora.reads)

    def tail(
        self,
        features: Features,
        supervised: torch.Tensor | None = None,
        rope: Rope | None = None,
        lm_head_chunk_size: int = 0,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Logits from the backbone's features, running no frozen block: :meth:`head` of :meth:`tail_rows`."""
        return self.head(self.tail_rows(features, supervised, rope), lm_head_chunk_size)

    def tail_rows(
        self, features: Features, supervised: torch.Tensor | None = None, rope: Rope | None = None
    ) -> torch.Tensor:
        """What the head reads: ``z`` added at the output place and the tail's blocks run; ``supervised``, a
        ``(B, T)`` mask, keeps only the rows the loss reads."""
        features, n_layer = features.of(self.skip2lora.reads), self.config.n_layer
        start = self.skip2lora.reads.start
        x = features.stream + self.skip2lora(features.taps)
        if start < n_layer:
            rope = rope or self._rope_and_mask(x.size(-2), None, None)
            for i in range(start, n_layer - 1):
                x = self._block(i, x, rope)
            return self._block(n_layer - 1, x, rope, supervised)  # keeps the supervised rows only, if given
        return x if supervised is None else x[supervised]

    def head(self, x: torch.Tensor, lm_head_chunk_size: int = 0) -> torch.Tensor | list[torch.Tensor]:
        """``lm_head`` (after ``ln_f`` unless ``z`` was added after it), with LitGPT's softcapping."""
        if not self.config.skip2lora_after_ln_f:
            x = self.transformer.ln_f(x)
        if lm_head_chunk_size > 0:
            return [self._softcap(self.lm_head(c)) for c in x.split(lm_head_chunk_size, dim=1)]
        return self._softcap(self.lm_head(x))

    def shared_head(self, features: Features, adapters: list[Adapters]) -> SharedHead:
        """What every configuration's factored head shares (:mod:`litgpt_skip2lora.head`): ``head(stream)``,
        outside autograd, and every ``W B_c`` from one matmul."""
        with torch.no_grad():
            stream_logits = self.lm_head.linear(features.stream)
        ranks = [a.B.size(1) for a in adapters]
        products = (self.lm_head.linear.weight @ torch.cat([a.B for a in adapters], dim=1)).split(ranks, dim=1)
        return SharedHead(stream_logits, list(products))

    def backbone_requires_grad(self) -> bool:
        """Whether the frozen part has a trainable parameter (then it cannot be cached)."""
        frozen_part = [self.transformer.wte, *self.transformer.h[: self.config.skip2lora_tail_start]]
        return any(p.requires_grad for m in frozen_part for p in m.parameters())

    def _backbone(self, idx: torch.Tensor, rope: Rope, reads: Reads) -> Features:
        """The inputs of ``reads.blocks`` and the stream at ``reads.start``; a block with LoRA layers (a longer
        tail's) runs as the frozen block it is here."""
        last = max(reads.start, *reads.blocks)
        grad = torch.is_grad_enabled() and self.backbone_requires_grad()
        with torch.set_grad_enabled(grad), pretrained_only(self.transformer.h[self.config.skip2lora_tail_start : last]):
            x = self.transformer.wte(idx)
            if self.config.scale_embeddings:
                x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
            taps = []
            for i in range(last + 1):
                if i == reads.start:
                    stream = self.transformer.ln_f(x) if self.config.skip2lora_after_ln_f else x
                if i in reads.blocks:
                    taps.append(x)
                if i < last:
                    x = self._block(i, x, rope)
        return Features(torch.stack(taps), stream, reads)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        return logits if cap is None else do_softcapping(logits, cap)

    def _block(self, i: int, x: torch.Tensor, rope: Rope, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``i`` with the RoPE tables of its place; with ``rows``, only those rows of its output."""
        cos, sin = rope.cos, rope.sin
        if self.config.rope_indices is not None:
            which = self.config.rope_indices[i]
            cos, sin = cos[..., which], sin[..., which]
        return self.transformer.h[i](x, cos, sin, rope.mask, rope.input_pos, rope.input_pos_maxp1, rows=rows)

    def _rope_and_mask(self, T: int, input_pos: torch.Tensor | None, input_pos_maxp1: int | None) -> Rope:
        """RoPE tables and attention mask for T tokens, as LitGPT 0.5.13's forward makes them."""
        if T > self.max_seq_length:
            raise ValueError(f"Cannot forward sequence of length {T}, max seq length is only {self.max_seq_length}.")
        if input_pos is None:
            return Rope(self.cos[:T].unsqueeze(0), self.sin[:T].unsqueeze(0), None, None, None)
        if input_pos.dim() > 2 or input_pos.shape[-1] != T:
            raise ValueError(f"input_pos must have shape (T,) or (B, T) with T={T}, got {tuple(input_pos.shape)}")
        if self.mask_cache is None:
            raise TypeError("You need to call `gpt.set_kv_cache()`")
        cos, sin = (batched_index_select(t, 0, input_pos) for t in (self.cos, self.sin))
        if input_pos.dim() == 1:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        mask = batched_index_select(self.mask_cache, 2, input_pos)
        if mask.dim() > 4:  # a batched input_pos adds a batch dim in front of the cache's own
            mask = mask.squeeze(1)
        if input_pos_maxp1 is not None:
            if input_pos_maxp1 > self.max_seq_length:
                raise ValueError(f"Positions in 'input_pos' must be in [0,{self.max_seq_length})")
            mask = mask[..., :input_pos_maxp1]
        return Rope(cos, sin, mask, input_pos, input_pos_maxp1)


def reads(config: Config) -> Reads:
    """What the adapters of ``config`` read."""
    return Reads(config.skip2lora_block_indices, config.skip2lora_tail_start)


@contextlib.contextmanager
def pretrained_only(blocks: nn.Module) -> Iterator[None]:
    """``blocks`` compute their pretrained weights alone: LitGPT's LoRA layers skip their LoRA part at rank 0."""
    ranks = {m: m.r for m in blocks.modules() if isinstance(m, litgpt.lora.LoRALayer)}
    for layer in ranks:
        layer.r = 0
    try:
        yield
    finally:
        for layer, r in ranks.items():
            layer.r = r


def save_model_config(config: Config, directory: Path) -> None:
    """LitGPT's ``model_config.yaml``, with tuples written as lists so that ``yaml.safe_load`` reads them back."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    (directory / "model_config.yaml").write_text(yaml.dump(fields), encoding="utf-8")


def mark_trainable(model: GPT) -> None:
    """Only the adapters and the tail's ordinary LoRA layers train; everything else is frozen."""
    litgpt.lora.mark_only_lora_as_trainable(model)  # the tail's LoRA layers (and lm_head's with lora_head)
    model.skip2lora.requires_grad_(True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters by their state-dict names: what a step checkpoint and ``lit_model.pth.lora`` hold."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def default_precision() -> str:
    """The precision a run trains in unless told: bf16-true on a GPU that has bfloat16, else 32-true. (LitGPT's
    ``get_default_supported_precision`` gives bf16-mixed even on the CPU, which is slower there and inexact.)"""
    return "bf16-true" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def default_blocks(n_layer: int, count: int = 4) -> list[int]:
    """The blocks whose inputs feed an adapter unless told: ``count`` evenly spaced from 0, [0, 8, 16, 24] of 32."""
    return sorted({i * n_layer // count for i in range(count)})
