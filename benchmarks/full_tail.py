"""A tail trained in full, measured against the tail's LoRA layers on the frontier: the blocks from the output
place on train every weight (with the adapters); the blocks before it stay frozen, never back-propagated, and cached.
On the definitions task it lost to the tail's LoRA layers (the ``full-tail`` points of
``benchmarks/frontier/definitions.yaml``, EVALUATION_GUIDE.md §8), so the package does not offer it.

    python -m benchmarks.full_tail finetune_skip2lora --config <tail YAML> --lora_query false --lora_key false \\
        --lora_value false --lora_projection false --lora_mlp false ...
"""

import litgpt_skip2lora.finetune
from litgpt_skip2lora.__main__ import main
from litgpt_skip2lora.model import GPT, mark_trainable


def mark_tail_trainable(model: GPT) -> None:
    """The adapters, any LoRA layer, and every parameter of the tail's blocks train."""
    mark_trainable(model)
    for block in model.transformer.h[model.config.skip2lora_tail_start :]:
        block.requires_grad_(True)


if __name__ == "__main__":
    litgpt_skip2lora.finetune.mark_trainable = mark_tail_trainable
    main()
