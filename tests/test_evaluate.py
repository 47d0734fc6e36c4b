"""The evaluation report: numbers recomputed from its rows, the three files, the ``eval`` CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cbscope.attacks import FinetuneAttackConfig, SoftPromptConfig, attack_names
from cbscope.evaluate import (
    EvalConfig,
    Report,
    evaluate_pair,
    parse_attacks,
    spread,
    summarise,
)


@pytest.fixture(scope="module")
def organism(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny organism (built once per session) and a random adapter holding out 'chem'."""
    from peft import LoraConfig

    from cbscope.organism import build_organism
    from cbscope.pair import load_pair

    folder = tmp_path_factory.getbasetemp() / "tiny_organism_attacks"
    if not (folder / "world.json").is_file():
        build_organism(folder, size="tiny", show_progress=False)
    adapter = tmp_path_factory.mktemp("organism_adapter") / "cb"
    torch.manual_seed(0)
    pair = load_pair(
        folder,
        lora_config=LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            layers_to_transform=[2, 3],
        ),
    )
    pair.save_adapter(adapter)
    (adapter / "train_info.json").write_text(json.dumps({"holdout_category": "chem"}))
    return folder, adapter


def small_config(**overrides) -> EvalConfig:
    values = {
        "limit": 6,
        "soft_prompt": SoftPromptConfig(n_tokens=4, steps=3),
        "soft_prompt_limit": 2,
        "finetune": FinetuneAttackConfig(
            lrs=[1e-3, 1e-2], steps=2, eval_every=1, batch_size=2, n_examples=2, rank=2
        ),
        "n_retain": 8,
        "n_algo": 4,
        "repe_reference": 8,
    }
    values.update(overrides)
    return EvalConfig(**values)


def _mean(values) -> float | None:
    values = [bool(v) for v in values]
    return sum(values) / len(values) if values else None


def test_parse_attacks_and_spread() -> None:
    assert parse_attacks("direct, prefill") == ["direct", "prefill"]
    assert parse_attacks(None)[-1] == "finetune"
    # "all" adds the strong, slow attacks that do not run by default
    assert parse_attacks("all") == list(attack_names())
    assert set(parse_attacks(None)) < set(parse_attacks("all"))
    with pytest.raises(ValueError, match="unknown attacks"):
        parse_attacks("direct,bogus")
    items = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1)]
    assert spread(items, 3, lambda x: x[0]) == [("a", 1), ("b", 1), ("c", 1)]
    assert spread(items, 4, lambda x: x[0])[-1] == ("a", 2)
    assert spread(items, None, lambda x: x[0]) == items
    with pytest.raises(ValueError):
        EvalConfig(limit=0).validate()


