"""The bridge's native fast paths (attention, normalisation) equal its hooked forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from cbscope.pair import ModelPair, load_pair


@pytest.fixture(scope="module")
def pair(tiny_llama: Path) -> ModelPair:
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    return load_pair(tiny_llama, lora_config=config)


def batch(pair: ModelPair) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, pair.model.config.vocab_size, (4, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[:2, -4:] = 0  # right padding
    return ids, mask


def pattern_hooks(pair: ModelPair, calls: list[str]) -> list:
    """Observing hooks inside every attention and normalisation: forces the hooked forwards."""
    names = [f"blocks.{b}.{point}" for b in range(pair.n_layers)
             for point in ("attn.hook_pattern", "ln1.hook_scale", "ln2.hook_normalized")]
    return [(name, lambda _t, hook: calls.append(hook.name)) for name in names]


def test_fast_path_is_installed_and_skips_the_hooked_reimplementation(pair: ModelPair) -> None:
    attention = pair.bridge.blocks[0].attn
    assert "forward" in vars(attention)
    assert attention.original_component.config._attn_implementation == "sdpa"
    assert pair.bridge.original_model.config._attn_implementation == "eager"
    calls: list[str] = []
    ids, mask = batch(pair)
    pair.resid(ids, mask, [1, 2, 3])
    assert calls == []
    with pair.bridge.hooks(fwd_hooks=pattern_hooks(pair, calls)):
        pair.resid(ids, mask, [1, 2, 3])
    assert {name.split(".", 2)[2] for name in calls} == {
        "attn.hook_pattern", "ln1.hook_scale", "ln2.hook_normalized"
    }
    assert len(calls) == 3 * pair.n_layers
    norm = pair.bridge.blocks[0].ln1
    assert "forward" in vars(norm)  # the normalisation fast path is installed too


def test_native_and_hooked_paths_agree_with_padding_and_gradients(pair: ModelPair) -> None:
    ids, mask = batch(pair)
    real = mask.bool()
    results = []
    for hooked in (False, True):
        pair.model.zero_grad(set_to_none=True)
        pair.bridge.zero_grad(set_to_none=True)
        hooks = pattern_hooks(pair, []) if hooked else []
        with pair.bridge.hooks(fwd_hooks=hooks):
            resid = pair.resid(ids, mask, [1, 2, 3])
            resid[:, real].pow(2).mean().backward()
        grads = [p.grad.clone() for p in pair.lora_parameters()]
        results.append((resid.detach(), grads))
    (native, native_grads), (eager, eager_grads) = results
    torch.testing.assert_close(native[:, real], eager[:, real], atol=1e-5, rtol=1e-5)
    for a, b in zip(native_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_run_with_cache_still_sees_attention_patterns(pair: ModelPair) -> None:
    ids, _ = batch(pair)
    _, cache = pair.bridge.run_with_cache(ids[:1, :6])
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert pattern.shape[-2:] == (6, 6)
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


@pytest.mark.parametrize("alpha", [4, 8, 6])  # scaling 1 (skipped), 2, 1.5
def test_lean_lora_forward_is_bit_identical_to_peft(tiny_llama: Path, alpha: int) -> None:
    from peft.tuners.lora.layer import Linear as LoraLinear

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=alpha, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    pair = load_pair(tiny_llama, lora_config=config)
    layers = [m for m in pair.bridge.modules() if type(m) is LoraLinear]
    assert layers and all("forward" in vars(m) for m in layers)
    ids, mask = batch(pair)
    results = []
    for lean in (True, False):
        if not lean:  # peft's own forward
            for layer in layers:
                del layer.forward
        pair.bridge.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks on both paths
        pair.set_training(True)
        resid = pair.resid(ids, mask, [1, 2, 3])
        resid.pow(2).mean().backward()
        pair.set_training(False)
        with pair.original():
            frozen = pair.resid(ids, mask, [3])
        grads = [p.grad.clone() for p in pair.lora_parameters()]
        results.append((resid.detach(), frozen, grads))
    (lean_resid, lean_frozen, lean_grads), (peft_resid, peft_frozen, peft_grads) = results
    assert torch.equal(lean_resid, peft_resid)
    assert torch.equal(lean_frozen, peft_frozen)
    assert all(torch.equal(a, b) for a, b in zip(lean_grads, peft_grads, strict=True))
    assert not torch.equal(lean_frozen, lean_resid[2:])  # the adapter really acts


def test_lean_lora_forward_hands_merged_layers_to_peft(pair: ModelPair) -> None:
    from peft.tuners.lora.layer import Linear as LoraLinear

    layer = next(m for m in pair.bridge.modules() if type(m) is LoraLinear)
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        try:
            merged = layer(x)  # peft's path: the base weight now holds the update
        finally:
            layer.unmerge()
        after = layer(x)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)  # unmerge rounds W + dW - dW


def test_hooks_on_a_components_own_input_and_output_keep_the_native_path(pair: ModelPair) -> None:
    """``hook_attn_out`` / ``hook_resid_mid`` (a component's ``hook_out`` / ``hook_in``) are
    read on the native path, and equal what the hooked forward gives them; an edit made there
    propagates on both paths."""
    ids, mask = batch(pair)
    names = [f"blocks.{b}.{point}" for b in range(pair.n_layers)
             for point in ("hook_attn_out", "hook_resid_mid", "hook_mlp_out")]
    results = []
    for hooked in (False, True):
        seen: dict[str, torch.Tensor] = {}
        calls: list[str] = []
        edges = [(name, lambda t, hook, seen=seen: seen.__setitem__(hook.name, t.detach().clone()))
                 for name in names]
        scale = [("blocks.0.hook_attn_out", lambda t, hook: t * 2.0)]
        inner = pattern_hooks(pair, calls) if hooked else []
        with pair.bridge.hooks(fwd_hooks=edges + inner):
            plain = pair.resid(ids, mask, [1, 2, 3])
        with pair.bridge.hooks(fwd_hooks=scale + inner):
            edited = pair.resid(ids, mask, [3])
        assert bool(calls) == hooked  # the observing hooks alone never left the native path
        results.append((seen, plain, edited))
    (native, native_resid, native_edit), (eager, eager_resid, eager_edit) = results
    assert sorted(native) == sorted(eager) and len(native) == 3 * pair.n_layers
    real = mask.bool()
    for name in native:
        torch.testing.assert_close(native[name][real], eager[name][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(native_resid[:, real], eager_resid[:, real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(native_edit[:, real], eager_edit[:, real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(native_edit[0][real], native_resid[2][real])  # the edit acted


def test_row_scale_runs_base_and_adapted_rows_in_one_batch(pair: ModelPair) -> None:
    from cbscope import native_paths

    ids, mask = batch(pair)
    layers = pair._modules().lora_layers
    assert native_paths.row_scale_supported(layers, pair.dtype)
    with pair.original():
        base = pair.resid(ids, mask, [3])[0]
    adapted = pair.resid(ids, mask, [3])[0]
    scale = torch.tensor([0.0, 1.0, 0.0, 1.0])
    with native_paths.lora_row_scale(layers, scale):
        mixed = pair.resid(ids, mask, [3])[0]
    real = mask.bool()
    for row in range(4):
        want = base if scale[row] == 0 else adapted
        torch.testing.assert_close(mixed[row][real[row]], want[row][real[row]], atol=1e-5, rtol=1e-5)
    assert not native_paths.row_scale_supported(layers, torch.bfloat16)
