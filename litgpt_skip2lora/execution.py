"""How a step is executed, decided in one place: how many lanes compute a sweep's configurations
(:mod:`litgpt_skip2lora.lanes`), whether their head is factored (:mod:`litgpt_skip2lora.head`), and how many of them
share one pass of the plain head. The step and the memory check (:func:`~litgpt_skip2lora.sweep.check_fits`) both
ask here, so what is counted is what runs.
"""

import torch

from litgpt_skip2lora.adapters import Adapters
from litgpt_skip2lora.model import GPT
from litgpt_skip2lora.rows import RowLayout

HEAD_ROWS = 256
"""Rows that share one pass of a frozen head over the vocabulary. On few rows the pass costs mostly the reading of
the ``vocabulary x d`` matrix, so configurations with few supervised rows each, as on a label task, share that read;
the bound keeps a group's logits as small as a few hundred rows'."""


def lane_count(model: GPT, configurations: int) -> int:
    """How many lanes a sweep of ``configurations`` uses: on the CPU, when its tail has blocks, as many as the
    process has threads (at most one a configuration); else one."""
    on_cpu = model.lm_head.linear.weight.device.type == "cpu"
    if not on_cpu or RowLayout.of(model.config).flat:
        return 1
    return max(1, min(torch.get_num_threads(), configurations))


def factors_head(model: GPT, rows: int, adapters: list[Adapters], training: bool) -> bool:
    """Whether ``rows`` rows of the configurations with these ``adapters`` get the factored head: where the head is
    a plain frozen float matrix after ``ln_f`` (so the rows are flat) and factoring pays
    (:func:`factoring_pays`). Below float32 (bf16 weights, or autocast) the two paths round
    differently (the plain one rounds ``stream + z``, the factored one ``head(stream)``), so there the head is
    factored wherever it can be: a configuration takes the same path in a sweep as alone (ask under the run's
    autocast)."""
    config, weight = model.config, model.lm_head.linear.weight
    plain = model.lm_head.r == 0 and config.skip2lora_after_ln_f and config.final_logit_softcapping is None
    frozen_float = not weight.requires_grad and weight.is_floating_point()  # 4-bit weights have no matrix
    if not (plain and frozen_float):
        return False
    below_float32 = weight.dtype != torch.float32 or torch.is_autocast_enabled(weight.device.type)
    return below_float32 or factoring_pays(rows, config.n_embd, [a.B.size(1) for a in adapters], training)


def head_group_size(model: GPT, rows: int, count: int, training: bool) -> int:
    """How many of ``count`` configurations, ``rows`` rows each, share one pass of the plain head: in validation as
    many as fit in :data:`HEAD_ROWS`. A training step takes one at a time: a group would keep its configurations'
    graphs alive together, and on the CPU its larger logits, softmax and gradient cost about what the shared read
    saves. A head with a trained part (``lora_head``) is each configuration's own."""
    if training or any(p.requires_grad for p in model.lm_head.parameters()):
        return 1
    return max(1, min(count, HEAD_ROWS // max(1, rows)))


def factoring_pays(rows: int, d: int, ranks: list[int], training: bool) -> bool:
    """Whether the factored head (:mod:`litgpt_skip2lora.head`) costs fewer multiply-adds per vocabulary entry than
    ``head(stream + z)`` for the configurations of ranks ``k`` (``n r``) together.

    The plain head costs ``rows d`` a configuration, twice when training (the gradient of ``z``). The factored one
    costs ``rows d`` once, for the ``head(stream)`` every configuration shares, and per configuration ``d k`` for
    ``W B`` and ``rows k`` for its logits; training doubles ``W B`` (its gradient) and quadruples the logits'
    (recomputed in backward, then both gradients). So one configuration pays only for many rows of a small rank, and
    a sweep pays far sooner: the shared ``head(stream)`` is its largest term.
    """
    passes = 2 if training else 1
    plain = passes * len(ranks) * rows * d
    factored = rows * d + sum(passes * d * k + passes**2 * rows * k for k in ranks)
    return factored < plain
