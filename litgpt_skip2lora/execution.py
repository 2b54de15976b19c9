"""How a step is executed, decided in one place for the step and the memory check: how many lanes compute a sweep,
whether its head is factored, and how many configurations share one pass of the plain head.
"""

import torch

from litgpt_skip2lora.adapters import Adapters
from litgpt_skip2lora.model import GPT
from litgpt_skip2lora.rows import RowLayout

HEAD_ROWS = 256
"""Rows that share one validation pass of the frozen head: on few rows the pass costs mostly reading the matrix."""


def lane_count(model: GPT, configurations: int) -> int:
    """On the CPU, for a tail with blocks, one a thread (at most one a configuration); else one."""
    on_cpu = model.lm_head.linear.weight.device.type == "cpu"
    if not on_cpu or RowLayout.of(model.config).flat:
        return 1
    return max(1, min(torch.get_num_threads(), configurations))


def factors_head(model: GPT, rows: int, adapters: list[Adapters], training: bool) -> bool:
    """Whether these configurations' ``rows`` get the factored head: where it is a plain frozen float matrix after
    ``ln_f`` and factoring pays, or wherever it can be below float32 (bf16 weights or autocast), where the paths
    round differently, so that a configuration takes the same path in a sweep as alone."""
    config, weight = model.config, model.lm_head.linear.weight
    plain = model.lm_head.r == 0 and config.skip2lora_after_ln_f and config.final_logit_softcapping is None
    frozen_float = not weight.requires_grad and weight.is_floating_point()  # 4-bit weights have no matrix
    if not (plain and frozen_float):
        return False
    below_float32 = weight.dtype != torch.float32 or torch.is_autocast_enabled(weight.device.type)
    return below_float32 or factoring_pays(rows, config.n_embd, [a.B.size(1) for a in adapters], training)


def head_group_size(model: GPT, rows: int, count: int, training: bool) -> int:
    """How many of ``count`` configurations share one pass of the plain head: in validation as many as fit in
    :data:`HEAD_ROWS`; in training one (a group keeps its graphs alive and saves little), as with ``lora_head``."""
    if training or any(p.requires_grad for p in model.lm_head.parameters()):
        return 1
    return max(1, min(count, HEAD_ROWS // max(1, rows)))


def factoring_pays(rows: int, d: int, ranks: list[int], training: bool) -> bool:
    """Whether the factored head costs fewer multiply-adds per vocabulary entry than the plain one, for ranks ``k``:
    plain, ``rows d`` a configuration (twice in training); factored, ``rows d`` once for the shared
    ``head(stream)``, plus ``d k`` for ``W B`` (twice in training) and ``rows k`` for the logits (four times)."""
    passes = 2 if training else 1
    plain = passes * len(ranks) * rows * d
    factored = rows * d + sum(passes * d * k + passes**2 * rows * k for k in ranks)
    return factored < plain
