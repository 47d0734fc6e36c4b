"""Durability terms: the simulated fine-tuning restores the weights (weight 0 is the plain run,
bit for bit), its loss equals transformers' own, both terms train and decrease."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cbscope.errors import ConfigError
from cbscope.lorra import durability, losses, train_circuit_breaker
from tests.test_lorra_trainer import CB, RETAIN, small_config

torch.set_num_threads(1)


def _lora(pair) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pair.model.named_parameters() if "lora_" in n}


def test_tar_with_weight_zero_leaves_the_outer_weights_untouched(tiny_llama: Path) -> None:
    plain = train_circuit_breaker(str(tiny_llama), small_config(steps=4, log_every=1), CB, RETAIN,
                                  show_progress=False)
    zero = train_circuit_breaker(
        str(tiny_llama), small_config(steps=4, log_every=1, durability="tar", durability_weight=0.0,
                                      durability_steps=3, durability_lr=1e-1),
        CB, RETAIN, show_progress=False)
    a, b = _lora(plain.pair), _lora(zero.pair)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in plain.metrics] == [m["loss"] for m in zero.metrics]
    # the inner loop did run: it measured what the simulated attack recovered
    assert all(m["durability"] > 0 for m in zero.metrics)


def test_tar_gradient_restores_the_weights_and_adds_its_gradient(tiny_llama: Path) -> None:
    from cbscope.lorra.data import EncodedData, LorraData, as_examples, as_retain, make_plan
    from cbscope.lorra.loop import StepSetup, _step_terms, prepare_pair

    config = small_config(durability="tar", durability_weight=2.0, durability_steps=2,
                          durability_lr=5e-2, lora_b_init_std=0.05).validate()
    pair = prepare_pair(str(tiny_llama), config)
    data = LorraData(as_examples(CB, require_response=True, what="cb"), as_retain(RETAIN))
    encoded = EncodedData(data, pair.tokenizer, config)
    batch = encoded.batch(make_plan(len(encoded.cb), encoded.sizes(), config)[0])
    setup = StepSetup.of(config, pair.n_layers)
    before = _lora(pair)
    t = _step_terms(pair, config, batch, 0, setup)
    pair.set_training(False)
    params = [p for p in pair.lora_parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    recovered = durability.tar_gradient(pair, config, batch, setup.targets, t["cb_orig"].detach())
    after = _lora(pair)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights restored exactly
    assert 0 < recovered <= 1
    assert max(float(p.grad.abs().max()) for p in params) > 0
    # the same term again, with double the weight, adds exactly twice the gradient
    first = [p.grad.clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    config.durability_weight = 4.0
    durability.tar_gradient(pair, config, batch, setup.targets, t["cb_orig"].detach())
    assert all(torch.allclose(p.grad, 2 * g, atol=1e-7) for p, g in zip(params, first, strict=True))


def test_response_lm_loss_equals_transformers_loss(tiny_llama: Path) -> None:
    from cbscope.lorra.loop import prepare_pair

    pair = prepare_pair(str(tiny_llama), small_config(lora_b_init_std=0.05).validate())
    ids = torch.tensor([[1, 6, 7, 8, 9, 10, 11, 12]])
    attention = torch.ones_like(ids)
    end = torch.tensor([3])
    labels = ids.clone()
    labels[:, :4] = -100  # request tokens 0..3; the response starts at 4
    with torch.no_grad():
        expected = pair.peft_model(input_ids=ids, attention_mask=attention, labels=labels).loss
        ours = durability.response_lm_loss(pair, ids, attention, end)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)


def test_noise_loss_by_hand() -> None:
    orig = torch.tensor([[[[3.0, 4.0]]]])  # 1 layer, 1 row, 1 token, |h^o| = 5
    broken = torch.tensor([[[[0.0, 0.0]]]])
    mask = torch.tensor([[1]])
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((1, 1, 1, 2), generator=torch.Generator().manual_seed(0)) * 5 / math.sqrt(2)
    expected = float(torch.linalg.vector_norm(broken - noise) / 5)
    assert durability.noise_loss(orig, broken, mask, generator).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["tar", "repnoise"])
def test_durability_terms_train_and_decrease(tiny_llama: Path, kind: str) -> None:
    # RR's own term grows the circuit-breaker norms, which the noise term resists: weight it up
    config = small_config(steps=8, lr=2e-2, log_every=1, durability=kind, lora_b_init_std=0.05,
                          durability_weight=1.0 if kind == "tar" else 20.0)
    result = train_circuit_breaker(str(tiny_llama), config, CB, RETAIN, show_progress=False)
    values = [m["durability"] for m in result.metrics]
    assert result.finished and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0]


def test_durability_config_checks() -> None:
    with pytest.raises(ConfigError, match="durability must be one of"):
        small_config(durability="vaccine").validate()
    with pytest.raises(ConfigError, match="durability 'none'"):
        small_config(recipe="official", durability="tar", max_length=16).validate()
    assert losses.LOSSES[-1] == "repbend"
