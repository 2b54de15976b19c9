"""The head and its loss for many configurations at once, factored: ``head(stream + z_c) = head(stream) +
codes_c (W B_c)^T`` for a frozen float head ``W``.

``head(stream)`` is the same for every configuration, and each ``W B_c`` is a thin ``(vocabulary, k)`` matrix, so a
configuration's logits cost ``rows x k`` multiply-adds per vocabulary entry instead of ``rows x d``. What remains is
memory: a configuration's logits are ``rows x vocabulary`` floats, read and written about ten times by a plain
cross-entropy and its backward. :class:`FactoredCrossEntropy` never stores them whole: it walks the vocabulary in
chunks small enough to stay in cache, keeps a running log-sum-exp per row, and recomputes each chunk in backward, so
``head(stream)`` is read once per pass for all configurations and each configuration's logits never leave the cache.
"""

import torch
import torch.nn.functional as F

from litgpt_skip2lora.rows import IGNORE_INDEX

CHUNK_BYTES = 2**21
"""A vocabulary chunk's logits, ``rows x chunk`` float32 values, take about this many bytes (a core's L2 cache)."""


def factoring_pays(rows: int, d: int, ranks: list[int], training: bool) -> bool:
    """Whether the factored head costs fewer multiply-adds per vocabulary entry than ``head(stream + z)`` for each
    of the configurations, of ranks ``k`` (``n r``).

    Training, backward multiplies by the vocabulary-sized ``W`` once per step (for ``W B``) instead of once per row,
    which pays for each configuration when ``rows d > 2 d k + 3 rows k``. Without gradients, one configuration
    never gains, but ``C`` configurations share ``head(stream)``: ``C rows d > rows d + sum(d k + rows k)``.
    """
    if training:
        return all(rows * (d - 3 * k) > 2 * d * k for k in ranks)
    return (len(ranks) - 1) * rows * d > sum(ranks) * (d + rows)


def factored_cross_entropy(
    stream_logits: torch.Tensor, targets: torch.Tensor, codes: list[torch.Tensor], products: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Each configuration's mean cross-entropy of ``stream_logits + codes_c @ products_c^T`` at ``targets``
    (``IGNORE_INDEX`` rows left out), as ``F.cross_entropy`` gives it, at float32 rounding. The configurations are
    stacked, their ranks padded with zeros to the largest, so that each chunk is one batched matmul for all."""
    k = max(c.size(-1) for c in codes)
    codes = torch.stack([F.pad(c, (0, k - c.size(-1))) for c in codes])
    products = torch.stack([F.pad(p, (0, k - p.size(-1))) for p in products])
    return list(FactoredCrossEntropy.apply(stream_logits, targets, codes, products).unbind())


def _chunks(vocab: int, rows: int) -> list[slice]:
    size = max(256, CHUNK_BYTES // (4 * max(1, rows)))
    return [slice(start, min(vocab, start + size)) for start in range(0, vocab, size)]


class FactoredCrossEntropy(torch.autograd.Function):
    """``factored_cross_entropy``'s forward and backward, chunk by chunk over the vocabulary (module docstring), for
    ``codes`` ``(C, rows, k)`` and ``products`` ``(C, vocabulary, k)``."""

    @staticmethod
    def forward(
        ctx, stream_logits: torch.Tensor, targets: torch.Tensor, codes: torch.Tensor, products: torch.Tensor
    ) -> torch.Tensor:
        n, rows = codes.size(0), targets.numel()
        safe = targets.clamp(min=0)
        running_max = stream_logits.new_full((n, rows), -torch.inf, dtype=torch.float32)
        running_sum = stream_logits.new_zeros((n, rows), dtype=torch.float32)
        picked = stream_logits.new_zeros((n, rows), dtype=torch.float32)
        for chunk in _chunks(stream_logits.size(-1), n * rows):
            logits = _logits(stream_logits, codes, products, chunk)
            here, local = _targets_in(safe, chunk, n)
            new_max = torch.maximum(running_max, logits.amax(-1))
            scaled = (logits - new_max[..., None]).exp_().sum(-1)
            running_sum = running_sum * (running_max - new_max).exp() + scaled
            running_max = new_max
            picked += torch.where(here, logits.gather(2, local)[..., 0], 0.0)
        lse = running_max + running_sum.log()
        valid = targets != IGNORE_INDEX
        ctx.save_for_backward(stream_logits, targets, lse, codes, products)
        return ((lse - picked) * valid).sum(-1) / valid.sum().clamp(min=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        stream_logits, targets, lse, codes, products = ctx.saved_tensors
        n = codes.size(0)
        valid = targets != IGNORE_INDEX
        scale = valid[None] * (grad[:, None] / valid.sum().clamp(min=1))  # d loss_c / d logit, per row
        safe = targets.clamp(min=0)
        d_codes = torch.zeros_like(codes, dtype=torch.float32)
        d_products = torch.empty_like(products)
        for chunk in _chunks(stream_logits.size(-1), n * targets.numel()):
            logits = _logits(stream_logits, codes, products, chunk)
            here, local = _targets_in(safe, chunk, n)
            g = (logits - lse[..., None]).exp_()  # softmax
            g.scatter_add_(2, local, -here[..., None].float())  # minus the one-hot target
            g *= scale[..., None]
            d_codes += torch.bmm(g, products[:, chunk].float())
            d_products[:, chunk] = torch.bmm(g.transpose(1, 2).to(codes.dtype), codes)
        return None, None, d_codes.to(codes.dtype), d_products


def _logits(stream_logits: torch.Tensor, codes: torch.Tensor, products: torch.Tensor, chunk: slice) -> torch.Tensor:
    """Every configuration's logits over the vocabulary ``chunk``, in float32: ``(C, rows, chunk)``."""
    return torch.baddbmm(stream_logits[:, chunk], codes, products[:, chunk].transpose(1, 2)).float()


def _targets_in(targets: torch.Tensor, chunk: slice, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows' targets fall in ``chunk``, and their place in it (0 where they do not), shaped for ``n``
    configurations: ``(n, rows)`` and ``(n, rows, 1)``."""
    here = (targets >= chunk.start) & (targets < chunk.stop)
    local = torch.where(here, targets - chunk.start, 0)
    return here.expand(n, -1), local[None, :, None].expand(n, -1, 1)
