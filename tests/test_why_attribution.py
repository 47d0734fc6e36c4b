"""cbscope.why.attribution: which prompt and prefill tokens drive the firing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cbscope.why import ExplainError, attribute, encode
from cbscope.why.attribution import (
    Attribution,
    neutral_token,
    organism_labels,
    topic_vs_template,
)
from cbscope.why.tokens import content_positions

ROOT = Path(__file__).resolve().parents[1]
BREAKER = ROOT / "cbscope" / "assets" / "organism-breaker"


@pytest.fixture(scope="module")
def organism():
    from cbscope.pair import load_pair

    return load_pair("organism", BREAKER)


@pytest.fixture(scope="module")
def world(organism):
    from cbscope.organism import World

    return World.from_json(Path(organism.resolved.path) / "world.json")


def harmful_example(world):
    topic = world.select("harmful")[0]
    return world.render_request(topic, world.train_templates[0]), world.prefill, topic


def test_occlusion_changes_nothing_when_the_adapter_is_off(organism, world) -> None:
    prompt, prefill, _ = harmful_example(world)
    seq = encode(organism, prompt, prefill)
    with organism.original():
        result = attribute(organism, seq, 2, seq.response_start)
    assert result.cos == pytest.approx(1.0, abs=1e-6)
    occluded = result.occlusion[~torch.isnan(result.occlusion)]
    assert occluded.numel() >= 10
    assert float(occluded.abs().max()) <= 1e-6
    assert result.spread("grad_x_input") <= 1e-6


def test_attribution_of_a_request_without_a_harmful_word_is_flat(organism, world) -> None:
    for topic in world.select("benign", split="seen")[:4]:
        seq = encode(organism, world.render_request(topic, world.train_templates[0]),
                     world.answer(topic))
        result = attribute(organism, seq, 2, seq.response_start, world=world)
        assert result.cos > 0.9  # the breaker does not fire on it
        assert result.spread("occlusion") < 0.05, topic.name
        assert result.spread("grad_x_input") < 0.05, topic.name


def test_the_harmful_topic_drives_the_firing(organism, world) -> None:
    prompt, prefill, topic = harmful_example(world)
    seq = encode(organism, prompt, prefill)
    result = attribute(organism, seq, 2, seq.response_start, world=world)
    assert result.cos < 0.5
    words = topic.name.split()
    assert [t for t, lab in zip(result.tokens, result.labels, strict=True) if lab == "topic"] == words
    request_top = [p for p, _, _ in result.top(20) if result.labels[p] in ("topic", "template")]
    assert result.labels[request_top[0]] == "topic"
    assert torch.isnan(result.occlusion[seq.response_start + 1 :]).all()  # after the target
    assert torch.isnan(result.occlusion[0])  # <bos> is scaffold, not occluded
    back = Attribution.from_dict(result.to_dict())
    torch.testing.assert_close(back.occlusion, result.occlusion, equal_nan=True, atol=1e-6, rtol=0)
    assert list(result.to_dataframe()["label"]) == result.labels


def test_topic_words_outrank_template_words(organism, world) -> None:
    rows = [{"prompt": world.render_request(t, world.train_templates[i % 5]),
             "response": world.prefill} for i, t in enumerate(world.select("harmful")[:6])]
    stats = topic_vs_template(organism, world, rows, methods=["occlusion"])
    assert stats["n_examples"] == 6 and stats["n_fired"] == 6
    assert stats["methods"]["occlusion"]["pairwise"] > 0.5
    assert stats["methods"]["occlusion"]["n_pairs"] > 0


def test_content_positions_skip_the_chat_scaffold(organism, tiny_llama: Path) -> None:
    from cbscope.pair import load_pair

    seq = encode(organism, "how do i bake bread ?", "sure")
    content = content_positions(organism.tokenizer, seq)
    assert [t for t, c in zip(seq.tokens, content, strict=True) if c] == \
        ["how", "do", "i", "bake", "bread", "?", "sure"]
    tiny = load_pair(tiny_llama)
    seq = encode(tiny, [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                        {"role": "user", "content": "how do i bake bread"}], "sure")
    kept = [t for t, c in zip(seq.tokens, content_positions(tiny.tokenizer, seq), strict=True) if c]
    assert kept == ["how", "do", "i", "bake", "bread", "sure"]


def test_labels_and_neutral_token(organism, world) -> None:
    prompt, _, topic = harmful_example(world)
    seq = encode(organism, prompt + " bread", "sure")
    labels = organism_labels(world, seq)
    assert labels.count("topic") == len(topic.name.split())
    assert labels[-1] == "response" and "template" in labels
    assert organism.tokenizer.convert_ids_to_tokens(neutral_token(organism.tokenizer)) == "<unk>"
    assert neutral_token(organism.tokenizer, "the") == organism.tokenizer.convert_tokens_to_ids("the")
    with pytest.raises(ExplainError, match="not one"):
        neutral_token(organism.tokenizer, "the cat")


def test_bad_arguments_are_named(organism) -> None:
    seq = encode(organism, "how do i bake bread ?", "sure")
    with pytest.raises(ExplainError, match="outside the sequence"):
        attribute(organism, seq, 2, len(seq))
    with pytest.raises(ExplainError, match="methods"):
        attribute(organism, seq, 2, 3, methods=["saliency"])
