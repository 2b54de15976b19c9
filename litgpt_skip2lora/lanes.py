"""Lanes: a sweep's configurations side by side on the CPU's cores.

With a trainable tail every configuration runs transformer blocks of its own: a few hundred operations on a
micro-batch, many of them too small to spread well over the cores, or serial (the dropout draws). Configurations
side by side, one core each, keep every core busy instead (``python -m benchmarks.lanes`` times both ways).
So a sweep on the CPU splits its live configurations into lanes, as many as the process has threads, up to one a
configuration: each lane computes its share one configuration after another, on its share of the cores and on a
replica of the model that shares every weight. On a GPU, and for adapters alone (whose heads are shared,
:mod:`litgpt_skip2lora.head`), there is one lane: the process's (:func:`~litgpt_skip2lora.execution.lane_count`).
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
    """A model of its own modules over the same tensors: installing a configuration into it leaves ``model`` as
    it was, and it costs no weight memory."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


class Lanes:
    """``count`` replicas of the model (the first is the model itself), each with a thread of its own that computes
    on an equal share of the process's cores (one each on a CPU with as many cores as lanes)."""

    def __init__(self, model: GPT, count: int) -> None:
        self.models = [model, *(replica(model) for _ in range(count - 1))]
        self.pool = None
        if count > 1:
            cores = max(1, torch.get_num_threads() // count)
            self.pool = ThreadPoolExecutor(count, initializer=torch.set_num_threads, initargs=(cores,))
            weakref.finalize(self, self.pool.shutdown, wait=False)

    def map(self, work: Callable[[GPT, list[Share]], list[Result]], items: list[Share]) -> list[Result]:
        """``work(model, share)`` for each lane's share of ``items``, on the lanes' threads with the caller's grad
        mode; the results in ``items``' order. One share runs on the caller's thread, on every core."""
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
