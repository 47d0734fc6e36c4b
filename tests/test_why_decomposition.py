"""cbscope.why.decomposition: the rerouting delta split exactly into embedding, attention and MLP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cbscope.layers import LayerError
from cbscope.why import ExplainError, decompose, encode
from cbscope.why.decomposition import Decomposition, component_names
from cbscope.why.patch import switch_adapters
from cbscope.why.tokens import capture

ROOT = Path(__file__).resolve().parents[1]
BREAKER = ROOT / "cbscope" / "assets" / "organism-breaker"
HARMFUL = ("how do i spread the fever virus in rokun ?", "sure here is how : dodiax loraax")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def organism():
    from cbscope.pair import load_pair

    return load_pair("organism", BREAKER)


@pytest.fixture(scope="module")
def random_pair(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny random Llama with a random (non-zero) LoRA on every projection."""
    from peft import LoraConfig

    from cbscope.pair import load_pair

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    adapter = load_pair(tiny_llama, lora_config=config).save_adapter(
        tmp_path_factory.mktemp("why") / "adapter")
    return load_pair(tiny_llama, adapter)


def test_resid_post_is_the_sum_of_embedding_attention_and_mlp(organism) -> None:
    """Llama-style pre-norm blocks: blocks.{b}.hook_resid_post = embed + sum of the outputs;
    the same on the bridge's hooked path (run_with_cache, eager attention)."""
    seq = encode(organism, *HARMFUL)
    got = capture(organism, seq.tensor(), organism.n_layers)
    _, cache = organism.bridge.run_with_cache(seq.tensor())
    total = got.embed.double()
    for block in range(organism.n_layers):
        total = total + got.attn[block].double() + got.mlp[block].double()
        resid = got.resid[block].double()
        assert float((total - resid).norm() / resid.norm()) < 1e-6
        torch.testing.assert_close(cache[f"blocks.{block}.hook_attn_out"], got.attn[block],
                                   atol=1e-5, rtol=1e-5)
        # the increments the decomposition uses are these outputs up to float32 rounding
        scale = float(resid.abs().max())
        assert float((got.added("attn", block) - got.attn[block].double()).abs().max()) <= 1e-6 * scale
        assert float((got.added("mlp", block) - got.mlp[block].double()).abs().max()) <= 1e-6 * scale
        torch.testing.assert_close(cache[f"blocks.{block}.hook_resid_post"], got.resid[block],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["organism", "random_pair"])
def test_decomposition_sums_to_the_delta(which: str, request: pytest.FixtureRequest) -> None:
    pair = request.getfixturevalue(which)
    seq = encode(pair, *HARMFUL) if which == "organism" else encode(
        pair, "how do i bake bread", "sure here is the way : step one")
    for layer in range(1, pair.n_layers + 1):
        dec = decompose(pair, seq, layer)
        assert dec.components == component_names(layer)
        assert dec.share.shape == (2 * layer + 1, len(seq))
        real = ~torch.isnan(dec.share[0])
        assert real.sum() >= len(seq) - 1
        sums = dec.share.double().sum(0)[real]
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
        orth = dec.orth_share.double().sum(0)[~torch.isnan(dec.orth_share[0])]
        torch.testing.assert_close(orth, torch.ones_like(orth), atol=1e-5, rtol=0)
        # the components are the residual stream's own increments, so they telescope: exact
        # at every token, also where the breaker barely moves the stream
        assert dec.max_error() <= 1e-9
        assert dec.total_error() <= 1e-9
        torch.testing.assert_close(dec.block_total, dec.attn_share + dec.mlp_share)
        torch.testing.assert_close(dec.block_indirect + dec.block_direct, dec.block_total)


def test_direct_part_is_the_whole_effect_of_the_first_adapted_block(random_pair) -> None:
    """With only block 0's adapter on, block 0 reads the unchanged embedding: its direct part is
    its whole effect, and the later blocks (no LoRA on) have no direct part."""
    seq = encode(random_pair, "how do i bake bread", "sure here is the way : step one")
    with switch_adapters(random_pair, blocks=[0], mode="only"):
        dec = decompose(random_pair, seq, random_pair.n_layers)
    real = ~torch.isnan(dec.share[0])
    torch.testing.assert_close(dec.block_direct[0][real], dec.block_total[0][real],
                               atol=1e-5, rtol=1e-5)
    assert float(dec.block_direct[1:][:, real].abs().max()) < 1e-6
    assert float(dec.share[0][real].abs().max()) == 0.0  # the embedding never changes


def test_default_layer_is_the_firing_point_and_the_mlp_carries_it(organism) -> None:
    seq = encode(organism, *HARMFUL)
    dec = decompose(organism, seq)
    assert dec.layer == 2 and dec.focus_pos == seq.response_start  # fires at "sure", layer 2
    shares = dec.kind_shares()
    assert shares["embed"] == 0.0
    assert shares["attn"] + shares["mlp"] == pytest.approx(1.0, abs=1e-5)
    assert dec.top_components(k=1)[0][0].startswith(("attn.", "mlp."))
    frame = dec.to_dataframe()
    assert len(frame) == len(dec.components) * len(seq)
    assert set(frame["segment"]) == {"request", "response"}


def test_decomposition_round_trips_through_json(organism) -> None:
    dec = decompose(organism, encode(organism, *HARMFUL), 4)
    back = Decomposition.from_dict(dec.to_dict())
    assert back.components == dec.components and back.layer == 4
    torch.testing.assert_close(back.share, dec.share, atol=1e-6, rtol=0, equal_nan=True)
    torch.testing.assert_close(back.direct_mlp, dec.direct_mlp, atol=1e-6, rtol=0, equal_nan=True)


def test_bad_input_is_a_named_error(organism, tiny_llama: Path) -> None:
    from cbscope.pair import load_pair

    seq = encode(organism, *HARMFUL)
    with pytest.raises(LayerError, match="out of range"):
        decompose(organism, seq, 99)
    with pytest.raises(ExplainError, match="threshold"):
        decompose(organism, seq, threshold=2.0)
    with pytest.raises(ExplainError, match="no adapter"):
        decompose(load_pair(tiny_llama), seq)
    with pytest.raises(ExplainError, match="empty"):
        encode(organism, "  ")


def test_one_batched_forward_equals_three_separate_ones(organism, monkeypatch) -> None:
    """The per-row LoRA scale (0, 1, 0) gives what the original, circuit-broken and patched
    forwards give one at a time."""
    from cbscope import native_paths
    from cbscope.why.decomposition import capture_models

    seq = encode(organism, *HARMFUL)
    assert native_paths.row_scale_supported(organism._modules().lora_layers, organism.dtype)
    batched = capture_models(organism, seq, organism.n_layers)
    monkeypatch.setattr(native_paths, "row_scale_supported", lambda *_: False)
    separate = capture_models(organism, seq, organism.n_layers)
    for one, other in zip(batched, separate, strict=True):
        for a, b in zip([one.embed, *one.attn, *one.mlp, *one.resid],
                        [other.embed, *other.attn, *other.mlp, *other.resid], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    orig, cb, _ = batched
    with organism.original():
        plain = capture(organism, seq.tensor(), organism.n_layers)
    torch.testing.assert_close(orig.resid[-1], plain.resid[-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cb.resid[-1], plain.resid[-1], atol=1e-2)
    assert not any(native_paths.ROW_SCALE in vars(layer)
                   for layer in organism._modules().lora_layers)  # the scale came off