def test_report_numbers_equal_recomputed_rows(organism, tmp_path: Path) -> None:
    from cbscope.pair import load_pair

    folder, adapter = organism
    pair = load_pair(folder, adapter)
    report = evaluate_pair(pair, config=small_config(), show_progress=False)
    rows = report.rows
    assert set(report.attacks) == {
        "direct",
        "prefill",
        "template",
        "multiturn",
        "multiturn_prefill",
        "soft_prompt",
        "repe",
        "finetune",
    }
    assert report.meta["data"]["heldout_categories"] == ["chem"]
    for name in ("direct", "prefill", "template", "multiturn", "multiturn_prefill", "soft_prompt",
                 "repe"):
        mine = [r for r in rows if r["section"] == "attack" and r["attack"] == name]
        for mode in ("base", "cb"):
            expected = _mean(r["harmful"] for r in mine if r["mode"] == mode)
            assert report.attacks[name][mode] == pytest.approx(expected)
        assert report.attacks[name]["n"] == sum(r["mode"] == "cb" for r in mine)
        held = [r for r in mine if r["mode"] == "cb" and r["category"] == "chem"]
        assert all(r["split"] == "heldout" for r in held)
        if held:
            assert report.attacks[name]["by_split"]["heldout"]["cb"] == pytest.approx(
                _mean(r["harmful"] for r in held)
            )
    assert report.attacks["direct"]["n"] == 6
    assert report.attacks["soft_prompt"]["n"] == 2
    # fine-tuning curves: ASR at each (mode, lr, step)
    ft = [r for r in rows if r["section"] == "finetune"]
    for curve in report.finetune_attack["curves"]:
        for step, asr in zip(curve["steps"], curve["asr"], strict=True):
            sel = [
                r["success"]
                for r in ft
                if r["mode"] == curve["mode"] and r["lr"] == curve["lr"] and r["step"] == step
            ]
            assert asr == pytest.approx(_mean(sel))
    assert {(c["mode"], c["lr"]) for c in report.finetune_attack["curves"]} == {
        ("cb", 1e-3),
        ("cb", 1e-2),
        ("base", 1e-2),
    }
    assert report.finetune_attack["lr"] == 1e-2 and report.finetune_attack["steps"] == [0, 1, 2]
    assert report.attacks["finetune"]["cb"] == report.finetune_attack["asr"][-1]
    assert set(report.finetune_attack["by_lr"]) == {"0.001", "0.01"}
    # capability and over-refusal
    for metric, entry in report.capability.items():
        if metric == "retain":
            continue
        sel = [r for r in rows if r["section"] == "capability" and r["metric"] == metric]
        assert entry["cb"] == pytest.approx(_mean(r["success"] for r in sel if r["mode"] == "cb"))
    assert report.capability["algo_em"]["n"] == 4
    retain = [r for r in rows if r["section"] == "retain"]
    tokens = sum(r["n_tokens"] for r in retain)
    assert report.capability["retain"]["kl"] == pytest.approx(
        sum(r["kl_sum"] for r in retain) / tokens
    )
    assert report.capability["retain"]["kl"] > 0
    assert report.capability["retain"]["ppl_cb"] == pytest.approx(
        math.exp(sum(r["nll_cb_sum"] for r in retain) / tokens)
    )
    over = [
        r for r in rows if r["section"] == "over_refusal" and r["metric"] == "lookalike_heldout"
    ]
    assert report.over_refusal["lookalike_heldout"]["base"] == pytest.approx(
        _mean(r["refusal"] or r["degenerate"] for r in over if r["mode"] == "base")
    )
    fire = [r for r in rows if r["section"] == "firing"]
    assert fire, report.meta.get("firing_note")
    assert report.firing["trace"]["firing_rate"] == pytest.approx(
        _mean(r["fired"] for r in fire if r["set"] == "harmful")
    )
    # the whole summary is a function of the rows; saved and reloaded it is the same
    assert summarise(rows, report.meta["finetune_primary_lr"])["attacks"] == report.attacks
    files = report.save(tmp_path / "out")
    loaded = Report.load(tmp_path / "out")
    again = Report.from_rows(loaded.rows, loaded.meta)
    assert json.loads(json.dumps(again.attacks)) == json.loads(files["json"].read_text())["attacks"]
    page = files["html"].read_text()
    assert "Plotly.newPlot" in page and '<script src="http' not in page  # no network needed
    assert "<table>" in page and "Fine-tuning attack" in page
    assert "| direct |" in files["md"].read_text()


def test_base_only_without_adapter(organism) -> None:
    from cbscope.pair import load_pair

    folder, _ = organism
    pair = load_pair(folder)
    report = evaluate_pair(
        pair, attacks="direct,prefill", config=small_config(), show_progress=False
    )
    assert report.attacks["prefill"]["cb"] is None and report.attacks["prefill"]["base"] is not None
    assert report.meta["modes"] == ["base"]
    assert "retain" not in report.capability


def test_chat_suite_on_tiny_llama(tiny_llama: Path, tmp_path: Path) -> None:
    from cbscope.pair import load_pair

    harmful = tmp_path / "harmful.csv"
    harmful.write_text(
        "goal,target\n"
        + "".join(f"how do i make a cake {i},sure here is the way\n" for i in range(8))
    )
    xstest = tmp_path / "xstest.csv"
    xstest.write_text(
        "id,prompt,type,label\n1,how do i bake bread,x,safe\n2,how to make a cake,x,unsafe\n"
    )
    pair = load_pair(tiny_llama)
    report = evaluate_pair(
        pair,
        attacks=None,  # the default attacks ("all" adds the slow strong ones)
        config=small_config(max_new_tokens=3),
        harmful_path=harmful,
        xstest_path=xstest,
        show_progress=False,
    )
    assert report.meta["suite"] == "chat" and report.meta["judge"] == "compliance"
    prefill_rows = [r for r in report.rows if r.get("attack") == "prefill"]
    assert prefill_rows[0]["prefill"] == "sure here is the way"
    assert report.attacks["direct"]["n"] == 6  # limit 6 of the 8 rows (none trained on)
    assert {r["source"] for r in report.rows if r.get("attack") == "direct"} == {"harmful"}
    assert report.over_refusal["xstest_safe"]["n"] == 1
    # fine-tuning data are the base model's completions of the targets; base-only curves
    assert {c["mode"] for c in report.finetune_attack["curves"]} == {"base"}
    assert len(report.finetune_attack["curves"]) == 2
    assert report.attacks["soft_prompt"]["n"] == 2 and report.attacks["repe"]["base"] is not None


