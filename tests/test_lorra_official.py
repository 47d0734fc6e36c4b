"""The official-compatible recipe: parity with a re-implementation of the official formula,
hand-computed values of its pieces, its layout, its config checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cbscope.errors import ConfigError
from cbscope.layers import LayerError
from cbscope.lorra import losses, official
from cbscope.lorra.config import LorraConfig
from cbscope.lorra.data import EncodedExample
from tests.conftest import make_tiny_llama

TARGETS = [2, 4]


# ---------------------------------------------------------------------- the reference
def reference_official_loss(model, cb_ids, cb_att, r_ids, r_att, targets, alpha, step):
    """The official ``compute_loss``, re-written here from its logic: a model truncated after
    block ``max(targets)``, ``output_hidden_states``, the retain term's ``nanmean`` over every
    masked hidden state, the circuit-breaker term's masked ReLU cosine, progress ``t / 300``."""
    progress = step / 300
    c_r, c_s = alpha * progress, alpha * (1 - progress)
    with model.disable_adapter():
        model.eval()
        with torch.no_grad():
            states = model(input_ids=r_ids, attention_mask=r_att, output_hidden_states=True)
            orig_retain = torch.stack(states.hidden_states).detach()
            retain_mask = r_att.repeat(len(states.hidden_states), 1, 1).unsqueeze(-1)
            orig_retain = orig_retain * retain_mask
            hidden = model(input_ids=cb_ids, attention_mask=cb_att, output_hidden_states=True)
            orig_cb = torch.stack([hidden.hidden_states[layer].detach() for layer in targets])
    model.train()
    states = model(input_ids=r_ids, attention_mask=r_att, output_hidden_states=True)
    lora_retain = torch.stack(states.hidden_states) * retain_mask
    retain = torch.norm(lora_retain - orig_retain, dim=-1, p=2, dtype=torch.float).nanmean()
    hidden = model(input_ids=cb_ids, attention_mask=cb_att, output_hidden_states=True)
    lora_cb = torch.stack([hidden.hidden_states[layer] for layer in targets])
    cb_mask = cb_att.repeat(len(targets), 1, 1).unsqueeze(-1)
    unit_lora = lora_cb / torch.norm(lora_cb, dim=-1, keepdim=True, dtype=torch.float)
    unit_orig = orig_cb / torch.norm(orig_cb, dim=-1, keepdim=True, dtype=torch.float)
    inner = (unit_lora * unit_orig) * cb_mask
    cb = torch.relu(inner.sum(dim=-1)).sum() / cb_mask.sum()
    return c_r * retain + c_s * cb


