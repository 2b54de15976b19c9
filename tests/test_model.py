"""The Skip2-LoRA model: equality with LitGPT at B=0, gradients, the frozen backbone's memory, KV cache, bad input."""

from dataclasses import asdict

import litgpt
import pytest
import torch
import torch.nn.functional as F
from litgpt.generate.base import generate

from litgpt_skip2lora import GPT, Adapters, Config, head
from litgpt_skip2lora.adapters import Features, Reads
from litgpt_skip2lora.execution import factoring_pays
from litgpt_skip2lora.model import mark_trainable, save_model_config, trainable_state
from litgpt_skip2lora.rows import RowLayout

FAMILIES = {
    "pythia": dict(name="pythia-14m", n_layer=3, n_embd=32, n_head=4, padded_vocab_size=96, vocab_size=96),
    "gemma": dict(  # sliding-window blocks, per-block RoPE tables, extra norms, logit softcapping
        name="gemma-3-1b-it",
        n_layer=3,
        n_embd=64,
        n_head=4,
        n_query_groups=1,
        head_size=16,
        intermediate_size=128,
        padded_vocab_size=96,
        vocab_size=96,
    ),
    "llama": dict(
        name="SmolLM2-135M-Instruct",
        n_layer=3,
        n_embd=48,
        n_head=6,
        n_query_groups=2,
        intermediate_size=96,
        padded_vocab_size=96,
        vocab_size=96,
    ),
}
PLACES = ["lm_head", "ln_f", "block.2"]


def tiny(family: str = "llama", **kwargs) -> Config:
    spec = dict(FAMILIES[family])
    spec.update(lora_r=4, lora_alpha=8, skip2lora_enabled=True, skip2lora_block_indices=(0, 1))
    spec.update(kwargs)
    return Config.from_name(spec.pop("name"), **spec)


def with_random_adapters(model: GPT) -> GPT:
    torch.nn.init.normal_(model.skip2lora.B, std=0.5)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("place", PLACES)
def test_zero_b_equals_base_model_exactly(family: str, place: str) -> None:
    config = tiny(family, skip2lora_output_layer=place)
    torch.manual_seed(0)
    base = litgpt.model.GPT(
        litgpt.Config.from_name(config.name, **{k: getattr(config, k) for k in FAMILIES[family] if k != "name"})
    )
    model = GPT(config)
    result = model.load_state_dict(base.state_dict(), strict=False)  # a plain LitGPT checkpoint loads as it is
    assert result.unexpected_keys == []
    assert result.missing_keys == ["skip2lora.A", "skip2lora.B"]
    idx = torch.randint(0, 96, (2, 9))
    assert torch.equal(model(idx), base(idx))


@pytest.mark.parametrize("place", PLACES)
def test_gradients_reach_adapters_only(place: str) -> None:
    model = with_random_adapters(GPT(tiny(skip2lora_output_layer=place)))
    mark_trainable(model)
    model(torch.randint(0, 96, (2, 9))).sum().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"skip2lora.A", "skip2lora.B"} == set(trainable_state(model))


def test_ordinary_lora_together_keeps_the_graph() -> None:
    model = with_random_adapters(GPT(tiny(lora_query=True, lora_value=True)))
    mark_trainable(model)
    assert model.backbone_requires_grad()
    model(torch.randint(0, 96, (2, 9))).sum().backward()
    qkv_grads = [p.grad for n, p in model.named_parameters() if "attn.qkv.lora_B" in n]
    assert len(qkv_grads) == 3 and all(g is not None and g.abs().sum() > 0 for g in qkv_grads)


def test_ordinary_lora_before_a_block_output_place_is_off() -> None:
    model = GPT(tiny(lora_query=True, skip2lora_output_layer="block.2"))
    lora_blocks = {n.split(".")[2] for n, _ in model.named_parameters() if "qkv.lora_A" in n}
    assert lora_blocks == {"2"}
    mark_trainable(model)
    assert not model.backbone_requires_grad()


def saved_bytes(n_layer: int) -> int:
    model = with_random_adapters(GPT(tiny(n_layer=n_layer)))
    mark_trainable(model)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 96, (2, 16))).sum().backward()
    return total


