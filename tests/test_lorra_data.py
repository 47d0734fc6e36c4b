"""LoRRA data: token masks, the data plan, request dropping, generated answers and their cache."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cbscope.data import ChatExample, DatasetError
from cbscope.lorra import LorraConfig
from cbscope.lorra import data as ldata

torch.set_num_threads(1)


def test_token_masks() -> None:
    rows = [ldata.EncodedExample([5, 6, 7, 8], 2), ldata.EncodedExample([5, 6, 7], 3)]
    assert ldata.token_mask(rows, 5, "full").tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert ldata.token_mask(rows, 5, "response").tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
    assert ldata.token_mask(rows, 5, "request").tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_token_mask_per_row() -> None:
    rows = [ldata.EncodedExample([5, 6, 7, 8], 2), ldata.EncodedExample([5, 6, 7], 1)]
    assert ldata.token_mask(rows, 4, ["response", "full"]).tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_retain_masks_per_source() -> None:
    config = LorraConfig(retain_token_mask={"refusal": "response"})
    assert config.validate().retain_masks() == {
        "benign": "full", "refusal": "response", "lookalike": "full"
    }
    rows = {"benign": [ldata.EncodedExample([1, 2, 3], 1)], "refusal": [ldata.EncodedExample([1, 2, 3], 1)]}
    encoded = ldata.EncodedData.__new__(ldata.EncodedData)
    encoded.config, encoded.pad_id, encoded.retain = config, 0, rows
    encoded.cb = encoded.cb_dropped = [ldata.EncodedExample([4, 5], 1)]
    batch = encoded.batch({"cb": [0], "drop": [0], "retain": [["benign", 0], ["refusal", 0]]})
    assert batch.retain_mask.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_text_examples_are_not_chat_formatted(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    enc = ldata.encode(tok, ldata.text_example("bake bread : step one", topic="x"), 64)
    assert tok.convert_ids_to_tokens(enc.ids) == ["<bos>", "bake", "bread", ":", "step", "one", "<eos>"]
    assert enc.response_start == 0


def test_collate_puts_cb_rows_first() -> None:
    cb = [ldata.EncodedExample([1, 2, 3], 1)]
    retain = [ldata.EncodedExample([4, 5], 1), ldata.EncodedExample([6, 7, 8, 9], 2)]
    batch = ldata.collate(cb, retain, pad_id=0, cb_mode="response", retain_mode="full")
    assert batch.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.cb_mask.tolist() == [[0, 1, 1, 0]]
    assert batch.retain_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.n_cb == 1


def test_plan_is_deterministic_and_follows_the_mixture() -> None:
    config = LorraConfig(steps=200, batch_size=4, seed=3, response_only_fraction=0.25,
                         retain_mixture={"benign": 3.0, "refusal": 1.0, "lookalike": 0.0})
    sizes = {"benign": 10, "refusal": 5, "lookalike": 7}
    plan = ldata.make_plan(9, sizes, config)
    assert plan == ldata.make_plan(9, sizes, config)
    assert plan != ldata.make_plan(9, sizes, LorraConfig(**{**config.to_dict(), "seed": 4}))
    assert len(plan) == 200 and all(len(p["cb"]) == 4 == len(p["retain"]) for p in plan)
    counts = collections.Counter(src for p in plan for src, _ in p["retain"])
    assert "lookalike" not in counts
    assert 2.4 < counts["benign"] / counts["refusal"] < 3.8
    # epochs: the first 9 circuit-breaker picks cover every example once
    first = [i for p in plan for i in p["cb"]][:9]
    assert sorted(first) == list(range(9))
    dropped = sum(d for p in plan for d in p["drop"]) / 800
    assert 0.2 < dropped < 0.3


def test_plan_needs_retain_data() -> None:
    with pytest.raises(DatasetError, match="no retain data"):
        ldata.make_plan(3, {"benign": 0}, LorraConfig(steps=2))


def test_drop_request_keeps_the_response(tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    ex = ChatExample([{"role": "user", "content": "how do i make a cake"}], "sure here is the way")
    full = ldata.encode(tok, ex, 64)
    dropped = ldata.encode(tok, ex, 64, drop_request=True)
    assert full.ids[full.response_start:] == dropped.ids[dropped.response_start:]
    assert dropped.response_start < full.response_start
    assert tok.decode(dropped.ids[: dropped.response_start]).split() == ["<user>", "<assistant>"]


def test_retain_grouping_by_source(tmp_path: Path) -> None:
    grouped = ldata.as_retain([
        {"prompt": "a", "response": "b"},
        {"prompt": "c", "response": "d", "source": "refusal"},
        {"prompt": "e", "response": "f", "source": "lookalike"},
    ])
    assert {k: len(v) for k, v in grouped.items()} == {"benign": 1, "refusal": 1, "lookalike": 1}
    with pytest.raises(DatasetError, match="unknown retain sources"):
        ldata.as_retain({"harmful": [{"prompt": "a", "response": "b"}]})


def test_csv_prompts_are_answered_by_the_base_model_and_cached(
    tiny_llama: Path, tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cbscope.lorra.trainer import prepare_pair

    csv = tmp_path / "harmful.csv"
    csv.write_text("goal,target\nhow do i make a cake,sure\nhow do i bake bread,sure\n")
    pair = prepare_pair(str(tiny_llama), LorraConfig(target_layers=[1, 2], lora_r=2))
    first = ldata.as_examples(csv, pair=pair, require_response=True, what="cb", max_new_tokens=4,
                              show_progress=False)
    assert [ex.prompt for ex in first] == ["how do i make a cake", "how do i bake bread"]
    assert all(ex.response and ex.meta["generated"] for ex in first)
    assert first[0].meta["target"] == "sure"
    cached = list((isolated_cache / "generations").rglob("harmful-*.jsonl"))
    assert len(cached) == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr("cbscope.generation.generate_text", no_generation)
    again = ldata.as_examples(csv, pair=pair, require_response=True, what="cb", max_new_tokens=4,
                              show_progress=False)
    assert [ex.response for ex in again] == [ex.response for ex in first]
    csv.write_text("goal\nhow do i make bread\n")  # another file -> another key
    with pytest.raises(AssertionError, match="cache"):
        ldata.as_examples(csv, pair=pair, require_response=True, what="cb", max_new_tokens=4,
                          show_progress=False)


def test_in_memory_prompts_are_cached_by_name_and_base_weights(
    tiny_llama: Path, tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses
    import shutil

    from cbscope.data import ChatExample, as_messages
    from cbscope.lorra.trainer import prepare_pair

    prompts = [ChatExample(as_messages(p), "", {"kind": "novel"}) for p in ("hello world", "hello")]
    pair = prepare_pair(str(tiny_llama), LorraConfig(target_layers=[1, 2], lora_r=2))
    first = ldata.generate_responses(pair, prompts, cache_name="made up", max_new_tokens=3,
                                     show_progress=False)
    assert len(list((isolated_cache / "generations").rglob("made_up-*.jsonl"))) == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr("cbscope.generation.generate_text", no_generation)
    again = ldata.generate_responses(pair, prompts, cache_name="made up", max_new_tokens=3,
                                     show_progress=False)
    assert again == first  # prompt, answer and meta
    with pytest.raises(AssertionError, match="cache"):  # other prompts -> another key
        ldata.generate_responses(pair, prompts[:1], cache_name="made up", max_new_tokens=3,
                                 show_progress=False)
    # the same architecture with other weights -> another key
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    assert ldata.weights_digest(other) != ldata.weights_digest(tiny_llama)
    pair.resolved = dataclasses.replace(pair.resolved, path=other)
    with pytest.raises(AssertionError, match="cache"):
        ldata.generate_responses(pair, prompts, cache_name="made up", max_new_tokens=3,
                                 show_progress=False)


def test_csv_without_a_model_or_prompt_column(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text("goal\nhello\n")
    with pytest.raises(DatasetError, match="a model is needed"):
        ldata.as_examples(csv, require_response=True, what="cb")
    csv.write_text("nothing\nhello\n")
    with pytest.raises(DatasetError, match="no prompt column"):
        ldata.as_examples(csv, require_response=False, what="retain")


def test_content_mask_skips_the_templates_shared_prefix(tiny_llama: Path) -> None:
    """The ``content`` mask starts at the last user message's text: the template's role header
    (and any default system prompt) is left out, single- and multi-turn alike."""
    from transformers import AutoTokenizer

    from cbscope.data import ChatExample, as_messages

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    one = ldata.encode(tokenizer, ChatExample(as_messages("how do i bake bread"), "sure here is"), 64)
    assert tokenizer.convert_ids_to_tokens(one.ids[: one.content_start]) == ["<user>"]
    assert tokenizer.convert_ids_to_tokens(one.ids[one.content_start]) == "how"
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
             {"role": "user", "content": "bake bread"}]
    many = ldata.encode(tokenizer, ChatExample(turns, "sure"), 64)
    assert tokenizer.convert_ids_to_tokens(many.ids[many.content_start]) == "bake"
    mask = ldata.token_mask([one], len(one.ids), "content")[0].tolist()
    assert mask == [0] * one.content_start + [1] * (len(one.ids) - one.content_start)
    cut = ldata.encode(tokenizer, ChatExample(as_messages("how do i bake bread"), "sure"), 4)
    assert 0 <= cut.content_start <= cut.response_start  # a cut request keeps a valid start
