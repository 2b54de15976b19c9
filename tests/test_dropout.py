"""Dropout from each configuration's own random stream: the masks its solo run draws, on any thread."""

import threading

import pytest
import torch
import torch.nn as nn
from test_model import tiny

from litgpt_skip2lora import GPT
from litgpt_skip2lora.dropout import BernoulliDropout, Dropout, SharedMasks, drawing_from


def test_the_lora_layers_dropout_keeps_1_minus_p_of_the_inputs_scaled_up() -> None:
    options = dict(lora_query=True, lora_mlp=True, lora_head=True, lora_dropout=0.25, skip2lora_output_layer="block.2")
    model = GPT(tiny(**options))
    trained = [*model.transformer.h[2].modules(), model.lm_head]
    dropouts = [m.lora_dropout for m in trained if hasattr(m, "lora_dropout")]
    assert len(dropouts) == 6 and all(type(d) is Dropout for d in dropouts)  # qkv, proj (r 0), fc_1, fc_2, proj, head
    x = torch.ones(1000, 1000)
    dropout = dropouts[0].train()
    torch.manual_seed(0)
    kept = dropout(x)
    assert torch.equal(kept.unique(), torch.tensor([0.0, 4 / 3]))
    assert (kept > 0).float().mean().item() == pytest.approx(0.75, abs=0.005)  # 1e6 draws: 0.0004 standard error
    torch.manual_seed(0)
    assert torch.equal(dropout(x), kept)  # outside drawing_from the global random stream decides it, as nn.Dropout
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_the_adapters_dropout_draws_torchs_own_masks(p: float) -> None:
    x = torch.randn(3, 40, 64)
    torch.manual_seed(5)
    expected = nn.Dropout(p).train()(x)
    generator = torch.Generator().manual_seed(5)
    with drawing_from(generator):
        assert torch.equal(BernoulliDropout(p).train()(x), expected)


@pytest.mark.parametrize("kind", [Dropout, BernoulliDropout])
def test_each_thread_draws_from_the_generator_it_was_given(kind: type[nn.Dropout]) -> None:
    dropout, x = kind(0.5).train(), torch.ones(64, 64)

    def masks(seed: int) -> list[torch.Tensor]:
        with drawing_from(torch.Generator().manual_seed(seed)):
            return [dropout(x) for _ in range(200)]

    alone = {seed: masks(seed) for seed in (1, 2)}
    together = {}
    threads = [threading.Thread(target=lambda s=seed: together.update({s: masks(s)})) for seed in (1, 2)]
    global_state = torch.get_rng_state()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(torch.get_rng_state(), global_state)  # the global generator drew nothing
    assert all(torch.equal(a, b) for seed in (1, 2) for a, b in zip(alone[seed], together[seed], strict=True))
    assert not torch.equal(alone[1][0], alone[2][0])


@pytest.mark.parametrize("kind", [Dropout, BernoulliDropout])
def test_streams_from_one_state_share_each_mask_and_end_where_drawing_alone_ends(kind: type[nn.Dropout]) -> None:
    """Three threads draw three masks each from one seed's state, two with the same probabilities and one with
    another from its second draw on: the two draw each mask once between them, the third its own from there."""
    x, alike, unlike = torch.ones(64, 64), (0.5, 0.5, 0.5), (0.5, 0.25, 0.5)

    def drawn(probabilities: tuple[float, ...], masks: SharedMasks | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        with drawing_from(torch.Generator().manual_seed(3), masks) as stream:
            return [kind(p).train()(x) for p in probabilities], stream.state()

    alone = {probabilities: drawn(probabilities, None) for probabilities in (alike, unlike)}
    masks, together = SharedMasks(), []
    threads = [
        threading.Thread(target=lambda p=probabilities: together.append((p, drawn(p, masks))))
        for probabilities in (alike, alike, unlike)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(masks) == 3 + 2
    assert len(together) == 3
    for probabilities, result in together:
        torch.testing.assert_close(result, alone[probabilities], rtol=0, atol=0)
