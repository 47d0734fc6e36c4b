"""LorraConfig: paper defaults, layer resolution, validation and JSON round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbscope.layers import LayerError
from cbscope.lorra import ConfigError, LorraConfig


def test_defaults_mirror_the_paper() -> None:
    c = LorraConfig()
    assert (c.lora_r, c.lora_alpha, c.lora_dropout) == (16, 16, 0.05)
    assert (c.lorra_alpha, c.lr, c.steps, c.loss) == (10.0, 1e-4, 150, "rr")
    assert set(c.lora_target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    assert c.lora_b_init_std > 0  # zero B never moves RR
    assert c.resolved_target_layers(32) == [10, 20]
    assert c.resolved_lora_layers(32) == list(range(20))
    assert c.resolved_retain_layers(32) == list(range(1, 21))
    assert LorraConfig(retain_layers="target").resolved_retain_layers(32) == [10, 20]
    assert c.resolved_target_layers(30) == [9, 19]


def test_peft_config() -> None:
    lora = LorraConfig(target_layers=[2, 4]).lora_config(6)
    assert lora.layers_to_transform == [0, 1, 2, 3]
    assert lora.r == 16 and lora.lora_alpha == 16


def test_layer_errors() -> None:
    with pytest.raises(LayerError, match="out of range"):
        LorraConfig(target_layers=[7]).resolved_target_layers(6)
    with pytest.raises(LayerError, match="block indices"):
        LorraConfig(lora_layers=[6]).resolved_lora_layers(6)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("loss", "nope", "loss must be"), ("token_mask", "x", "token_mask"), ("steps", 0, "steps"),
     ("retain_mixture", {"evil": 1.0}, "unknown retain sources"), ("lr", 0.0, "lr")],
)
def test_validation(field: str, value, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LorraConfig(**{field: value}).validate()


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lr", float("inf"), "lr must be a finite number, not inf"),
        ("lorra_alpha", float("nan"), "lorra_alpha must be a finite number, not nan"),
        ("lora_dropout", float("nan"), "lora_dropout must be a finite number"),
        ("retain_weight", float("-inf"), "retain_weight must be a finite number"),
        ("rmu_scale", float("inf"), "rmu_scale must be a finite number"),
        ("retain_mixture", {"benign": float("inf")}, "every number in retain_mixture must be finite"),
        ("steps", "10", r"steps must be int, not '10' \(str\)"),
        ("steps", 10.0, "steps must be int"),
        ("retain_relative", 1, "retain_relative must be bool"),
        ("target_layers", [1, "2"], "target_layers must be list"),
        ("retain_token_mask", 3, "retain_token_mask must be"),
        ("lora_alpha", 0, "lora_alpha must be > 0"),
        ("cb_max_length", 1, "cb_max_length must be >= 2"),
    ],
)
def test_types_and_non_finite_numbers_are_rejected(field: str, value, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        LorraConfig.from_dict({field: value})
    assert LorraConfig.from_dict({"lr": 1, "retain_mixture": {"benign": 2}}).lr == 1  # ints are numbers


def test_json_round_trip(tmp_path: Path) -> None:
    c = LorraConfig(target_layers=[3, 5], retain_mixture={"benign": 2.0}, loss="rmu")
    path = c.save(tmp_path)
    assert path.name == "lorra_config.json"
    assert LorraConfig.load(tmp_path) == c
    with pytest.raises(ConfigError, match="unknown LorraConfig fields"):
        LorraConfig.from_dict({"nonsense": 1})
