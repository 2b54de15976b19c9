"""Dropout that draws its masks from the running configuration's own random stream, set on its thread by
:func:`drawing_from` (outside it, torch's global generator), so that each configuration of a sweep draws what its
solo run would. Streams in the same state draw the same masks (a sweep whose seed is not swept): the first to need a
mask draws it and the others take it with the state it left (:class:`SharedMasks`; ``benchmarks.shared_masks``).
"""

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future

import torch
import torch.nn as nn

_thread = threading.local()
Draw = Callable[[torch.Generator | None], torch.Tensor]


def root(state: torch.Tensor) -> bytes:
    """A generator state as a key: streams that begin a step in the same state can share its masks."""
    return bytes(state.cpu().numpy())


class SharedMasks:
    """One step's masks, each kept for the streams that reach it from the same state by the same draws, until every
    stream that began in that state (of ``roots``) has taken it; a stream alone in its state keeps none."""

    def __init__(self, roots: Iterable[bytes] | None = None) -> None:
        self._lock = threading.Lock()
        self._drawn: dict[Hashable, Future] = {}
        self._taken: Counter = Counter()
        self._streams = None if roots is None else Counter(roots)
        self.count = 0
        """Masks drawn this step to be shared."""

    def takers(self, root: bytes) -> int | None:
        """How many of the step's streams begin in ``root`` (None when not told)."""
        return None if self._streams is None else self._streams[root]

    def get(
        self, key: Hashable, draw: Callable[[], tuple[torch.Tensor, torch.Tensor]], takers: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask and generator state at ``key``, drawn by the first stream there, let go once ``takers`` took it."""
        with self._lock:
            first = key not in self._drawn
            drawn = self._drawn.setdefault(key, Future())
            self.count += first
            self._taken[key] += 1
            if self._taken[key] == takers:
                del self._drawn[key], self._taken[key]
        if first:
            try:
                drawn.set_result(draw())
            except BaseException as error:
                drawn.set_exception(error)
        return drawn.result()

    def __len__(self) -> int:
        """Masks held now."""
        return len(self._drawn)


class Stream:
    """A configuration's random stream on its thread: its generator, and with ``masks`` what it drew so far."""

    def __init__(self, generator: torch.Generator, masks: SharedMasks | None = None) -> None:
        self.drawn: Hashable = None if masks is None else root(generator.get_state())
        self.takers = None if masks is None else masks.takers(self.drawn)
        self.generator, self.masks = generator, None if self.takers == 1 else masks
        self.after: torch.Tensor | None = None
        """The generator's state after its last mask, whichever stream drew it."""

    def mask(self, draw: Draw, *signature: Hashable) -> torch.Tensor:
        """``draw(generator)``, or the mask of a stream that began in this state and drew the same ``signature``s."""
        if self.masks is None:
            return draw(self.generator)
        self.drawn = (self.drawn, signature)
        mask, self.after = self.masks.get(self.drawn, lambda: self._own(draw), self.takers)
        return mask

    def state(self) -> torch.Tensor:
        """Where the stream stands: the state its solo run's generator would be in."""
        return self.generator.get_state() if self.after is None else self.after

    def _own(self, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        if self.after is not None:
            self.generator.set_state(self.after)
        mask = draw(self.generator)
        return mask, self.generator.get_state()


@contextlib.contextmanager
def drawing_from(generator: torch.Generator, masks: SharedMasks | None = None) -> Iterator[Stream]:
    """The dropout layers on this thread draw from ``generator`` while inside, sharing ``masks``."""
    before = getattr(_thread, "stream", None)
    _thread.stream = stream = Stream(generator, masks)
    try:
        yield stream
    finally:
        _thread.stream = before


def drawn_mask(draw: Draw, *signature: Hashable) -> torch.Tensor:
    """``draw`` on this thread's stream; outside :func:`drawing_from` on torch's global generator (``draw(None)``)."""
    stream = getattr(_thread, "stream", None)
    return draw(None) if stream is None else stream.mask(draw, *signature)


class BernoulliDropout(nn.Dropout):
    """``torch.nn.Dropout``'s masks, value for value, from this thread's stream, drawn in the input's logical order
    whatever its layout (a configuration reads its share of the features). The adapters use it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return torch.zeros_like(x)
        return x * drawn_mask(lambda generator: self.mask(x, generator), type(self), self.p, x.shape, x.dtype, x.device)

    def mask(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return (
            torch.empty(x.shape, dtype=x.dtype, device=x.device)
            .bernoulli_(1 - self.p, generator=generator)
            .div_(1 - self.p)
        )


class Dropout(BernoulliDropout):
    """The same distribution drawn by ``torch.rand``, faster than ``bernoulli_`` on the CPU for the tail's LoRA
    layers, which use it (``python -m benchmarks.dropout``)."""

    def mask(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        keep = torch.rand(x.shape, device=x.device, generator=generator).ge_(self.p)
        return keep.div_(1 - self.p).to(x.dtype)
