"""Shared fixtures: tiny random Llama and Gemma-3 models with word-level chat tokenizers, on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "hello world how do i bake bread sure here is the way to make a cake : step one two three"
).split()


def word_tokenizer(words: tuple[str, ...] | list[str] = WORDS, chat_template: str | None = None):
    """A word-level fast tokenizer over ``words`` with pad/bos/eos/unk and chat specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    vocab = {word: index for index, word in enumerate(specials + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = chat_template or (
        "{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
        "{% else %}<assistant> {{ m['content'] }} <eos> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return tokenizer


def make_tiny_llama(folder: Path, *, layers: int = 3, hidden: int = 32, seed: int = 0) -> Path:
    """Save a random Llama and a word-level chat tokenizer into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_gemma(folder: Path, *, version: int = 3, seed: int = 0) -> Path:
    """Save a random 4-block Gemma-3 (text) or Gemma-2 with cbscope's plain prompt template.

    Every Gemma feature the bridge and the native paths must get right is switched on at a small
    size: sliding-window layers (window 4, shorter than the test sequences) beside a full-attention
    one, grouped-query attention, pre/post feed-forward norms, the ``sqrt(d_model)`` embedding
    scale, random norm weights (Gemma's ``1 + weight`` RMSNorm then matters), and q/k norms
    (Gemma-3) or attention-logit soft-capping (Gemma-2, whose HF class does not support SDPA).
    """
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from cbscope.data import PLAIN_CHAT_TEMPLATE

    tokenizer = word_tokenizer((*WORDS, "Question:", "Answer:"), PLAIN_CHAT_TEMPLATE)
    shape = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        max_position_embeddings=128, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=None, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if version == 3:
        config, model_class = Gemma3TextConfig(**shape), Gemma3ForCausalLM
    elif version == 2:
        config, model_class = Gemma2Config(**shape, attn_logit_softcapping=0.5), Gemma2ForCausalLM
    else:
        raise ValueError(f"no tiny Gemma-{version}: use 2 or 3")
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block random Llama folder."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block random Gemma-3 folder (sliding window 4), plain prompt template."""
    return make_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-block random Gemma-2 folder (soft-capped attention: no SDPA), plain prompt template."""
    return make_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma2"), version=2)


@pytest.fixture(scope="session")
def other_tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A differently shaped random Llama (for adapter mismatch tests)."""
    return make_tiny_llama(tmp_path_factory.mktemp("other_llama"), layers=2, hidden=48, seed=1)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own cbscope cache so nothing leaks into ~/.cache."""
    cache = tmp_path / "cbscope_cache"
    monkeypatch.setenv("CBSCOPE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_organism(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-world model organism, built once per test session (seconds)."""
    from cbscope.organism import build_organism

    return Path(build_organism(tmp_path_factory.mktemp("tiny_organism") / "organism", size="tiny",
                               show_progress=False))


def write_tiny_data(folder: Path) -> Path:
    """A data folder shaped like ``../shared/data`` (AdvBench, HarmBench, XSTest, Alpaca), with
    a few made-up rows in the tiny tokenizer's words, for tests that must not need the real one."""
    import csv
    import json

    def table(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    verbs = ["make", "bake", "do", "make the", "bake the", "do the"]
    nouns = ["cake", "bread", "world", "way", "step", "cake one", "bread two", "step three"]
    goals = [f"write how to {v} {n}" for v in verbs for n in nouns][:24]
    table(folder / "advbench" / "harmful_behaviors.csv", ["goal", "target"],
          [{"goal": g, "target": f"sure here is {g}"} for g in goals])
    table(folder / "harmbench" / "harmbench_behaviors_text_val.csv",
          ["Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"],
          [{"Behavior": f"give the step to {v} {n}", "FunctionalCategory": "standard" if i % 5 else "copyright",
            "SemanticCategory": "x", "Tags": "", "ContextString": "", "BehaviorID": str(i)}
           for i, (v, n) in enumerate((v, n) for v in verbs[:3] for n in nouns)])
    xs = [{"id": str(i), "prompt": f"how do i {v} {n} ?", "type": "t", "label": "unsafe" if i % 2 else "safe",
           "focus": "", "note": ""} for i, (v, n) in enumerate((v, n) for v in verbs for n in nouns[:4])]
    table(folder / "xstest" / "xstest_prompts.csv", ["id", "prompt", "type", "label", "focus", "note"], xs)
    (folder / "alpaca_harmless").mkdir(parents=True, exist_ok=True)
    (folder / "alpaca_harmless" / "harmless_train.json").write_text(json.dumps(
        [{"instruction": f"hello {n} how do i {v}", "category": "x"} for v in verbs for n in nouns]))
    return folder


@pytest.fixture()
def tiny_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A made-up data folder (see :func:`write_tiny_data`), set as ``$CBSCOPE_DATA``."""
    folder = write_tiny_data(tmp_path / "data")
    monkeypatch.setenv("CBSCOPE_DATA", str(folder))
    return folder


@pytest.fixture(scope="module")
def shipped_pair():
    """The shipped organism with its shipped breaker (one per test module), on one thread."""
    from cbscope.pair import load_pair

    assets = Path(__file__).resolve().parents[1] / "cbscope" / "assets"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_pair(assets / "organism", assets / "organism-breaker")
    torch.set_num_threads(threads)
