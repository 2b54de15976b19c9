"""Which samples each process trains on: a fixed share per rank for the whole run, in a new order each epoch, so
that every rank's Skip-Cache stays useful (LitGPT's ``DistributedSampler`` deals samples out anew each epoch).
"""

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class RankShareSampler(Sampler[int]):
    """Rank ``rank``'s fixed share of ``size`` samples, in an order that depends on ``seed`` and the epoch only.
    Shares are equal in length, as DDP needs: a short share repeats its first samples."""

    def __init__(self, size: int, world_size: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}.")
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(size)
        share = order[rank::world_size].tolist()
        length = -(-size // world_size)
        self.share = (share * (length // max(1, len(share)) + 1))[:length] if share else []

    def set_epoch(self, epoch: int) -> None:
        """Called by Fabric's loader at the start of every pass."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(self.share)
        generator = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        return iter([self.share[i] for i in torch.randperm(len(self.share), generator=generator).tolist()])

    def __len__(self) -> int:
        return len(self.share)
