"""A 4-bit frozen part: the tail's arithmetic against a bitsandbytes head, on the CPU library bitsandbytes ships."""

import pytest
import torch
from litgpt.lora import mark_only_lora_as_trainable
from test_model import tiny

from litgpt_skip2lora import GPT, Config
from litgpt_skip2lora.model import Features

bnb = pytest.importorskip("bitsandbytes")


def quantized_head(model: GPT) -> torch.nn.Module:
    """``lm_head``'s weight packed into nf4 in place, as LitGPT's ``--quantize bnb.nf4`` stores it on a GPU."""
    head = model.lm_head.linear
    packed = bnb.nn.Linear4bit(head.in_features, head.out_features, bias=False, compute_dtype=torch.float32)
    packed.weight = bnb.nn.Params4bit(head.weight.data.clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
    model.lm_head.linear = packed
    return packed


def test_tail_against_a_4bit_head_is_the_head_applied_to_the_adapted_rows() -> None:
    config = tiny("llama")
    torch.manual_seed(0)
    model = GPT(config)
    mark_only_lora_as_trainable(model)
    for adapter in model.adapters:
        torch.nn.init.normal_(adapter.lora_B, std=0.5)
    packed = quantized_head(model)
    assert packed.weight.dtype == torch.uint8
    model.eval()
    features = model.features(torch.randint(0, 96, (4, 40)))
    # flat rows, many more than the ranks: the case where a float head would be factored (W B)
    rows = Features([t.flatten(0, 1) for t in features.taps], features.stream.flatten(0, 1))
    logits = model.tail(rows)
    expected = packed(rows.stream + sum(a(t) for a, t in zip(model.adapters, rows.taps)))
    torch.testing.assert_close(logits, expected)
    logits.logsumexp(-1).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".skip2lora.lora_" in n for n in trained)


def test_cache_fingerprint_names_the_quantization(tiny_checkpoint) -> None:
    """Features of a 4-bit backbone differ from a bf16 one's: a cache built for one is never served to the other."""
    from types import SimpleNamespace

    import lightning as L
    from litgpt.args import TrainArgs
    from litgpt.data import Alpaca

    from litgpt_skip2lora.cache import CacheArgs
    from litgpt_skip2lora.finetune import fingerprint

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    config = Config.from_file(
        tiny_checkpoint / "model_config.yaml", lora_r=4, skip2lora_enabled=True, skip2lora_block_indices=[0]
    )
    run = dict(checkpoint_dir=tiny_checkpoint, data=Alpaca(), train=TrainArgs(), cache=CacheArgs())
    plain = fingerprint(SimpleNamespace(**run, quantize=None), fabric, config)
    nf4 = fingerprint(SimpleNamespace(**run, quantize="bnb.nf4"), fabric, config)
    assert plain != nf4 and nf4["quantize"] == "bnb.nf4"
