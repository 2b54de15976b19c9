"""Skip2-LoRA on top of LitGPT's LoRA model.

Adapter i reads the input of block i and its low-rank output ``B_i A_i x_i * alpha / r`` skips straight to the
output place, where the sum ``z`` of all adapters is added once. Nothing inside the backbone changes, so the
backbone needs no backward pass, and its activations for a sample never change: they can be cached
(:mod:`litgpt_skip2lora.cache`). A side network (:mod:`litgpt_skip2lora.side`) may produce ``z`` instead.
Reference: Matutani et al., ASP-DAC 2025, arXiv 2410.21073.
"""

import math
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import litgpt.lora
import torch
import torch.nn as nn
import yaml
from litgpt.model import batched_index_select, do_softcapping
from typing_extensions import Self

from litgpt_skip2lora.side import SideNetwork

LORA_FLAGS = ("lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp")
RETIRED_FIELDS = {"skip2lora_mix": "none", "skip2lora_input": "raw"}  # field: the one value still built in


class Rope(NamedTuple):
    """RoPE tables and the attention mask for a run of positions; ``input_pos`` is set when the KV cache is used."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    input_pos: torch.Tensor | None
    input_pos_maxp1: int | None


@dataclass
class Features:
    """What the tail needs from the frozen backbone: the adapters' or side network's inputs (``taps``) and
    ``stream``, the residual stream at the output place, to which their output ``z`` is added."""

    taps: list[torch.Tensor]
    stream: torch.Tensor


@dataclass
class Config(litgpt.lora.Config):
    """LitGPT's LoRA config plus Skip2-LoRA.

    Args:
        skip2lora_enabled: add Skip2-LoRA adapters (rank ``lora_r``, scaling ``lora_alpha / lora_r``,
            dropout ``lora_dropout``).
        skip2lora_block_indices: blocks whose input feeds an adapter; negative indices count from the end,
            as in Python. Stored sorted and non-negative.
        skip2lora_output_layer: where ``z`` is added. ``"lm_head"``: ``lm_head(ln_f(h) + z)``, the paper's design,
            the tail is one matmul. ``"ln_f"``: ``lm_head(ln_f(h + z))``. ``"block.K"``: ``z`` joins the input of
            block K, and blocks K.. run in the tail with gradients (ordinary LoRA flags apply to them only).
        skip2lora_side_width: 0 for adapters; else a side network of this width reads the selected blocks (see
            :mod:`litgpt_skip2lora.side`); the Skip-Cache stores this many channels per selected block and token.
    """

    skip2lora_enabled: bool = False
    skip2lora_block_indices: tuple[int, ...] = ()
    skip2lora_output_layer: str = "lm_head"
    skip2lora_side_width: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.skip2lora_block_indices = tuple(self.skip2lora_block_indices)
        if self.skip2lora_enabled:
            self.skip2lora_block_indices = self._checked_indices()

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Self:
        """LitGPT's, also for checkpoints that name a retired field at the value that is now the only one."""
        saved = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        for name, value in RETIRED_FIELDS.items():
            if saved.pop(name, value) != value:
                raise ValueError(f"{path}: {name} was retired ({value!r} is built in); use an older version.")
        return cls(**{**saved, **kwargs})

    @property
    def skip2lora_tail_start(self) -> int:
        """Index of the first block that runs in the tail; ``n_layer`` when the tail has no block."""
        place = self.skip2lora_output_layer
        return int(place.removeprefix("block.")) if place.startswith("block.") else self.n_layer

    @property
    def skip2lora_position_wise(self) -> bool:
        """Whether the tail treats every position alone (no tail block, no side network): then only the supervised rows
        matter, and the cache and the tail take them as flat rows rather than padded ``(B, T)`` sequences."""
        return self.skip2lora_tail_start == self.n_layer and not self.skip2lora_side

    @property
    def skip2lora_side(self) -> bool:
        """Whether a side network, rather than adapters, reads the selected blocks."""
        return self.skip2lora_enabled and self.skip2lora_side_width > 0

    @property
    def skip2lora_tap_width(self) -> int:
        """Values per selected block and token that the tail reads (and the Skip-Cache stores)."""
        return self.skip2lora_side_width if self.skip2lora_side else self.n_embd

    def _checked_indices(self) -> tuple[int, ...]:
        n, place, indices = self.n_layer, self.skip2lora_output_layer, self.skip2lora_block_indices
        tail_block = re.fullmatch(r"block\.(\d+)", place)
        if place not in ("lm_head", "ln_f") and not (tail_block and 0 < int(tail_block[1]) < n):
            raise ValueError(f"skip2lora_output_layer must be 'lm_head', 'ln_f' or 'block.K' (0 < K < {n}): {place!r}")
        if self.lora_r <= 0 and not self.skip2lora_side_width:
            raise ValueError(f"Skip2-LoRA adapters need lora_r > 0, got lora_r={self.lora_r}.")
        if not 0 <= self.skip2lora_side_width <= self.n_embd:
            raise ValueError(f"skip2lora_side_width must be in 0..{self.n_embd}, got {self.skip2lora_side_width}.")
        if not indices:
            raise ValueError("skip2lora_block_indices is empty: select at least one block.")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"skip2lora_block_indices: {i!r} is not a block index of a {n}-layer model.")
        normalized = sorted(i % n for i in indices)
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"skip2lora_block_indices has duplicates: {list(indices)} selects {normalized}.")
        if normalized[-1] > self.skip2lora_tail_start:
            raise ValueError(f"skip2lora_block_indices: block {normalized[-1]} lies after the output place {place!r}.")
        return tuple(normalized)


