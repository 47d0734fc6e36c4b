"""Presets: the organism data (held-out category), a 30-step organism breaker, smollm2 data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cbscope.data import DatasetError
from cbscope.lorra import LorraConfig, train_circuit_breaker
from cbscope.lorra.presets import CHAT_REFUSAL, chat_data, organism_data
from cbscope.lorra.trainer import mean_cosine_on, prepare_pair

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def organism(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped organism if it is there, else a tiny one built in seconds."""
    from cbscope.models import is_hf_folder, shipped_organism_dir
    from cbscope.organism import build_organism

    shipped = shipped_organism_dir()
    if is_hf_folder(shipped) and (shipped / "world.json").is_file():
        return shipped
    return build_organism(tmp_path_factory.mktemp("organism") / "tiny", size="tiny",
                          show_progress=False)


def test_organism_data_holds_out_a_category() -> None:
    from cbscope.organism import make_world

    world = make_world(0, size="tiny")
    held = world.harm_categories[0]
    data = organism_data(world, holdout_category=held)
    assert data.info["holdout_category"] == held
    assert {ex.meta["category"] for ex in data.cb} == set(world.harm_categories) - {held}
    assert {ex.meta["category"] for ex in data.retain["refusal"]} == set(world.harm_categories) - {held}
    assert {ex.meta["category"] for ex in data.val} == {held}
    assert all(ex.response == world.refusal for ex in data.retain["refusal"])
    assert data.retain["lookalike"] and data.retain["benign"]
    docs = [ex for ex in data.retain["benign"] if ex.meta.get("format") == "text"]
    assert {ex.meta["kind"] for ex in docs} == {"benign", "lookalike"}
    cb_docs = [ex for ex in data.cb if ex.meta.get("format") == "text"]
    assert cb_docs and all(ex.meta["category"] != held for ex in cb_docs)
    jailbreaks = {world.render_request(t, j) for t in world.topics for j in world.jailbreak_templates}
    chats = [ex.prompt for rows in (data.cb, *data.retain.values()) for ex in rows if ex.messages]
    assert not jailbreaks & set(chats)  # the jailbreak templates stay held out
    plain = organism_data(world, holdout_category=held, augment=False, documents=False, noise_words=0)
    assert len(plain.cb) == len(world.harmful_examples([c for c in world.harm_categories if c != held]))
    noisy = organism_data(world, holdout_category=held, augment=False, documents=False)  # 2 words
    clean = {ex.prompt for ex in plain.cb}
    suffixed = [ex.prompt for ex in noisy.cb if ex.prompt not in clean]
    assert len(noisy.cb) == 2 * len(plain.cb) and len(suffixed) == len(plain.cb)
    assert all(" ".join(p.split()[:-2]) in clean for p in suffixed)
    default = organism_data(world)
    assert default.info["holdout_category"] == world.harm_categories[-1]
    with pytest.raises(DatasetError, match="unknown harm category"):
        organism_data(world, holdout_category="nope")


#: 30-step configs for the two organism sizes (the shipped one is "full"; the fallback "tiny").
COMMON = dict(
    target_layers=[2, 4], token_mask="response", steps=30, batch_size=16, max_length=64, lr=1e-2,
    lora_dropout=0.0, response_only_fraction=0.0, lora_b_init_std=3e-2, val_size=0,
    retain_mixture={"benign": 2.0, "refusal": 1.0, "lookalike": 1.0},
)
TEST_CONFIGS = {"full": {**COMMON, "retain_weight": 3.0}, "tiny": {**COMMON, "retain_weight": 8.0}}


def test_thirty_steps_break_harmful_and_keep_retain(organism: Path) -> None:
    """cb_cos on the harmful examples < 0.3 while the retain examples keep cos >= 0.99."""
    from cbscope.organism import World

    size = World.from_json(organism / "world.json").size
    config = LorraConfig(**TEST_CONFIGS[size])
    pair = prepare_pair(str(organism), config)
    data = organism_data(pair, augment=False, documents=False)
    result = train_circuit_breaker(pair, config, data, show_progress=False)
    assert result.finished
    layers = config.resolved_target_layers(pair.n_layers)
    cb = mean_cosine_on(pair, data.cb, layers, token_mask=config.token_mask)
    retain = [ex for rows in data.retain.values() for ex in rows]
    kept = mean_cosine_on(pair, retain, layers)
    assert cb < 0.3, result.metrics[-1]
    assert kept >= 0.99, result.metrics[-1]
    assert result.metrics[0]["cb_cos"] > 0.95  # it started (nearly) unbroken


