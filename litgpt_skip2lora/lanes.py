"""Lanes: a sweep's configurations side by side on the CPU's cores. A tail's operations on a micro-batch are too
small to spread well over the cores, or serial (the dropout draws), so each lane computes its share of the
configurations on its share of the cores, with a replica of the model sharing every weight (``benchmarks.lanes``
times both ways; :func:`~litgpt_skip2lora.execution.lane_count` says how many).
"""

import copy
import itertools
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from litgpt_skip2lora.model import GPT

Share = TypeVar("Share")
Result = TypeVar("Result")


def replica(model: GPT) -> GPT:
    """A model of its own modules over the same tensors, costing no weight memory."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


class Lanes:
    """``count`` replicas of the model (the first is itself), each with a thread on an equal share of the cores."""

    def __init__(self, model: GPT, count: int) -> None:
        self.models = [model, *(replica(model) for _ in range(count - 1))]
        self.pool = None
        if count > 1:
            cores = max(1, torch.get_num_threads() // count)
            self.pool = ThreadPoolExecutor(count, initializer=torch.set_num_threads, initargs=(cores,))
            weakref.finalize(self, self.pool.shutdown, wait=False)

    def map(self, work: Callable[[GPT, list[Share]], list[Result]], items: list[Share]) -> list[Result]:
        """``work(model, share)`` for each lane's share of ``items``, with the caller's grad mode, in order."""
        bounds = [len(items) * k // len(self.models) for k in range(len(self.models) + 1)]
        shares = [items[start:end] for start, end in itertools.pairwise(bounds) if end > start]
        if self.pool is None or len(shares) == 1:
            return work(self.models[0], items)
        grad = torch.is_grad_enabled()

        def in_lane(model: GPT, share: list[Share]) -> list[Result]:
            with torch.set_grad_enabled(grad):
                return work(model, share)

        futures = [self.pool.submit(in_lane, model, share) for model, share in zip(self.models, shares)]
        return [result for future in futures for result in future.result()]
