"""Dropout that draws its masks from the running configuration's own random stream.

A sweep trains its configurations side by side, on threads of their own (:mod:`litgpt_skip2lora.lanes`), and each
must draw the masks its solo run would draw. torch's global generator is one per process, so the layers that train
(the adapters', the tail's LoRA layers') draw from the generator that :func:`drawing_from` set on their thread,
and from the global one outside it, as ``torch.nn.Dropout`` does.
"""

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn as nn

_thread = threading.local()


@contextlib.contextmanager
def drawing_from(generator: torch.Generator) -> Iterator[None]:
    """The dropout layers on this thread draw from ``generator`` while inside."""
    before = current_generator()
    _thread.generator = generator
    try:
        yield
    finally:
        _thread.generator = before


def current_generator() -> torch.Generator | None:
    """The generator this thread's dropout draws from; None: torch's global one."""
    return getattr(_thread, "generator", None)


class BernoulliDropout(nn.Dropout):
    """``torch.nn.Dropout``'s masks, value for value (the same ``bernoulli_`` draw, then scaled), from this thread's
    generator. The adapters use it: the faithful method trains as it always has."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return torch.zeros_like(x)
        return x * self.mask(x)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x).bernoulli_(1 - self.p, generator=current_generator()).div_(1 - self.p)


class Dropout(BernoulliDropout):
    """The same distribution with the mask drawn by ``torch.rand``: on the CPU ``bernoulli_`` is the slower draw, and
    a tail's LoRA layers draw a mask over every position of every block (``python -m benchmarks.dropout`` times a tail
    step with each). The LoRA layers use it."""

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(x.shape, device=x.device, generator=current_generator()).ge_(self.p)
        return keep.div_(1 - self.p).to(x.dtype)
