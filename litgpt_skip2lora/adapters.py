"""The Skip2-LoRA adapters (Matsutani et al., ASP-DAC 2025, arXiv 2410.21073): ``z`` is the sum over selected blocks
``i`` of ``B_i A_i dropout(x_i) * alpha / r``, ``x_i`` block ``i``'s input. The ``A_i`` are stacked ``(n, r, d)``
and the ``B_i`` side by side ``(d, n r)``, so ``z = codes @ B^T`` is two batched matmuls whatever ``n`` is.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from litgpt_skip2lora.dropout import BernoulliDropout


class Reads(NamedTuple):
    """What the adapters read from the frozen backbone: the inputs of ``blocks``, and the residual stream at
    ``start``, where ``z`` joins it (block ``start``'s input; ``n_layer``: after the last block)."""

    blocks: tuple[int, ...]
    start: int


@dataclass
class Features:
    """What the tail needs from the backbone: ``taps``, the inputs of ``reads.blocks`` stacked ``(n, ..., d)``, and
    ``stream`` at ``reads.start``; a sweep's union, of which :meth:`of` gives each configuration its share."""

    taps: torch.Tensor
    stream: torch.Tensor
    reads: Reads | None = None

    def of(self, reads: Reads) -> "Features":
        """The features ``reads`` asks for, from these: a stream at a later place is one of the taps here."""
        if self.reads is None or self.reads == reads:
            return self
        have = self.reads.blocks
        taps = self.taps[[have.index(b) for b in reads.blocks]]
        stream = self.stream if reads.start == self.reads.start else self.taps[have.index(reads.start)]
        return Features(taps, stream, reads)


class Adapters(nn.Module):
    """The adapters of the blocks ``reads`` names, as one module: ``forward(taps)`` is ``z``. A fresh module has
    ``B = 0``: ``z = 0``."""

    def __init__(self, reads: Reads, n_embd: int, r: int, alpha: int, dropout: float) -> None:
        super().__init__()
        self.reads = reads
        n = len(reads.blocks)
        self.A = nn.Parameter(torch.empty(n, r, n_embd))
        self.B = nn.Parameter(torch.empty(n_embd, n * r))
        self.scaling = alpha / r
        self.dropout = BernoulliDropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each ``A_i`` as LoRA's ``A`` (Kaiming-uniform), ``B`` zero."""
        with torch.no_grad():
            for a in self.A:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(self.B)

    def codes(self, taps: torch.Tensor) -> torch.Tensor:
        """Every adapter's rank-r code of each row side by side: ``(..., n r)``."""
        codes = torch.einsum("n...d,nrd->...nr", self.dropout(taps), self.A)
        return codes.flatten(-2) * self.scaling

    def forward(self, taps: torch.Tensor) -> torch.Tensor:
        return self.codes(taps) @ self.B.T
