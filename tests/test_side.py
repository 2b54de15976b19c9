"""The side network: exactly the base model when fresh, pruned from the backbone, both skips kept, KV cache."""

import litgpt
import pytest
import torch
from litgpt.generate.base import generate
from litgpt.lora import mark_only_lora_as_trainable
from test_model import FAMILIES, tiny

from litgpt_skip2lora import GPT, Config

SIDE = dict(skip2lora_block_indices=(0, 2), skip2lora_side_width=16)


def base_and_side(family: str, **kwargs) -> tuple[litgpt.model.GPT, GPT]:
    """A plain LitGPT model and the same weights with a side network, initialised as ``finetune`` does."""
    config = tiny(family, **{**SIDE, **kwargs})
    torch.manual_seed(0)
    base = litgpt.model.GPT(
        litgpt.Config.from_name(config.name, **{k: getattr(config, k) for k in FAMILIES[family] if k != "name"})
    )
    model = GPT(config)
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("skip2lora_side.") for k in result.missing_keys)
    model.initialize_side()
    return base, model


def with_random_output(model: GPT) -> GPT:
    torch.nn.init.normal_(model.skip2lora_side.up.weight, std=0.5)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("place", ["lm_head", "ln_f", "block.2"])
def test_fresh_side_network_equals_base_model_exactly(family: str, place: str) -> None:
    base, model = base_and_side(family, skip2lora_output_layer=place)
    idx = torch.randint(0, 96, (2, 9))
    assert torch.equal(model(idx), base(idx))
    assert torch.count_nonzero(model.skip2lora_side.blocks[0].attn.qkv.weight) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_full_width_pruning_copies_the_backbone_block(family: str) -> None:
    """At the backbone's own width every channel, head and unit is kept: the side block computes what its
    backbone block computes (grouped keys and values given to each head), which checks every index used."""
    config = tiny(family)
    _, model = base_and_side(family, skip2lora_side_width=config.n_embd)
    x = torch.randn(2, 7, config.n_embd)
    rope = model._rope_and_mask(7, None, None)
    for i, side_block in zip(model.skip2lora_side.reads, model.skip2lora_side.blocks):
        assert torch.equal(model.skip2lora_side.channels, torch.arange(config.n_embd))
        torch.testing.assert_close(model._block(i, x, rope, block=side_block), model._block(i, x, rope))


def test_pruning_keeps_the_most_important_channels() -> None:
    _, model = base_and_side("llama")
    backbone = model.transformer.h
    with torch.no_grad():
        for i in (0, 2):  # make channel 5 the one both read blocks lean on least
            backbone[i].norm_1.weight[5] = 0
            backbone[i].norm_2.weight[5] = 0
        backbone[0].norm_1.weight[7] = 100  # and channel 7 the one they lean on most
    model.initialize_side()
    channels = model.skip2lora_side.channels.tolist()
    assert 7 in channels and 5 not in channels and channels == sorted(channels) and len(channels) == 16
    assert torch.equal(model.skip2lora_side.norm.weight, model.transformer.ln_f.weight[channels])


def test_only_the_side_network_trains_and_no_backbone_block_is_in_the_graph() -> None:
    _, model = base_and_side("llama")
    with_random_output(model)
    mark_only_lora_as_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.skip2lora_side.named_parameters(prefix="skip2lora_side")}
    features = model.features(torch.randint(0, 96, (2, 9)))
    assert all(t.grad_fn is None for t in features.taps) and features.stream.grad_fn is None
    backbone = {p.data_ptr() for p in [*model.transformer.h.parameters(), model.transformer.wte.weight]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model.tail(features).logsumexp(-1).sum().backward()
    assert saved and not [t for t in saved if t.data_ptr() in backbone]  # the frozen head is multiplied through
    assert all(p.grad is not None for p in model.skip2lora_side.parameters())


def test_the_cache_stores_width_channels_per_read_block() -> None:
    _, model = base_and_side("llama")
    features = model.features(torch.randint(0, 96, (2, 9)))
    assert [tuple(t.shape) for t in features.taps] == [(2, 9, 16)] * 2
    assert model.config.skip2lora_tap_width == 16 and not model.config.skip2lora_position_wise


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_generation_equals_full_recomputation(family: str) -> None:
    _, model = base_and_side(family)
    with_random_output(model).eval()
    prompt = torch.randint(0, 96, (5,))
    model.max_seq_length = 16  # gemma's is 131072: its mask alone would take 17 GB
    model.set_kv_cache(batch_size=1)
    cached = generate(model, prompt, max_returned_tokens=12, temperature=0.0)
    model.clear_kv_cache()
    assert all(block.attn.kv_cache is None for block in model.skip2lora_side.blocks)
    tokens = prompt
    with torch.no_grad():
        while len(tokens) < 12:
            tokens = torch.cat([tokens, model(tokens[None])[0, -1].argmax().view(1)])
    assert torch.equal(cached, tokens)


def test_tail_from_features_equals_full_forward() -> None:
    _, model = base_and_side("gemma")
    with_random_output(model)
    idx = torch.randint(0, 96, (2, 9))
    assert torch.equal(model.tail(model.features(idx)), model(idx))
    supervised = torch.rand(2, 9) < 0.5
    torch.testing.assert_close(model.tail(model.features(idx), supervised), model(idx)[supervised])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(skip2lora_side_width=49), "skip2lora_side_width must be in 0..48"),
        (dict(skip2lora_side_width=-1), "skip2lora_side_width must be in"),
    ],
)
def test_bad_side_config_is_refused_with_a_clear_message(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**{**SIDE, **kwargs})


def test_pruning_a_block_with_a_shared_attention_norm() -> None:
    """phi-2's blocks have no norm_2 of their own (one norm feeds attention and MLP): pruning copies what there is."""
    shape = dict(n_layer=3, n_embd=64, n_head=4, intermediate_size=128, padded_vocab_size=96, vocab_size=96)
    torch.manual_seed(0)
    base = litgpt.model.GPT(litgpt.Config.from_name("phi-2", **shape))
    config = Config.from_name("phi-2", **shape, skip2lora_enabled=True, **{**SIDE, "skip2lora_side_width": 64})
    model = GPT(config)
    model.load_state_dict(base.state_dict(), strict=False)
    model.initialize_side()
    x, rope = torch.randn(2, 5, 64), model._rope_and_mask(5, None, None)
    assert config.shared_attention_norm
    torch.testing.assert_close(model._block(0, x, rope, block=model.skip2lora_side.blocks[0]), model._block(0, x, rope))
