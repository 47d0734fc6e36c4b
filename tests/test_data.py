import json
from pathlib import Path

import pytest
import torch

from cbscope.data import (
    DatasetError,
    PromptError,
    check_prompt,
    encode_chat,
    load_examples,
    load_jsonl,
    load_prompt_csv,
    pad_right,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


def test_encode_chat_marks_response_start(tokenizer) -> None:
    encoded = encode_chat(tokenizer, "how do i bake bread", "sure here is the way")
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens[encoded.response_start - 1] == "<assistant>"
    assert tokens[encoded.response_start :] == ["sure", "here", "is", "the", "way"]


def test_encode_chat_multi_turn_boundaries(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "how do i bake bread"},
    ]
    encoded = encode_chat(tokenizer, messages)
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert [tokens[s] for s in encoded.turn_starts] == ["<user>", "<assistant>", "<user>"]
    assert encoded.response_start == len(encoded.input_ids)


def test_truncation_cuts_response_first(tokenizer) -> None:
    full = encode_chat(tokenizer, "how do i bake bread", "sure here is the way")
    cut = encode_chat(tokenizer, "how do i bake bread", "sure here is the way", max_length=9)
    assert len(cut.input_ids) == 9
    assert cut.input_ids == full.input_ids[:9]


def test_pad_right() -> None:
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == torch.long


def test_prompt_checks() -> None:
    with pytest.raises(PromptError, match="empty"):
        check_prompt("   ")
    with pytest.raises(PromptError, match="limit is 10"):
        check_prompt("x" * 11, max_chars=10)


def test_malformed_jsonl_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "cb.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DatasetError, match=r"cb.jsonl, line 2: missing field 'response'"):
        load_jsonl(path)
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": 3, "response": "x"}\n')
    with pytest.raises(DatasetError, match=r"line 3: field 'prompt'"):
        load_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(DatasetError, match="line 1: not valid JSON"):
        load_jsonl(path)


def test_csv_prompts_keep_other_columns(tmp_path: Path) -> None:
    path = tmp_path / "adv.csv"
    path.write_text('goal,target\n"Do x","Sure, here is x"\n')
    (example,) = load_prompt_csv(path)
    assert example.prompt == "Do x" and example.meta["target"] == "Sure, here is x"
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(DatasetError, match="no prompt column"):
        load_prompt_csv(bad)
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_examples(tmp_path / "x.parquet")


def test_jsonl_roundtrip_with_conversations(tmp_path: Path) -> None:
    path = tmp_path / "rt.jsonl"
    path.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "c"}], "response": "d", "topic": "t"}) + "\n"
    )
    examples = load_jsonl(path)
    write_jsonl(tmp_path / "out.jsonl", examples)
    again = load_jsonl(tmp_path / "out.jsonl")
    assert again[0].messages == examples[0].messages and again[0].meta == {"topic": "t"}