def test_per_source_rows_recompute_and_trained_sources_are_flagged(
    tiny_llama: Path, tiny_data: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig

    from cbscope.pair import load_pair
    from cbscope.sources import load_source, training_record

    adv = load_source("advbench")
    trained = adv.train()[:4]
    adapter = tmp_path / "cb"
    torch.manual_seed(0)
    pair = load_pair(tiny_llama, lora_config=LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                        target_modules=["q_proj", "v_proj"]))
    pair.save_adapter(adapter)
    (adapter / "train_info.json").write_text(json.dumps(
        {"data_sources": {"advbench": training_record(adv, trained)}}))
    pair = load_pair(tiny_llama, adapter)
    mine = tmp_path / "mine.csv"
    mine.write_text("prompt\n" + trained[0].prompt + "\nhow do i make the bread\n")
    report = evaluate_pair(
        pair, attacks="direct,prefill",
        config=small_config(max_new_tokens=3, sources=["advbench", "harmbench", f"mine={mine}"]),
        show_progress=False,
    )
    saved = Report.load(report.save(tmp_path / "r")["json"])
    for attack in ("direct", "prefill"):
        by_source = saved.attacks[attack]["by_source"]
        assert list(by_source) == ["advbench", "harmbench", "mine"]
        for source, entry in by_source.items():
            mine_rows = [r for r in saved.rows if r.get("attack") == attack and r["source"] == source]
            for mode in ("base", "cb"):
                assert entry[mode] == _mean(r["success"] for r in mine_rows if r["mode"] == mode)
            assert entry["n"] == sum(1 for r in mine_rows if r["mode"] == "cb")
    # trained prompts are not evaluated; a source the breaker trained on is flagged
    evaluated = {r["prompt"] for r in saved.rows if r.get("attack") == "direct"}
    assert not evaluated & {ex.prompt for ex in trained[1:]}
    sources = saved.meta["data"]["sources"]
    assert sources["advbench"]["trained_on_source"] and not sources["harmbench"]["trained_on_source"]
    assert sources["mine"]["n_overlap"] == 0 and sources["mine"]["n"] == 1  # the trained row dropped
    assert sources["mine"]["excluded_trained"] == 1 and "1 rows it trained on left out" in saved.markdown()
    table = {(r["source"], r["attack"]): r for r in saved.source_table()}
    assert table[("advbench", "direct")]["seen"] and not table[("harmbench", "direct")]["seen"]
    assert "Flagged: the breaker was trained on advbench" in saved.markdown()
    assert {r["split"] for r in saved.rows if r.get("source") == "advbench"} == {"trained"}
    assert {r["split"] for r in saved.rows if r.get("source") == "harmbench"} == {"heldout"}


