"""A 4-bit frozen part: the tail's arithmetic against a bitsandbytes head, on the CPU library bitsandbytes ships."""

import lightning as L
import pytest
import torch

from litgpt_skip2lora import GPT, Config
from litgpt_skip2lora.backbone import fingerprint
from litgpt_skip2lora.cache import CacheArgs, DiskStore
from litgpt_skip2lora.model import mark_trainable

bnb = pytest.importorskip("bitsandbytes")


def quantized_head(model: GPT) -> torch.nn.Module:
    """``lm_head``'s weight packed into nf4 in place, as LitGPT's ``--quantize bnb.nf4`` stores it on a GPU."""
    head = model.lm_head.linear
    packed = bnb.nn.Linear4bit(head.in_features, head.out_features, bias=False, compute_dtype=torch.float32)
    packed.weight = bnb.nn.Params4bit(head.weight.data.clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
    model.lm_head.linear = packed
    return packed


def test_tail_against_a_4bit_head_is_the_head_applied_to_the_adapted_rows() -> None:
    shape = dict(n_layer=3, n_embd=32, n_head=4, padded_vocab_size=96, vocab_size=96, lora_r=4, lora_alpha=8)
    torch.manual_seed(0)
    model = GPT(Config.from_name("pythia-14m", **shape, skip2lora_enabled=True, skip2lora_block_indices=(0, 1)))
    mark_trainable(model)
    torch.nn.init.normal_(model.skip2lora.B, std=0.5)
    packed = quantized_head(model)
    assert packed.weight.dtype == torch.uint8
    model.eval()
    # flat rows, many more than the ranks: the case where a float head would be factored (W B)
    rows = model.backbone(torch.randint(0, 96, (4, 40)))
    logits = model.tail(rows)
    torch.testing.assert_close(logits, packed(rows.stream + model.skip2lora(rows.taps)))
    logits.logsumexp(-1).mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"skip2lora.A", "skip2lora.B"}


def test_a_cache_built_for_a_float_backbone_is_never_served_to_a_4bit_one(tiny_checkpoint, tmp_path) -> None:
    """Features of a 4-bit backbone differ from a bf16 one's: the fingerprint names the quantization."""
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    config = Config.from_file(
        tiny_checkpoint / "model_config.yaml", lora_r=4, skip2lora_enabled=True, skip2lora_block_indices=[0]
    )
    model, args = GPT(config), CacheArgs()
    store = DiskStore(tmp_path, fingerprint(fabric, model, model.skip2lora.reads, args, tiny_checkpoint, None))
    store.put("train-sample", {"stream": torch.ones(2, 32)})
    store.close()
    with pytest.warns(UserWarning, match="built for other inputs"):
        store = DiskStore(tmp_path, fingerprint(fabric, model, model.skip2lora.reads, args, tiny_checkpoint, "bnb.nf4"))
    assert store.get("train-sample") is None