def test_backward_memory_does_not_grow_with_depth() -> None:
    assert saved_bytes(2) == saved_bytes(8) > 0


@pytest.mark.parametrize("place", PLACES)
def test_kv_cached_generation_equals_full_recomputation(place: str) -> None:
    torch.manual_seed(1)
    model = with_random_adapters(GPT(tiny(skip2lora_output_layer=place))).eval()
    prompt = torch.randint(0, 96, (5,))
    model.set_kv_cache(batch_size=1)
    cached = generate(model, prompt, max_returned_tokens=12, temperature=0.0)
    model.clear_kv_cache()
    tokens = prompt
    with torch.no_grad():
        while len(tokens) < 12:
            tokens = torch.cat([tokens, model(tokens[None])[0, -1].argmax().view(1)])
    assert torch.equal(cached, tokens)


@pytest.mark.parametrize("place", PLACES)
def test_chunked_head_equals_unchunked(place: str) -> None:
    model = with_random_adapters(GPT(tiny(skip2lora_output_layer=place)))
    idx = torch.randint(0, 96, (2, 9))
    assert torch.allclose(torch.cat(model(idx, lm_head_chunk_size=4), dim=1), model(idx), atol=1e-6)


@pytest.mark.parametrize("place", PLACES)
def test_tail_from_features_equals_full_forward(place: str) -> None:
    model = with_random_adapters(GPT(tiny(skip2lora_output_layer=place)))
    idx = torch.randint(0, 96, (2, 9))
    features = model.backbone(idx)
    assert torch.equal(model.tail(features), model(idx))
    supervised = torch.rand(2, 9) < 0.5  # training logits: the supervised rows only
    assert torch.allclose(model.tail(features, supervised), model(idx)[supervised], atol=1e-5)
    if RowLayout.of(model.config).flat:  # such a tail also takes the supervised rows flat, as the cache stores them
        assert torch.allclose(
            model.tail(Features(features.taps[:, supervised], features.stream[supervised])),
            model(idx)[supervised],
            atol=1e-5,
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_the_last_blocks_supervised_rows_equal_the_full_forwards(family: str) -> None:
    # the tail's last block runs its MLP on the supervised rows only: serial and parallel residuals, extra norms
    model = with_random_adapters(GPT(tiny(family, skip2lora_output_layer="block.1")))
    idx = torch.randint(0, 96, (2, 9))
    supervised = torch.rand(2, 9) < 0.5
    torch.testing.assert_close(model.tail(model.backbone(idx), supervised), model(idx)[supervised])


def test_features_run_without_autograd_graph() -> None:
    model = GPT(tiny())
    mark_trainable(model)
    features = model.backbone(torch.randint(0, 96, (1, 4)))
    assert features.stream.grad_fn is None and features.taps.grad_fn is None


def test_adapter_only_checkpoint_roundtrip(tmp_path) -> None:
    source = with_random_adapters(GPT(tiny()))
    mark_trainable(source)
    torch.save(trainable_state(source), tmp_path / "adapters.pth")
    target = GPT(tiny())
    target.load_state_dict(source.state_dict())
    target.skip2lora.reset_parameters()
    idx = torch.randint(0, 96, (1, 6))
    assert not torch.equal(target(idx), source(idx))
    target.load_state_dict(torch.load(tmp_path / "adapters.pth"), strict=False)
    assert torch.equal(target(idx), source(idx))


def test_adapters_sum_each_blocks_low_rank_output() -> None:
    adapters = Adapters(Reads(blocks=(0, 1), start=2), n_embd=16, r=4, alpha=8, dropout=0.0)
    assert adapters.A.shape == (2, 4, 16) and adapters.B.shape == (16, 8) and adapters.scaling == 2.0
    assert torch.count_nonzero(adapters.B) == 0 and torch.count_nonzero(adapters.A) == 2 * 4 * 16
    torch.nn.init.normal_(adapters.B)
    taps = torch.randn(2, 3, 16)
    expected = sum(taps[i] @ adapters.A[i].T @ adapters.B[:, 4 * i : 4 * (i + 1)].T * 2.0 for i in range(2))
    torch.testing.assert_close(adapters(taps), expected)


def test_negative_indices_count_from_the_end_and_config_round_trips(tmp_path) -> None:
    config = tiny(skip2lora_block_indices=[-1, 0])
    assert config.skip2lora_block_indices == (0, 2)
    path = tmp_path / "model_config.yaml"
    save_model_config(config, tmp_path)
    assert Config.from_file(path) == config
    assert Config.from_checkpoint(tmp_path) == config
    assert asdict(Config.from_name("pythia-14m"))["skip2lora_enabled"] is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(skip2lora_block_indices=(3,)), "3 is not a block index of a 3-layer model"),
        (dict(skip2lora_block_indices=(-4,)), "-4 is not a block index"),
        (dict(skip2lora_block_indices=(1, 1)), "duplicates"),
        (dict(skip2lora_block_indices=(0, -3)), "duplicates"),
        (dict(skip2lora_block_indices=()), "skip2lora_block_indices is empty"),
        (dict(lora_r=0), "need lora_r > 0"),
        (dict(skip2lora_output_layer="head"), "skip2lora_output_layer must be"),
        (dict(skip2lora_output_layer="block.3"), "skip2lora_output_layer must be"),
        (dict(skip2lora_output_layer="block.1", skip2lora_block_indices=(0, 2)), "lies after the output place"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_the_factored_loss_equals_the_plain_head_for_every_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two configurations' losses from ``head(stream)`` and their ``W B``, the vocabulary walked in chunks, equal
    the cross-entropy of ``head(stream + z_c)``, with the same gradients; a row without a target counts for none."""
    monkeypatch.setattr(head, "CHUNK_BYTES", 4 * 64 * 40)  # a 96-word vocabulary in three chunks of 40 or fewer
    model = GPT(tiny(lora_r=1, lora_alpha=2)).requires_grad_(False)  # the head frozen, as in training
    features = model.backbone(torch.randint(0, 96, (4, 16)))
    flat = Features(features.taps.flatten(1, 2), features.stream.flatten(0, 1))
    targets = torch.randint(0, 96, (64,))
    targets[5] = -100
    configurations = [with_random_adapters(GPT(tiny(lora_r=r, lora_alpha=2))).skip2lora for r in (1, 2)]
    for adapters in configurations:
        adapters.requires_grad_(True)
    shared = model.shared_head(flat, configurations)
    codes = [a.codes(flat.taps) for a in configurations]
    factored = head.factored_cross_entropy(shared.stream_logits, targets, codes, shared.products)
    torch.stack(factored).sum().backward()
    ours = [p.grad.clone() for a in configurations for p in a.parameters()]
    model.zero_grad(set_to_none=True)
    for a in configurations:
        a.zero_grad(set_to_none=True)
    plain = []
    for adapters in configurations:
        model.skip2lora = adapters
        plain.append(F.cross_entropy(model.tail(flat), targets))
    torch.stack(plain).sum().backward()
    torch.testing.assert_close(torch.stack(factored), torch.stack(plain))
    for g1, g2 in zip(ours, [p.grad for a in configurations for p in a.parameters()]):
        torch.testing.assert_close(g1, g2)


def test_factoring_pays_when_configurations_share_the_head() -> None:
    assert factoring_pays(rows=64, d=32, ranks=[2], training=True)
    assert not factoring_pays(rows=64, d=32, ranks=[2], training=False)  # one configuration: the plain head
    assert factoring_pays(rows=64, d=32, ranks=[2, 2, 2], training=False)
    assert not factoring_pays(rows=4, d=32, ranks=[16], training=True)
    # SmolLM2's d, 4 blocks of rank 8, a batch of 73 supervised rows: one configuration keeps the plain head, a sweep
    # of ranks 4 and 8 shares head(stream) and factors it
    assert not factoring_pays(rows=73, d=576, ranks=[32], training=True)
    assert factoring_pays(rows=73, d=576, ranks=[16] * 4 + [32] * 4, training=True)