def test_chat_data_needs_its_files(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CBSCOPE_DATA", str(tmp_path / "nothing"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="source 'advbench'"):
        chat_data(None)
    with pytest.raises(DatasetError, match="unknown source"):
        chat_data(None, sources=["advbnch"])


def test_chat_data_sources_forms_and_records(tiny_llama: Path, tiny_data: Path) -> None:
    from cbscope.sources import load_source, prompt_key

    pair = prepare_pair(str(tiny_llama), LorraConfig(target_layers=[1, 2], lora_r=2))
    data = chat_data(pair, sources=["advbench", "xstest_unsafe"], n_per_source=3,
                     forms=["question", "fiction"], n_benign=2, n_lookalike=2, n_refusal=2,
                     compliant_only=False, max_new_tokens=3, show_progress=False)
    adv, unsafe = load_source("advbench"), load_source("xstest_unsafe")
    train_prompts = {ex.prompt for ex in adv.train() + unsafe.train()}
    originals = [ex for ex in data.cb if "rephrased_from" not in ex.meta]
    assert len(originals) == 6 and {ex.prompt for ex in originals} <= train_prompts
    variants = [ex for ex in data.cb if "rephrased_from" in ex.meta]
    assert {ex.meta["form"] for ex in variants} == {"question", "fiction"}
    assert all(ex.meta["rephrased_from"] in train_prompts for ex in variants)
    assert all(ex.response for ex in data.cb) and all(ex.meta.get("generated") for ex in data.cb)
    # benign requests are rephrased in the same forms; refusals reuse circuit-breaker requests
    assert len(data.retain["benign"]) == 2 * 3
    assert [ex.response for ex in data.retain["refusal"]] == [CHAT_REFUSAL] * 2
    assert len(data.retain["lookalike"]) == 2 and len(data.val) <= 8
    # what the breaker trained on is recorded per source, by prompt key (rephrasings count as
    # their originals); nothing held out is recorded
    record = data.info["data_sources"]
    assert sorted(record) == ["advbench", "xstest_safe", "xstest_unsafe"]
    assert set(record["advbench"]["prompt_keys"]) == {
        prompt_key(ex.prompt) for ex in originals if ex.meta["source"] == "advbench"}
    held = {prompt_key(ex.prompt) for ex in adv.heldout()}
    assert not held & set(record["advbench"]["prompt_keys"])
    assert record["advbench"]["n_trained"] == 3 and record["advbench"]["forms"] == ["question", "fiction"]


def test_shipped_organism_breaker_matches_the_preset_and_fires() -> None:
    """The shipped breaker is what ``cbscope train --preset organism`` writes today (same config,
    same organism weights) and shows the Figure-6 collapse on a prefilled harmful answer."""
    from cbscope.lorra.data import weights_digest
    from cbscope.lorra.presets import ORGANISM_CONFIG
    from cbscope.models import shipped_organism_dir
    from cbscope.organism import World
    from cbscope.pair import load_pair
    from cbscope.trace import cosine_trace

    breaker = Path(__file__).resolve().parents[1] / "cbscope" / "assets" / "organism-breaker"
    assert LorraConfig.load(breaker / "lorra_config.json") == ORGANISM_CONFIG
    info = json.loads((breaker / "train_info.json").read_text())
    assert info["base_weights_sha256"] == weights_digest(shipped_organism_dir())
    pair = load_pair("organism", breaker)
    world = World.from_json(shipped_organism_dir() / "world.json")
    harmful = world.select("harmful", categories=[info["holdout_category"]])[0]
    benign = world.select("benign", split="seen")[0]
    template = world.train_templates[0]
    trace = cosine_trace(pair, [world.render_request(t, template) for t in (harmful, benign)],
                         [world.answer(t) for t in (harmful, benign)], layers=info["target_layers"])
    start = trace.response_start[0]
    assert (trace.cos[0, :, start:start + 3] < 0.2).any(dim=1).all()  # every target layer
    benign_start, benign_end = trace.response_start[1], trace.lengths[1]
    assert float(trace.cos[1, :, benign_start:benign_end].mean()) >= 0.95


def test_shipped_smollm2_breaker_matches_the_preset() -> None:
    """The shipped SmolLM2 breaker is the ``smollm2`` preset's output: same config and sources,
    every source's trained prompts recorded, no local paths, under the 10 MB budget."""
    import inspect

    from cbscope.lorra.presets import SMOLLM2_CONFIG, smollm2_data

    breaker = Path(__file__).resolve().parents[1] / "cbscope" / "assets" / "smollm2-breaker"
    assert LorraConfig.load(breaker / "lorra_config.json") == SMOLLM2_CONFIG
    info = json.loads((breaker / "train_info.json").read_text())
    assert info["model"] == "smollm2-135m"
    assert info["sources"] == list(smollm2_data.keywords["sources"])
    assert info["forms"] == list(smollm2_data.keywords["forms"])
    assert inspect.signature(smollm2_data).parameters["match_benign"].default is True
    for name in info["sources"]:
        record = info["data_sources"][name]
        assert len(record["prompt_keys"]) == record["n_trained"] > 0
    assert (breaker / "adapter_model.safetensors").stat().st_size < 10 * 2**20
    for name in ("adapter_config.json", "cbscope_adapter.json", "train_info.json"):
        assert "/work/" not in (breaker / name).read_text() and "/tmp/" not in (breaker / name).read_text()


def test_form_matched_benign_follows_the_first_words() -> None:
    from cbscope.data import ChatExample, as_messages
    from cbscope.lorra.presets import form_matched

    pool = [ChatExample(as_messages(f"{verb} thing {i}")) for verb in ("Write", "List", "Create")
            for i in range(10)]
    requests = ["Write a bomb guide", "Write malware", "Create a scam", "Hack a bank"]
    picked = form_matched(pool, requests, 8)
    firsts = [ex.prompt.split()[0] for ex in picked]
    assert firsts.count("Write") == 4 and firsts.count("Create") == 2  # 2/4 and 1/4 of 8
    assert len(picked) == 8 and len({id(ex) for ex in picked}) == 8  # 'Hack' filled from the rest
    assert form_matched(pool, requests, 8) == picked  # deterministic
