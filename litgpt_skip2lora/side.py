"""The side network: a small transformer beside the frozen backbone that re-reads the whole prompt.

Position-wise adapters and trainable tails leave the frozen blocks' view of the prompt as it is, which is what
LoRA changes. The side network builds its own: one narrow LitGPT ``Block`` per read backbone block, with causal
attention over every position and the backbone's RoPE, in the manner of Ladder Side-Tuning (Sung et al., 2022)
and Quantized Side Tuning (Zhang et al., 2024). Block ``j`` reads the input of backbone block ``i_j`` through
a ladder, the mean ``s_j = (read(x_ij) + side_block_{j-1}(s_{j-1})) / 2`` (learned per-channel gates, as LST
and QST use, measured no different: EVALUATION_GUIDE.md §2). Its output, ``up(norm(s))``, reaches ``lm_head`` at
the output place; ``up`` starts at zero, so a fresh side network leaves the model exactly unchanged.

Both skips stay: ``read`` is a projection fixed when training starts (a selection of ``width`` of the
``n_embd`` residual channels), applied in the frozen backbone pass, so the Skip-Cache stores ``width`` values per
read block and token instead of ``n_embd``, and no backbone parameter enters the autograd graph.

It starts from pretrained computation, as LST does: side block ``j`` is backbone block ``i_j`` with its residual
channels, heads and MLP units cut to the most important ones (largest weight norms), so the side network starts
as a narrow copy of the backbone (from PyTorch's random initialisation it fits and generalises worse).
"""

from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING

import litgpt
import litgpt.model
import torch
import torch.nn as nn

if TYPE_CHECKING:
    from litgpt_skip2lora.model import Config


