"""The head and its loss for many configurations at once, factored: ``head(stream + z_c) = head(stream) +
codes_c (W B_c)^T`` for a frozen float head ``W``, so a configuration's logits cost ``rows x k`` multiply-adds per
vocabulary entry instead of ``rows x d``. :class:`FactoredCrossEntropy` never stores them whole: it walks the
vocabulary in cache-sized chunks with a running log-sum-exp per row, and recomputes each chunk in backward.
"""

import torch

from litgpt_skip2lora.rows import IGNORE_INDEX

CHUNK_BYTES = 2**21
"""A vocabulary chunk's logits, ``rows x chunk`` float32 values, take about this many bytes (a core's L2 cache)."""


def factored_cross_entropy(
    stream_logits: torch.Tensor, targets: torch.Tensor, codes: list[torch.Tensor], products: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Each configuration's mean cross-entropy of ``stream_logits + codes_c @ products_c^T`` at ``targets``
    (``IGNORE_INDEX`` rows left out), as ``F.cross_entropy`` gives it, at float32 rounding."""
    return list(FactoredCrossEntropy.apply(stream_logits, targets, *codes, *products).unbind())


def _chunks(vocab: int, rows: int) -> list[slice]:
    size = max(256, CHUNK_BYTES // (4 * max(1, rows)))
    return [slice(start, min(vocab, start + size)) for start in range(0, vocab, size)]


class FactoredCrossEntropy(torch.autograd.Function):
    """``factored_cross_entropy``'s forward and backward, chunk by chunk over the vocabulary (module docstring)."""

    @staticmethod
    def forward(ctx, stream_logits: torch.Tensor, targets: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        n = len(tensors) // 2
        codes, products = tensors[:n], tensors[n:]
        rows = targets.numel()
        safe = targets.clamp(min=0)
        running_max = stream_logits.new_full((n, rows), -torch.inf, dtype=torch.float32)
        running_sum = stream_logits.new_zeros((n, rows), dtype=torch.float32)
        picked = stream_logits.new_zeros((n, rows), dtype=torch.float32)
        for chunk in _chunks(stream_logits.size(-1), rows):
            shared = stream_logits[:, chunk]
            here, local = _targets_in(safe, chunk)
            for c in range(n):
                logits = torch.addmm(shared, codes[c], products[c][chunk].T).float()
                new_max = torch.maximum(running_max[c], logits.amax(-1))
                scaled = (logits - new_max[:, None]).exp_().sum(-1)
                running_sum[c] = running_sum[c] * (running_max[c] - new_max).exp() + scaled
                running_max[c] = new_max
                picked[c] += torch.where(here, logits.gather(1, local[:, None])[:, 0], 0.0)
        lse = running_max + running_sum.log()
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(stream_logits, targets, lse, *tensors)
        return ((lse - picked) * valid).sum(-1) / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        stream_logits, targets, lse, *tensors = ctx.saved_tensors
        n = len(tensors) // 2
        codes, products = tensors[:n], tensors[n:]
        valid = targets != IGNORE_INDEX
        scale = valid[None] * (grad[:, None] / valid.sum().clamp(min=1))  # d loss_c / d logit, per row
        safe = targets.clamp(min=0)
        d_codes = [torch.zeros_like(c, dtype=torch.float32) for c in codes]
        d_products = [torch.empty_like(p) for p in products]
        for chunk in _chunks(stream_logits.size(-1), targets.numel()):
            shared = stream_logits[:, chunk]
            here, local = _targets_in(safe, chunk)
            for c in range(n):
                logits = torch.addmm(shared, codes[c], products[c][chunk].T).float()
                g = (logits - lse[c, :, None]).exp_()  # softmax
                g.scatter_add_(1, local[:, None], -here[:, None].float())  # minus the one-hot target
                g = (g * scale[c, :, None]).to(codes[c].dtype)
                d_codes[c] += g.float() @ products[c][chunk].float()
                d_products[c][chunk] = g.T @ codes[c]
        d_codes = [d.to(c.dtype) for d, c in zip(d_codes, codes)]
        return None, None, *d_codes, *d_products


def _targets_in(targets: torch.Tensor, chunk: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows' targets fall in ``chunk``, and their place in it (0 where they do not)."""
    here = (targets >= chunk.start) & (targets < chunk.stop)
    return here, torch.where(here, targets - chunk.start, 0)
