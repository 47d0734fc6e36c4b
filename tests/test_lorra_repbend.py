"""RepBend (``loss="repbend"``): each term against a direct formula, the pull rows, the step's
loss as the weighted sum of its terms, training on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cbscope.data import ChatExample
from cbscope.lorra import losses, repbend
from cbscope.lorra.data import EncodedExample
from tests.test_lorra_trainer import CB, RETAIN, small_config

torch.set_num_threads(1)


def test_cohesion_by_hand() -> None:
    orthogonal = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # 1 layer, 2 rows
    assert losses.cohesion_loss(orthogonal).item() == pytest.approx(1.0)
    same = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    assert losses.cohesion_loss(same).item() == pytest.approx(0.0, abs=1e-7)
    points = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    direct = 0.0
    for layer in range(2):
        pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
        direct += sum(1 - torch.nn.functional.cosine_similarity(points[layer, i], points[layer, j], dim=0).item()
                      for i, j in pairs) / len(pairs)
    assert losses.cohesion_loss(points).item() == pytest.approx(direct / 2, abs=1e-6)
    assert losses.cohesion_loss(points[:, :1]).item() == 0.0  # one row: no pair


def test_kl_by_hand() -> None:
    generator = torch.Generator().manual_seed(1)
    orig, broken = torch.randn(2, 3, 7, generator=generator), torch.randn(2, 3, 7, generator=generator)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    expected, count = 0.0, 0
    for b in range(2):
        for p in range(3):
            if mask[b, p]:
                p_o = torch.softmax(orig[b, p] / 2, dim=-1)
                p_c = torch.softmax(broken[b, p] / 2, dim=-1)
                expected += 4 * float((p_o * (p_o.log() - p_c.log())).sum())
                count += 1
    assert losses.kl_loss(orig, broken, mask).item() == pytest.approx(expected / count, rel=1e-5)
    assert losses.kl_loss(orig, orig, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_pull_by_hand() -> None:
    broken = torch.tensor([[[[3.0, 4.0], [1.0, 1.0]]]])  # 1 layer, 1 row, 2 positions
    target = torch.zeros_like(broken)
    assert losses.pull_loss(broken, target, torch.tensor([[1, 0]])).item() == pytest.approx(5.0)
    assert losses.pull_loss(broken, target, torch.tensor([[1, 1]])).item() == pytest.approx(
        (5.0 + math.sqrt(2)) / 2)


def test_pull_rows_and_partners() -> None:
    cb = [ChatExample([{"role": "user", "content": "a"}], "x"), ChatExample([{"role": "user", "content": "b"}], "y")]
    refusals = [ChatExample([{"role": "user", "content": "b"}], "no")]
    assert repbend.refusal_partners(cb, refusals) == [None, 0]
    rows = [EncodedExample([1, 5, 6, 7, 8], 3), EncodedExample([1, 9, 6, 7, 8, 9], 3)]
    partner = EncodedExample([1, 9, 6, 4, 4], 3)  # same request tokens as row 1
    ids, attention, mask = repbend.pull_rows(rows, [None, partner], 6, 0, tokens=2)
    assert ids.tolist() == [[0] * 6, [1, 9, 6, 4, 4, 0]]
    assert attention[1].tolist() == [1, 1, 1, 1, 1, 0]
    assert mask.tolist() == [[0] * 6, [0, 0, 1, 1, 0, 0]]  # the last request token and one more
    other = EncodedExample([1, 5, 5, 4], 3)  # another request: no pull
    assert repbend.pull_rows(rows, [None, other], 6, 0, tokens=2) is None


def test_step_loss_is_the_weighted_sum_of_its_terms(tiny_llama: Path) -> None:
    from cbscope.lorra.data import EncodedData, LorraData, as_examples, as_retain, make_plan
    from cbscope.lorra.loop import StepSetup, prepare_pair

    config = small_config(loss="repbend", retain_weight=2.0, repbend_unsafe=0.3, repbend_cohesion=0.7,
                          repbend_kl=1.5, repbend_pull=0.9, response_only_fraction=0.0,
                          batch_size=4, lora_b_init_std=0.05).validate()
    pair = prepare_pair(str(tiny_llama), config)
    data = LorraData(as_examples(CB, require_response=True, what="cb"), as_retain(RETAIN))
    encoded = EncodedData(data, pair.tokenizer, config)
    plan = make_plan(len(encoded.cb), encoded.sizes(), config)
    batch = encoded.batch(plan[0])
    assert batch.pull is not None and batch.pull[2].sum() > 0  # "how do i make a cake" has a refusal
    setup = StepSetup.of(config, pair.n_layers)
    t = repbend.repbend_step_terms(pair, config, batch, setup)
    pair.set_training(False)
    e = {k: float(v) for k, v in t["extra"].items()}
    assert all(e[k] > 0 for k in ("push", "cohesion", "pull", "kl", "retain_l2"))
    total = t["c_s"] * t["cb_loss"] + t["c_r"] * t["retain_loss"]
    expected = (2.0 * e["retain_l2"] - 0.3 * e["push"] + 0.7 * e["cohesion"] + 1.5 * e["kl"]
                + 0.9 * e["pull"])
    assert total.item() == pytest.approx(expected, rel=1e-6)
    # the push is cbscope's L2 distance on the circuit-breaker rows at the target layers
    direct = losses.retain_loss(t["cb_orig"], t["cb_broken"], t["cb_mask"]).item()
    assert e["push"] == pytest.approx(direct, rel=1e-6)


def test_repbend_trains_and_decreases(tiny_llama: Path) -> None:
    from cbscope.lorra import train_circuit_breaker

    config = small_config(loss="repbend", steps=8, lr=2e-2, log_every=1, lora_b_init_std=0.05)
    result = train_circuit_breaker(str(tiny_llama), config, CB, RETAIN, show_progress=False)
    losses_seen = [m["loss"] for m in result.metrics]
    assert result.finished and all(math.isfinite(x) for x in losses_seen)
    assert losses_seen[-1] < losses_seen[0]
    assert {"push", "cohesion", "kl", "pull", "retain_l2"} <= set(result.metrics[-1])
    assert result.info["frozen_cache"]["used"] is False  # RepBend runs its own frozen pass


def test_repbend_with_every_weight_zero_leaves_the_adapter_unchanged(tiny_llama: Path) -> None:
    from cbscope.lorra import train_circuit_breaker
    from cbscope.lorra.loop import prepare_pair

    config = small_config(loss="repbend", steps=3, retain_weight=0.0, repbend_unsafe=0.0,
                          repbend_cohesion=0.0, repbend_kl=0.0, repbend_pull=0.0,
                          lora_b_init_std=0.05)
    initial = {n: p.detach().clone() for n, p in prepare_pair(str(tiny_llama), config).model.named_parameters()
               if "lora_" in n}
    result = train_circuit_breaker(str(tiny_llama), config, CB, RETAIN, show_progress=False)
    assert all(m["loss"] == 0.0 for m in result.metrics)
    after = {n: p for n, p in result.pair.model.named_parameters() if "lora_" in n}
    assert after.keys() == initial.keys()
    assert all(torch.equal(after[n], initial[n]) for n in initial)


def test_official_recipe_trains_and_its_cb_term_decreases(tiny_llama: Path) -> None:
    from cbscope.lorra import train_circuit_breaker

    config = small_config(recipe="official", steps=8, lr=2e-2, log_every=1, max_length=16,
                          cb_max_length=16, lora_b_init_std=0.05, retain_response_only_fraction=0.5)
    result = train_circuit_breaker(str(tiny_llama), config, CB, RETAIN, show_progress=False)
    assert result.finished
    cb = [m["cb_loss"] for m in result.metrics]
    assert cb[-1] < cb[0]
    assert result.metrics[0]["c_r"] == pytest.approx(10.0 / 300)  # the official divisor
