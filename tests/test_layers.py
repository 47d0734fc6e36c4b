import pytest

from cbscope.layers import (
    LayerError,
    block_index,
    default_target_layers,
    figure6_layers,
    parse_layers,
    resid_hook_name,
    validate_layers,
)


def test_paper_layer_ten_is_block_nine() -> None:
    assert resid_hook_name(10) == "blocks.9.hook_resid_post"
    assert block_index(10) == 9


def test_layer_zero_is_rejected() -> None:
    with pytest.raises(LayerError, match="embedding"):
        resid_hook_name(0)


def test_validate_sorts_and_names_out_of_range() -> None:
    assert validate_layers([20, 10, 10], 32) == [10, 20]
    with pytest.raises(LayerError, match=r"\[33\].*32 blocks"):
        validate_layers([10, 33], 32)
    with pytest.raises(LayerError, match="no target layers"):
        validate_layers([], 32, what="target layer")


def test_parse_layers() -> None:
    assert parse_layers("5, 10,20") == [5, 10, 20]
    assert parse_layers("all") is None
    assert parse_layers(None) is None
    with pytest.raises(LayerError, match="cannot parse"):
        parse_layers("five")


def test_default_targets_scale_with_depth() -> None:
    assert default_target_layers(32) == [10, 20]
    assert default_target_layers(30) == [9, 19]
    low, high = default_target_layers(6)
    assert 1 <= low < high <= 6
    assert figure6_layers(32) == [5, 10, 20]


def test_adapter_target_layers_from_the_saved_config(tmp_path) -> None:
    import json

    from cbscope.layers import adapter_target_layers

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "cbscope" / "assets"
    assert adapter_target_layers(root / "organism-breaker", 6) == [2, 4, 6]
    assert adapter_target_layers(root / "smollm2-breaker", 30) == [9, 19]  # null -> train_info
    assert adapter_target_layers(None, 30) == default_target_layers(30)
    (tmp_path / "lorra_config.json").write_text(json.dumps({"target_layers": [3, 99]}))
    assert adapter_target_layers(tmp_path, 6) == [3]
    (tmp_path / "lorra_config.json").write_text("not json")
    assert adapter_target_layers(tmp_path, 6) == default_target_layers(6)
