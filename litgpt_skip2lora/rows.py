"""Which rows of a sample the tail reads, decided here once. A tail without blocks treats each position alone, so a
sample keeps its supervised rows only, end to end in a batch (``flat``); a tail with blocks attends across
positions, so a sample keeps every real position, in padded ``(B, T)`` batches.
"""

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100
Entry = dict[str, torch.Tensor]
"""One sample's tail input: ``taps`` ``(n, rows, d)``, ``stream`` ``(rows, d)``, ``targets`` ``(rows,)``; an int8
Skip-Cache adds a ``<name>.scale`` per float tensor."""


def shifted_targets(labels: torch.Tensor, length: int) -> torch.Tensor:
    """The target of each of a sample's ``length`` positions: the next position's label; none for the last."""
    targets = torch.full((length,), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    targets[:-1] = labels[1:length]
    return targets


@dataclass(frozen=True)
class RowLayout:
    flat: bool
    """Supervised rows only, concatenated across a batch; else padded sequences of every real position."""

    @classmethod
    def of(cls, config) -> "RowLayout":
        """Flat exactly when the tail has no block (the output place is ``lm_head`` or ``ln_f``)."""
        return cls(flat=config.skip2lora_tail_start == config.n_layer)

    def kept(self, targets: torch.Tensor) -> torch.Tensor | slice:
        """The positions a sample keeps, given its :func:`shifted_targets`."""
        return (targets != IGNORE_INDEX).nonzero().squeeze(1) if self.flat else slice(0, len(targets))

    def row_count(self, labels: torch.Tensor) -> int:
        """Rows a sample of these ``labels`` keeps (for the cache's size estimate)."""
        return int((labels[1:] != IGNORE_INDEX).sum()) if self.flat else len(labels)

    def supervised(self, targets: torch.Tensor) -> torch.Tensor | None:
        """The mask of the rows the loss reads, for the tail to pick; None when every row is one (flat)."""
        return None if self.flat else targets != IGNORE_INDEX

    def collate(self, entries: list[Entry], pin: bool) -> Entry:
        """A batch of entries (taps keep their ``n`` in front), in pinned host memory with ``pin``."""
        batch = {}
        for name in entries[0]:
            parts = [e[name] for e in entries]
            dim = 1 if parts[0].dim() == 3 else 0
            if self.flat:
                shape = [*parts[0].shape[:dim], sum(p.size(dim) for p in parts), *parts[0].shape[dim + 1 :]]
                out = torch.empty(shape, dtype=parts[0].dtype, device=parts[0].device, pin_memory=pin)
                batch[name] = torch.cat(parts, dim=dim, out=out)
            else:
                pad = IGNORE_INDEX if name == "targets" else 0
                padded = pad_sequence([p.movedim(dim, 0) for p in parts], batch_first=True, padding_value=pad)
                padded = padded.movedim(2, 0) if dim else padded
                batch[name] = padded.pin_memory() if pin else padded
        return batch
