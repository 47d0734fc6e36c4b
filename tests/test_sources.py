"""Harmful-prompt sources: built-ins read from a data folder, user files, the hash split, overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from cbscope.data import DatasetError
from cbscope.sources import (
    BUILTIN_SOURCES,
    is_heldout,
    load_source,
    overlap,
    parse_source,
    parse_sources,
    prompt_key,
    training_record,
)


def test_builtins_filter_rows_and_carry_prefills(tiny_data: Path) -> None:
    adv = load_source("advbench")
    assert len(adv.examples) == 24 and adv.examples[0].meta["prefill"].startswith("sure here is")
    harm = load_source("harmbench")
    assert len(harm.examples) == 19  # 24 rows, every 5th is 'copyright'
    assert all("prefill" not in ex.meta for ex in harm.examples)
    unsafe = load_source("xstest_unsafe")
    assert {ex.meta["source"] for ex in unsafe.examples} == {"xstest_unsafe"}
    assert len(unsafe.examples) == 12


def test_split_is_a_partition_independent_of_file_order(tiny_data: Path, tmp_path: Path) -> None:
    adv = load_source("advbench")
    train, held = adv.train(), adv.heldout()
    assert train and held and len(train) + len(held) == len(adv.examples)
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in held}
    reversed_file = tmp_path / "rev.csv"
    lines = (tiny_data / "advbench" / "harmful_behaviors.csv").read_text().splitlines()
    reversed_file.write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    again = load_source(parse_source(f"mine={reversed_file}"))
    assert {ex.prompt for ex in again.heldout()} == {ex.prompt for ex in held}
    # the key ignores case, spacing and final punctuation; the split follows the key
    assert prompt_key("How do I  bake bread?") == prompt_key("how do i bake bread")
    assert is_heldout("How do I  bake bread?") == is_heldout("how do i bake bread")
    assert is_heldout("anything", 100) and not is_heldout("anything", 0)


def test_parse_errors_are_named() -> None:
    assert parse_source("advbench") is BUILTIN_SOURCES["advbench"]
    user = parse_source("mine=some/file.csv")
    assert user.name == "mine" and not user.builtin
    with pytest.raises(DatasetError, match="unknown source 'advbnch'"):
        parse_source("advbnch")
    with pytest.raises(DatasetError, match="NAME=PATH"):
        parse_source("mine=")
    with pytest.raises(DatasetError, match="letters, digits"):
        parse_source("my file=x.csv")
    with pytest.raises(DatasetError, match="named twice"):
        parse_sources("advbench,advbench")
    assert [s.name for s in parse_sources(None)] == ["advbench", "harmbench", "xstest_unsafe"]


def test_missing_files_say_where_to_look(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBSCOPE_DATA", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="source 'advbench'"):
        load_source("advbench")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_source(parse_source(f"x={tmp_path / 'none.csv'}"))


def test_overlap_flags_trained_sources_and_prompts(tiny_data: Path) -> None:
    adv = load_source("advbench")
    trained = adv.train()[:3]
    info = {"data_sources": {"advbench": training_record(adv, trained)}}
    held = [ex.prompt for ex in adv.heldout()]
    entry = overlap(info, "advbench", held)
    assert entry == {"trained_on_source": True, "n_overlap": 0, "n": len(held), "known": True}
    leaked = overlap(info, "mine", [trained[0].prompt.upper() + " ?", "something else"])
    assert leaked["n_overlap"] == 1 and leaked["trained_on_source"]
    unseen = overlap(info, "harmbench", [ex.prompt for ex in load_source("harmbench").examples])
    assert not unseen["trained_on_source"] and unseen["n_overlap"] == 0
    # an adapter that records only the AdvBench prompts it held out (older train_info.json)
    legacy = overlap({"heldout_prompts": held[:2]}, "advbench", held[:3] + [trained[0].prompt])
    assert legacy["trained_on_source"] and legacy["n_overlap"] == 2 and legacy["known"]
    assert not overlap({}, "advbench", held)["known"]
