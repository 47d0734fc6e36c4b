"""The cross-source matrix end to end on a tiny model: cells from rows, unseen cells, files, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbscope.crosssource import SourceMatrix, matrix_from_rows, source_matrix, summarise
from cbscope.generalise import GeneraliseError
from cbscope.lorra.config import LorraConfig

TINY = LorraConfig(steps=2, batch_size=2, max_length=32, token_mask="response", lora_r=2,
                   lora_alpha=2, val_size=2, log_every=1, checkpoint_every=0, target_layers=[1, 2],
                   lora_b_init_std=0.05)
OPTIONS = {"n_per_source": 4, "forms": ["question"], "n_benign": 4, "n_lookalike": 2,
           "compliant_only": False, "max_new_tokens": 3}


def _rate(rows, attack: str, source: str, mode: str = "cb") -> float:
    values = [r["success"] for r in rows if r.get("section") == "attack" and r["attack"] == attack
              and r.get("source") == source and r["mode"] == mode]
    return sum(values) / len(values)


def test_leave_one_out_matrix_end_to_end(tiny_llama: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "matrix"
    result = source_matrix(str(tiny_llama), config=TINY, out_dir=out, limit=3, max_new_tokens=3,
                           data_options=OPTIONS, show_progress=False)
    assert result.sources == ["advbench", "harmbench", "xstest_unsafe"]
    assert result.runs == ["without-advbench", "without-harmbench", "without-xstest_unsafe"]
    assert result.trained_on["without-harmbench"] == ["advbench", "xstest_unsafe"]
    assert [result.is_unseen(i, i) for i in range(3)] == [True] * 3
    assert not result.is_unseen(0, 1)
    # every cell is the mean of its run's rows; the base row of its base rows
    for attack in ("direct", "prefill"):
        for i, run in enumerate(result.runs):
            for j, source in enumerate(result.sources):
                assert result.matrices[attack][i][j] == pytest.approx(_rate(result.rows[run], attack, source))
        assert result.base[attack]["harmbench"] == pytest.approx(
            _rate(result.rows["base"], attack, "harmbench", "base"))
    # evaluated rows are the held-out rows of each source, the same in every run
    prompts = {run: sorted(r["prompt"] for r in result.rows[run] if r.get("attack") == "direct")
               for run in ["base", *result.runs]}
    assert len({tuple(p) for p in prompts.values()}) == 1
    splits = {(r["source"], r["split"]) for r in result.rows["without-advbench"] if r.get("attack")}
    assert ("advbench", "heldout") in splits and ("harmbench", "trained") in splits
    # files: matrix.json (kind sources), rows, heatmaps, adapters recording their sources
    data = json.loads((out / "matrix.json").read_text())
    assert data["kind"] == "sources" and data["sources"] == result.sources
    again = SourceMatrix.load(out)
    assert again.matrices == result.matrices
    assert matrix_from_rows(again.rows, again.runs, again.sources, "direct") == result.matrices["direct"]
    info = json.loads((out / "adapters" / "without-advbench" / "train_info.json").read_text())
    assert sorted(info["data_sources"]) == ["harmbench", "xstest_safe", "xstest_unsafe"]
    assert "direct compliance" in [t.name for t in again.figure().data]
    assert "* unseen" in again.table()


def test_summary_targets_and_bad_arguments(tiny_llama: Path, tiny_data: Path) -> None:
    runs = ["only-a", "only-b"]
    matrices = {"direct": [[0.0, 0.5], [0.05, 0.0]], "prefill": [[0.0, 0.08], [0.0, 0.0]]}
    metrics = {r: {"safe_answered": 0.9, "false_fire_rate": 0.0, "kl": 0.01} for r in runs}
    base = {"safe_answered": 0.9}
    s = summarise(["a", "b"], runs, {"only-a": ["a"], "only-b": ["b"]}, matrices, metrics, base)
    assert s["mean_unseen_direct"] == pytest.approx(0.275) and s["max_unseen_direct"] == 0.5
    assert s["unseen_by_source_prefill"] == {"a": 0.0, "b": pytest.approx(0.08)}
    assert not s["target"]["met"] and len(s["target"]["missed"]) == 1
    assert "only-a" in s["target"]["missed"][0]
    assert math.isnan(s["mean_seen_direct"]) is False
    with pytest.raises(GeneraliseError, match="at least two sources"):
        source_matrix(str(tiny_llama), sources=["advbench"], config=TINY)
    with pytest.raises(GeneraliseError, match="unknown data options"):
        source_matrix(str(tiny_llama), config=TINY, data_options={"sorces": ["x"]})


def test_cli_single_mode(tiny_llama: Path, tiny_data: Path, tmp_path: Path) -> None:
    from cbscope.cli import app

    config = tmp_path / "lorra_config.json"
    TINY.save(tmp_path)
    result = CliRunner().invoke(app, [
        "generalise", "--model", str(tiny_llama), "--sources", "advbench,xstest_unsafe",
        "--mode", "single", "--config", str(config), "--limit", "2", "--threads", "1",
        "--data-options", json.dumps(OPTIONS), "--out", str(tmp_path / "m"), "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert "only-advbench" in result.output and "* unseen" in result.output
    data = json.loads((tmp_path / "m" / "matrix.json").read_text())
    assert data["mode"] == "single" and data["trained_on"]["only-xstest_unsafe"] == ["xstest_unsafe"]
    bad = CliRunner().invoke(app, ["generalise", "--model", str(tiny_llama), "--sources", "nope",
                                   "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown source 'nope'" in bad.output