def side_block_config(config: "Config") -> litgpt.Config:
    """The side blocks' shape: ``width`` residual channels, the backbone's head size (so its RoPE tables fit),
    ``width // head_size`` heads each with its own keys and values, and the backbone's MLP ratio."""
    width = config.skip2lora_side_width
    heads = max(1, width // config.head_size)
    plain = {f.name: getattr(config, f.name) for f in fields(litgpt.Config) if f.init}  # plain blocks, no LoRA layers
    return litgpt.Config(
        **plain
        | dict(
            n_embd=width,
            n_head=heads,
            n_query_groups=heads,
            intermediate_size=max(1, config.intermediate_size * width // config.n_embd),
        )
    )


class SideNetwork(nn.Module):
    """One narrow block per read backbone block, a ladder into it, and a zero-initialised way out."""

    def __init__(self, config: "Config") -> None:
        super().__init__()
        side = side_block_config(config)
        reads = self.reads = config.skip2lora_block_indices
        self.register_buffer("channels", torch.arange(side.n_embd))  # the fixed read projection
        self.blocks = nn.ModuleList(litgpt.model.Block(side, i) for i in reads)
        self.norm = side.norm_class(side.n_embd, eps=side.norm_eps)
        self.up = nn.Linear(side.n_embd, config.n_embd, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's initialisation of every layer and ``up`` zero: the model is left unchanged. ``prune_from`` then
        gives the blocks their pretrained start."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.channels.copy_(torch.arange(self.channels.numel()))
        self.up.weight.zero_()

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """What the Skip-Cache stores of a read block's input: its ``width`` selected channels."""
        return x.index_select(-1, self.channels)

    def forward(self, taps: list[torch.Tensor], run_block: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The side network's output ``(B, T, n_embd)`` from the read blocks' taps. ``run_block(i, s, block=b)`` runs
        side block ``b`` in the place of backbone block ``i``: its RoPE tables, mask and KV-cache positions."""
        s = taps[0]
        for j, (i, block, tap) in enumerate(zip(self.reads, self.blocks, taps)):
            s = run_block(i, (s + tap) / 2 if j else s, block=block)
        return self.up(self.norm(s))

    @torch.no_grad()
    def prune_from(self, backbone: nn.ModuleList, ln_f: nn.Module) -> None:
        """Initialise every side block as its backbone block cut down to the most important channels, heads and
        MLP units; ``ln_f``'s weights for the selected channels go to the side network's final norm."""
        reads = [backbone[i] for i in self.reads]
        channels = _important_channels(reads, self.channels.numel())
        self.channels.copy_(channels)
        for side, frozen in zip(self.blocks, reads):
            _prune_block(side, frozen, channels)
        _copy_norm(self.norm, ln_f, channels)


def pretrained_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A linear layer's pretrained weight (or bias): LoRA layers keep it in ``.linear``."""
    return getattr(getattr(module, "linear", module), name)


def _important_channels(blocks: list[nn.Module], width: int) -> torch.Tensor:
    """The ``width`` residual channels the read blocks lean on most: each channel's share of the norms of the
    attention and MLP input weights, times the norm weight that scales it, summed over the blocks; sorted."""
    score = 0
    for block in blocks:
        for norm, layers in ((block.norm_1, [block.attn.qkv]), (block.norm_2, _mlp_inputs(block.mlp))):
            scale = getattr(norm, "weight", None)
            columns = sum(pretrained_weight(layer).float().norm(dim=0) for layer in layers)
            score = score + columns * (1 if scale is None else scale.float().abs())
    return score.topk(width).indices.sort().values


def _mlp_inputs(mlp: nn.Module) -> list[nn.Module]:
    return [m for n, m in mlp.named_children() if n != "proj"]


def _prune_block(side: nn.Module, frozen: nn.Module, channels: torch.Tensor) -> None:
    config = side.config
    heads = _important_heads(frozen, config.n_head)
    _copy_attention(side.attn, frozen.attn, heads, channels)
    units = _important_units(frozen.mlp, config.intermediate_size)
    for name, layer in side.mlp.named_children():
        source = getattr(frozen.mlp, name)
        rows, columns = (channels, units) if name == "proj" else (units, channels)
        _copy_linear(layer, source, rows, columns)
    for name in ("norm_1", "norm_2", "post_attention_norm", "post_mlp_norm"):
        if getattr(side, name) is not None:  # norm_2 is None where the attention norm is shared
            _copy_norm(getattr(side, name), getattr(frozen, name), channels)


def _important_heads(block: nn.Module, count: int) -> torch.Tensor:
    """Heads by the norm of what they write: their output projection columns times their value rows."""
    config = block.config
    hs, per_group = config.head_size, config.n_head // config.n_query_groups
    proj = pretrained_weight(block.attn.proj).float().unflatten(1, (config.n_head, hs)).norm(dim=(0, 2))
    v_rows = pretrained_weight(block.attn.qkv)[(config.n_head + config.n_query_groups) * hs :]
    values = v_rows.float().unflatten(0, (config.n_query_groups, hs)).norm(dim=(1, 2))
    score = proj * values.repeat_interleave(per_group)
    return score.topk(count).indices.sort().values


def _important_units(mlp: nn.Module, count: int) -> torch.Tensor:
    """MLP units by the product of their input rows' and output column's norms."""
    score = pretrained_weight(mlp.proj).float().norm(dim=0)
    for layer in _mlp_inputs(mlp):
        score = score * pretrained_weight(layer).float().norm(dim=1)
    return score.topk(count).indices.sort().values


def _copy_attention(side: nn.Module, frozen: nn.Module, heads: torch.Tensor, channels: torch.Tensor) -> None:
    """Each kept head's query rows and its group's key and value rows; the output projection's kept columns."""
    config = frozen.config
    hs, per_group = config.head_size, config.n_head // config.n_query_groups

    def rows_of(slots: torch.Tensor) -> torch.Tensor:  # the rows of these head-sized slots of a weight
        return (slots[:, None] * hs + torch.arange(hs, device=heads.device)).flatten()

    groups = heads // per_group
    q_rows = rows_of(heads)
    k_rows = rows_of(config.n_head + groups)
    v_rows = rows_of(config.n_head + config.n_query_groups + groups)
    _copy_linear(side.qkv, frozen.qkv, torch.cat([q_rows, k_rows, v_rows]), channels)
    _copy_linear(side.proj, frozen.proj, channels, rows_of(heads))


def _copy_linear(side: nn.Linear, frozen: nn.Module, rows: torch.Tensor, columns: torch.Tensor) -> None:
    side.weight.copy_(pretrained_weight(frozen)[rows][:, columns])
    bias = pretrained_weight(frozen, "bias")
    if side.bias is not None and bias is not None:
        side.bias.copy_(bias[rows])


def _copy_norm(side: nn.Module, frozen: nn.Module, channels: torch.Tensor) -> None:
    for name, parameter in side.named_parameters(recurse=False):
        parameter.copy_(getattr(frozen, name)[channels])