@pytest.fixture(scope="module")
def six_block_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-block random Llama: targets 2 and 4 truncate it after block 4, as the official code
    truncates its models."""
    return make_tiny_llama(tmp_path_factory.mktemp("llama6"), layers=6, seed=3)


def _official_config(**overrides) -> LorraConfig:
    base = dict(target_layers=TARGETS, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                lora_b_init_std=0.05, recipe="official", steps=150, max_length=12,
                cb_max_length=12, lorra_alpha=10.0, response_only_fraction=0.5,
                retain_response_only_fraction=0.5, seed=0)
    return LorraConfig(**{**base, **overrides}).validate()


def _examples() -> tuple[list[EncodedExample], list[EncodedExample]]:
    cb = [EncodedExample([1, 6, 7, 8, 9, 10, 11], 3), EncodedExample([1, 12, 6, 7, 13, 14, 15, 16, 17], 5),
          EncodedExample([1, 9, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], 2)]
    retain = [EncodedExample([1, 6, 7, 8], 2), EncodedExample([1, 10, 11, 12, 13, 14, 15], 3),
              EncodedExample(list(range(1, 16)), 4)]
    return cb, retain


def test_official_loss_and_gradient_equal_the_reference(six_block_llama: Path) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from cbscope.lorra.loop import prepare_pair

    config = _official_config()
    pair = prepare_pair(str(six_block_llama), config)
    cb, retain = _examples()
    # padded with <eos>, as the official code pads (pad_token = eos_token): the tiny Llama's own
    # <pad> has a zero embedding, so a left-padded position stays exactly zero through every
    # block and the official formula's 0/0 cosine there times a 0 mask is NaN
    batch = official.official_collate(cb, retain, 2, cb_length=12, retain_length=12)
    assert batch.cb_attention[:, :6].sum(dim=1).tolist() == [3, 5, 2]  # left-padded requests
    assert batch.retain_attention[2].all()  # 15 tokens truncated on the right to 12

    step = 37
    terms = official.official_step_terms(pair, config, batch, step - 1, TARGETS)
    loss = terms["c_s"] * terms["cb_loss"] + terms["c_r"] * terms["retain_loss"]
    loss.backward()
    pair.set_training(False)
    ours = {name.removeprefix("base_model.model."): p.grad.clone()
            for name, p in pair.model.named_parameters() if "lora_" in name}

    # the official side: the model truncated after block max(target), LoRA on blocks 0..4
    hf_config = AutoConfig.from_pretrained(six_block_llama)
    hf_config.num_hidden_layers = max(TARGETS) + 1
    truncated = AutoModelForCausalLM.from_pretrained(six_block_llama, config=hf_config,
                                                     dtype=torch.float32)
    reference = get_peft_model(truncated, PeftLoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(config.lora_target_modules),
        layers_to_transform=list(range(max(TARGETS) + 1)), task_type="CAUSAL_LM"))
    weights = {name: p for name, p in pair.model.named_parameters() if "lora_" in name}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(weights[name.removeprefix("base_model.model.")])
    assert len(weights) == sum("lora_" in n for n, _ in reference.named_parameters())
    expected = reference_official_loss(reference, batch.cb_ids, batch.cb_attention,
                                       batch.retain_ids, batch.retain_attention, TARGETS,
                                       config.lorra_alpha, step)
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-6, (loss.item(), expected.item())
    assert terms["retain_loss"].item() > 0 and terms["cb_loss"].item() > 0
    worst = 0.0
    for name, p in reference.named_parameters():
        if "lora_" in name:
            worst = max(worst, float((p.grad - ours[name.removeprefix("base_model.model.")]).abs().max()))
    largest = max(float(g.abs().max()) for g in ours.values())
    assert largest > 1e-3  # a gradient that means something
    # fp32 rounding of entries of size ~`largest`: within 1e-6 relative to the largest entry
    assert worst <= 1e-6 * largest, (worst, largest)


def test_official_retain_loss_hand_computed() -> None:
    # one state, two rows of two positions; row 1's first position is padding
    orig = [torch.zeros(2, 2, 3)]
    broken = [torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]],
                            [[9.0, 9.0, 9.0], [1.0, 0.0, 0.0]]])]
    attention = torch.tensor([[1, 1], [0, 1]])
    # distances 5, 2, (padding), 1 -> 8, over (1 state + 1 embedding) * 2 rows * 2 positions
    value = official.official_retain_loss(orig, broken, attention)
    assert value.item() == pytest.approx(8.0 / 8.0)
    assert official.official_retain_loss(orig, broken, attention, zero_states=0).item() == 2.0
    # cbscope's own retain term on the same tensors: real tokens only, one layer -> 8 / 3
    assert losses.retain_loss(orig[0][None], broken[0][None], attention).item() == pytest.approx(8 / 3)


def test_official_schedule_divides_by_300() -> None:
    assert official.official_schedule(150, 10.0) == pytest.approx(losses.schedule(150, 150, 10.0))
    assert official.official_schedule(1, 10.0) == pytest.approx((10 * 299 / 300, 10 / 300))
    # at T = 100 cbscope would reach c_r = alpha / 2; the official code only a third
    assert official.official_schedule(100, 9.0) == pytest.approx((6.0, 3.0))
    assert losses.schedule(100, 100, 9.0) == pytest.approx((4.5, 4.5))
    with pytest.raises(ValueError, match="300"):
        official.official_schedule(300, 10.0)


def test_official_layout_hand_made() -> None:
    cb = [EncodedExample([5, 6, 7, 8, 9], 2)]
    retain = [EncodedExample([5, 6, 7], 1), EncodedExample([1, 2, 3, 4, 5, 6], 2)]
    batch = official.official_collate(cb, retain, 0, cb_length=6, retain_length=4)
    assert batch.cb_ids.tolist() == [[0, 5, 6, 7, 8, 9]]
    assert batch.cb_attention.tolist() == [[0, 1, 1, 1, 1, 1]]
    assert batch.retain_ids.tolist() == [[0, 5, 6, 7], [1, 2, 3, 4]]
    assert batch.retain_attention.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    long = official.official_collate([EncodedExample(list(range(1, 9)), 5)], retain, 0,
                                     cb_length=6, retain_length=4)
    assert long.cb_ids.tolist() == [[1, 2, 3, 6, 7, 8]]  # request and response cut on the right


def test_official_config_checks() -> None:
    with pytest.raises(ConfigError, match="300"):
        _official_config(steps=300)
    with pytest.raises(ConfigError, match="token_mask"):
        _official_config(token_mask="response")
    with pytest.raises(ConfigError, match="loss must be 'rr'"):
        _official_config(loss="rmu")
    config = _official_config()
    assert config.resolved_lora_layers(6) == [0, 1, 2, 3, 4]  # block max(target) included
    assert LorraConfig(target_layers=TARGETS).resolved_lora_layers(6) == [0, 1, 2, 3]
    assert config.resolved_retain_layers(6) == [1, 2, 3, 4, 5]
    with pytest.raises(LayerError, match="final-norm"):
        config.resolved_retain_layers(4)


def test_official_plan_drops_each_request_once() -> None:
    from cbscope.lorra.data import make_plan

    config = _official_config(steps=40, batch_size=4)
    plan = make_plan(6, {"benign": 5}, config)
    seen: dict[int, set[int]] = {}
    for entry in plan:
        for index, drop in zip(entry["cb"], entry["drop"], strict=True):
            seen.setdefault(index, set()).add(drop)
    assert all(len(flags) == 1 for flags in seen.values())  # fixed per example
    assert {next(iter(f)) for f in seen.values()} == {0, 1}
    assert all("retain_drop" in entry for entry in plan)
    default = LorraConfig(steps=40, batch_size=4).validate()
    assert "retain_drop" not in make_plan(6, {"benign": 5}, default)[0]  # old plans unchanged


def test_official_preset_trains_the_organism_in_bf16(tiny_organism: Path, tmp_path: Path) -> None:
    from cbscope.run import RunConfig, Runner

    out = tmp_path / "official"
    result = Runner(RunConfig(preset="official", model=str(tiny_organism), out=out, progress=False,
                              lorra_overrides={"steps": 2, "batch_size": 4, "log_every": 1,
                                               "val_size": 2, "target_layers": [1, 3]})).run()
    assert result.finished
    saved = LorraConfig.load(out)
    assert saved.recipe == "official" and saved.dtype == "bfloat16" and saved.lora_b_init_std == 0.0
    assert result.metrics[0]["c_r"] == pytest.approx(10.0 / 300)
    # its step runs its own (left-padded) frozen pass, so no cache is built for it
    assert result.info["frozen_cache"]["used"] is False
    assert "official recipe" in result.info["frozen_cache"]["why"]