class Skip2LoRA(litgpt.lora.LoRALayer):
    """A LoRA branch without a pretrained weight of its own: ``dropout(x) A^T B^T * alpha / r``."""

    def __init__(self, n_embd: int, r: int, lora_alpha: int, lora_dropout: float) -> None:
        super().__init__(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        self.lora_A = nn.Parameter(torch.empty(r, n_embd))
        self.lora_B = nn.Parameter(torch.empty(n_embd, r))
        self.scaling = lora_alpha / r
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as in LoRA (Kaiming-uniform), B zero: a fresh adapter leaves the model unchanged."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """The rank-r code ``dropout(x) A^T * scaling``; ``forward`` is ``down(x) B^T``."""
        return (self.lora_dropout(x) @ self.lora_A.T) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x) @ self.lora_B.T


class Block(litgpt.lora.Block):
    """LitGPT's LoRA block, holding ``skip2lora`` when its input is selected. Its forward is unchanged."""

    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__(config, block_idx)
        if config.skip2lora_enabled and not config.skip2lora_side and block_idx in config.skip2lora_block_indices:
            self.skip2lora = Skip2LoRA(config.n_embd, config.lora_r, config.lora_alpha, config.lora_dropout)


class GPT(litgpt.lora.GPT):
    """LitGPT's LoRA GPT whose forward adds the Skip2-LoRA adapters' sum at ``skip2lora_output_layer``."""

    def __init__(self, config: Config) -> None:
        # LitGPT's LoRA GPT would build blocks of its own class: build it without any, so no weight exists twice
        super().__init__(replace(config, n_layer=0, skip2lora_enabled=False))
        self.config = config
        self.transformer.h = nn.ModuleList(Block(_block_config(config, i), i) for i in range(config.n_layer))
        if config.skip2lora_side:
            self.skip2lora_side = SideNetwork(config)

    @classmethod
    def from_name(cls, name: str, **kwargs: Any) -> Self:
        return cls(Config.from_name(name, **kwargs))

    @property
    def adapters(self) -> list[Skip2LoRA]:
        return [b.skip2lora for b in self.transformer.h if hasattr(b, "skip2lora")]

    @property
    def tail_modules(self) -> list[nn.Module]:
        """What trains, so what switches to training mode (LoRA dropout): the adapters or the side network, and
        the tail's blocks."""
        side = [self.skip2lora_side] if self.config.skip2lora_side else []
        return [*self.adapters, *side, *self.transformer.h[self.config.skip2lora_tail_start :]]

    def initialize_side(self) -> None:
        """Give a side network its start, pruned from the backbone, once the backbone holds its pretrained weights."""
        if self.config.skip2lora_side:
            self.skip2lora_side.reset_parameters()
            self.skip2lora_side.prune_from(self.transformer.h, self.transformer.ln_f)

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
        return self.tail(self._features(idx, rope), rope=rope, lm_head_chunk_size=lm_head_chunk_size)

    def features(self, idx: torch.Tensor) -> Features:
        """Run the frozen part (embeddings and the blocks before the output place) once, without autograd."""
        return self._features(idx, self._rope_and_mask(idx.size(1), None, None))

    def tail(
        self,
        features: Features,
        supervised: torch.Tensor | None = None,
        rope: Rope | None = None,
        lm_head_chunk_size: int = 0,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Logits from the frozen part's features, running no frozen block: ``forward(x) == tail(features(x))``.

        The layout follows ``config.skip2lora_position_wise``. A position-wise tail reads each row alone, so its
        features may be ``(B, T)`` sequences or flat rows (training passes the supervised rows only, as the cache
        stores them). Any other tail attends over positions: its features are padded ``(B, T)`` sequences, and
        ``supervised``, a boolean ``(B, T)`` mask, keeps only the rows the loss reads for the costly head.
        """
        if self.config.skip2lora_position_wise:
            if supervised is not None:
                features = Features([t[supervised] for t in features.taps], features.stream[supervised])
            if self._factored_head_pays(features, lm_head_chunk_size):
                return self._factored_logits(features)
            x = features.stream + self._delta(features)
        else:
            rope = rope or self._rope_and_mask(features.stream.size(-2), None, None)
            side = self.config.skip2lora_side
            z = self.skip2lora_side(features.taps, partial(self._block, rope=rope)) if side else self._delta(features)
            x = features.stream + z
            for i in range(self.config.skip2lora_tail_start, self.config.n_layer):
                x = self._block(i, x, rope)
            if supervised is not None:
                x = x[supervised]
        if self.config.skip2lora_output_layer != "lm_head":
            x = self.transformer.ln_f(x)
        if lm_head_chunk_size > 0:
            return [self._softcap(self.lm_head(c)) for c in x.split(lm_head_chunk_size, dim=1)]
        return self._softcap(self.lm_head(x))

    def backbone_requires_grad(self) -> bool:
        """Whether the frozen part has a trainable parameter (ordinary LoRA before the output place)."""
        frozen_part = [self.transformer.wte, *self.transformer.h[: self.config.skip2lora_tail_start]]
        return any(p.requires_grad for m in frozen_part for n, p in m.named_parameters() if "skip2lora" not in n)

    def _features(self, idx: torch.Tensor, rope: Rope) -> Features:
        start = self.config.skip2lora_tail_start
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_requires_grad()):
            x = self.transformer.wte(idx)
            if self.config.scale_embeddings:
                x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
            taps = []
            for i, block in enumerate(self.transformer.h):
                if hasattr(block, "skip2lora"):
                    taps.append(x)
                elif self.config.skip2lora_side and i in self.skip2lora_side.reads:
                    taps.append(self.skip2lora_side.read(x))
                if i == start:
                    break
                x = self._block(i, x, rope)
            stream = self.transformer.ln_f(x) if self.config.skip2lora_output_layer == "lm_head" else x
        return Features(taps, stream)

    def _delta(self, features: Features) -> torch.Tensor:
        """``z``: the sum of all adapter outputs, as one matmul over the concatenated rank-r codes."""
        return self._codes(features) @ self._stacked_b().T

    def _codes(self, features: Features) -> torch.Tensor:
        return torch.cat([a.down(t) for a, t in zip(self.adapters, features.taps)], dim=-1)

    def _stacked_b(self) -> torch.Tensor:
        return torch.cat([a.lora_B for a in self.adapters], dim=1)

    def _factored_head_pays(self, features: Features, lm_head_chunk_size: int) -> bool:
        """``W (h + B u) = W h + (W B) u`` for a frozen float head: backward then multiplies by the
        vocabulary-sized ``W`` once per step (for ``W B``) instead of once per row, which pays when the rows ``n``
        outnumber the ranks ``k``: ``n d > 2 d k + 3 n k`` multiply-adds per vocabulary entry."""
        head, d = self.lm_head, self.config.n_embd
        ranks, rows = self.config.lora_r * len(self.adapters), features.stream.numel() // d
        return (
            torch.is_grad_enabled()
            and lm_head_chunk_size == 0
            and self.config.skip2lora_output_layer == "lm_head"
            and not head.linear.weight.requires_grad
            and head.linear.weight.is_floating_point()  # a 4- or 8-bit head has no matrix to multiply B by
            and head.r == 0
            and rows * (d - 3 * ranks) > 2 * d * ranks
        )

    def _factored_logits(self, features: Features) -> torch.Tensor:
        with torch.no_grad():
            stream_logits = self.lm_head(features.stream)
        projected_b = self.lm_head.linear.weight @ self._stacked_b()
        return self._softcap(stream_logits + self._codes(features) @ projected_b.T)

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int | None = None,
        rope_cache_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """LitGPT's KV cache, plus one for each side block."""
        super().set_kv_cache(batch_size, max_seq_length, rope_cache_length, device, dtype)
        length, rope_length = max_seq_length or self.max_seq_length, rope_cache_length or self.rope_cache_length()
        for block in self.skip2lora_side.blocks if self.config.skip2lora_side else []:
            block.attn.kv_cache = block.attn.build_kv_cache(batch_size, length, rope_length, device, dtype)

    def clear_kv_cache(self) -> None:
        super().clear_kv_cache()
        for block in self.skip2lora_side.blocks if self.config.skip2lora_side else []:
            block.attn.kv_cache = None

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        return logits if cap is None else do_softcapping(logits, cap)

    def _block(self, i: int, x: torch.Tensor, rope: Rope, block: nn.Module | None = None) -> torch.Tensor:
        """Backbone block ``i``, or a side block in its place, with the RoPE tables of that place."""
        cos, sin = rope.cos, rope.sin
        if self.config.rope_indices is not None:
            which = self.config.rope_indices[i]
            cos, sin = cos[..., which], sin[..., which]
        block = self.transformer.h[i] if block is None else block
        return block(x, cos, sin, rope.mask, rope.input_pos, rope.input_pos_maxp1)

    def _rope_and_mask(self, T: int, input_pos: torch.Tensor | None, input_pos_maxp1: int | None) -> Rope:
        """RoPE tables and attention mask for T tokens; with ``input_pos`` the KV cache is used."""
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


def spaced_blocks(count: int, n_layer: int) -> list[int]:
    """``count`` evenly spaced block indices starting at 0, e.g. [0, 8, 16, 24] for 4 of 32 layers."""
    return sorted({i * n_layer // count for i in range(count)})


def _block_config(config: Config, block_idx: int) -> Config:
    """Blocks before a ``block.K`` output place stay frozen: ordinary LoRA applies to the tail only."""
    frozen = config.skip2lora_enabled and block_idx < config.skip2lora_tail_start < config.n_layer
    return replace(config, **{flag: False for flag in LORA_FLAGS}) if frozen else config