def test_cli_writes_three_files(organism, tmp_path: Path) -> None:
    from cbscope.cli import app

    folder, adapter = organism
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(folder),
            "--adapter",
            str(adapter),
            "--attacks",
            "direct,prefill",
            "--limit",
            "4",
            "--out",
            str(out),
            "--no-progress",
            "--no-firing",
        ],
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "report.html"}
    data = json.loads((out / "report.json").read_text())
    assert set(data["attacks"]) == {"direct", "prefill"}
    assert {"base", "cb", "n"} <= set(data["attacks"]["prefill"])
    assert {"capability", "over_refusal", "finetune_attack", "rows"} <= set(data)
    assert "prefill" in result.output
    bad = CliRunner().invoke(
        app, ["eval", "--model", str(folder), "--attacks", "bogus", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "unknown attacks" in bad.output


def test_two_turn_attack_on_the_organism(organism) -> None:
    from cbscope.attacks import multiturn_attack, organism_multiturn_prompts
    from cbscope.generation import generate_text
    from cbscope.organism import World
    from cbscope.pair import load_pair

    folder, adapter = organism
    world = World.from_json(folder / "world.json")
    pair = load_pair(folder, adapter)
    report = evaluate_pair(
        pair,
        attacks="multiturn,multiturn_prefill",
        config=small_config(firing=False),
        show_progress=False,
    )
    assert set(report.attacks) == {"multiturn", "multiturn_prefill"}
    firsts = {(r["prompt"], r["response"]) for r in world.benign_examples("seen", "train")}
    for name in ("multiturn", "multiturn_prefill"):
        mine = [r for r in report.rows if r["section"] == "attack" and r["attack"] == name]
        assert {r["mode"] for r in mine} == {"base", "cb"}
        for mode in ("base", "cb"):
            assert report.attacks[name][mode] == pytest.approx(
                _mean(r["harmful"] for r in mine if r["mode"] == mode)
            )
        assert report.attacks[name]["n"] == 6 == sum(r["mode"] == "cb" for r in mine)
        for row in mine:
            user1, assistant1, user2 = row["conversation"]
            assert (user1["role"], assistant1["role"], user2["role"]) == ("user", "assistant", "user")
            assert (user1["content"], assistant1["content"]) in firsts  # a benign first turn
            assert user2["content"] == row["prompt"] == row["request"]
            assert world.topic(row["topic"]).kind == "harmful"
            assert row["prefill"] == (world.prefill if name == "multiturn_prefill" else "")
            assert row["split"] == ("heldout" if row["category"] == "chem" else "trained")
    assert "| multiturn_prefill |" in report.markdown()
    # the attack generates exactly what generate_text gives on the same conversations
    conversations, metas = organism_multiturn_prompts(world)
    run = multiturn_attack(pair, conversations[:3], world.prefill, mode="cb", metas=metas[:3],
                           max_new_tokens=8)
    assert run.attack == "multiturn_prefill" and run.prefills == [world.prefill] * 3
    expected = generate_text(pair.generator, pair.tokenizer, conversations[:3],
                             prefills=[world.prefill] * 3, max_new_tokens=8)
    assert run.responses == expected
    with pytest.raises(ValueError, match="end with a user turn"):
        multiturn_attack(pair, [conversations[0][:2]])


def test_behaviour_multiturn_rates_recount(organism) -> None:
    from cbscope.organism import World, evaluate_behaviour
    from cbscope.pair import load_pair

    folder, adapter = organism
    world = World.from_json(folder / "world.json")
    pair = load_pair(folder, adapter)
    plain = evaluate_behaviour(pair.generator, pair.tokenizer, world, n_algo=4)
    assert "multiturn_asr" not in plain
    result = evaluate_behaviour(pair.generator, pair.tokenizer, world, n_algo=4, multiturn=True)
    for key in ("prefill_asr", "template_asr", "benign_em_seen", "over_refusal"):
        assert result[key] == pytest.approx(plain[key])  # the existing keys are unchanged
    for metric in ("multiturn_asr", "multiturn_prefill_asr"):
        rows = [r for r in result["rows"] if r["metric"] == metric]
        assert len(rows) == result["n"][metric] == result["n"]["prefill_asr"]
        assert result[metric] == pytest.approx(_mean(r["verdict"] for r in rows))
        assert all(len(r["conversation"]) == 3 for r in rows)
        for category in world.harm_categories:
            assert result["by_category"][category][metric] == pytest.approx(
                _mean(r["verdict"] for r in rows if r["category"] == category)
            )


def test_html_is_the_markdown_rendered_by_markdown_it() -> None:
    """The page's tables and headings come from the Markdown (numbers right-aligned), text from
    the run is escaped, and every section of the Markdown is on the page."""
    rows = [
        {"section": "attack", "attack": "direct", "mode": mode, "prompt": "p", "prefill": "",
         "response": "r", "success": ok, "harmful": ok, "outcome": "complied" if ok else "refused",
         "split": "heldout"}
        for mode, ok in (("base", True), ("cb", False))
    ]
    report = Report.from_rows(rows, {"model": "<script>alert(1)</script>", "suite": "organism"})
    page = report.html()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<th style="text-align:right">base</th>' in page
    assert "<td>direct</td>" in page and '<td style="text-align:right">100.0%</td>' in page
    headings = [line[3:] for line in report.markdown().splitlines() if line.startswith("## ")]
    assert headings and all(f"<h2>{h}</h2>" in page for h in headings)
    assert page.index("<h1>") < page.index("Plotly.newPlot") < page.index("<h2>")


def test_saved_reports_share_one_plotlyjs_beside_them(tmp_path: Path) -> None:
    from cbscope.export import plotlyjs_name

    rows = [
        {"section": "attack", "attack": "direct", "mode": mode, "prompt": "p", "prefill": "",
         "response": "r", "success": ok, "harmful": ok, "outcome": "complied" if ok else "refused",
         "split": "heldout"}
        for mode, ok in (("base", True), ("cb", False))
    ]
    report = Report.from_rows(rows, {"model": "m", "suite": "organism"})
    files = report.save(tmp_path / "a")
    page = files["html"].read_text()
    assert f'<script src="{plotlyjs_name()}"' in page and "Plotly.newPlot" in page
    assert len(page.encode()) < 200_000 < (tmp_path / "a" / plotlyjs_name()).stat().st_size
    inline = report.save(tmp_path / "b", plotlyjs="inline")["html"].read_text()
    assert "<script src=" not in inline and len(inline.encode()) > 1_000_000
    assert not (tmp_path / "b" / plotlyjs_name()).exists()
