"""The cross-category generalisation matrix on the tiny organism (2 categories, a few steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cbscope.generalise import (
    EM_METRICS,
    GeneralisationResult,
    GeneraliseError,
    frontier,
    generalisation_matrix,
    normal_mode,
    run_name,
)
from cbscope.lorra.config import LorraConfig
from cbscope.lorra.presets import ORGANISM_CONFIG, organism_data
from cbscope.organism import World

torch.set_num_threads(1)
DATA = {"n_novel": 12}


def tiny_config(steps: int = 3) -> LorraConfig:
    """The organism preset's config, a few steps, target layers that fit the 4-block tiny world."""
    return LorraConfig.from_dict(
        {**ORGANISM_CONFIG.to_dict(), "steps": steps, "target_layers": [2, 4], "log_every": 1}
    )


@pytest.fixture(scope="module")
def loo(tiny_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> GeneralisationResult:
    """Leave-one-out matrix written to disk."""
    out = tmp_path_factory.mktemp("generalise") / "loo"
    return generalisation_matrix(
        tiny_organism, config=tiny_config(), out_dir=out, data_options=DATA, show_progress=False
    )


def _read_rows(folder: Path, run: str) -> list[dict[str, Any]]:
    lines = (folder / "rows" / f"{run}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def _rate(rows: list[dict[str, Any]], metric: str, category: str | None = None) -> float:
    verdicts = [
        bool(r["verdict"])
        for r in rows
        if r["metric"] == metric and (category is None or r["category"] == category)
    ]
    assert verdicts, (metric, category)
    return sum(verdicts) / len(verdicts)


def test_leave_one_out_cells_equal_the_saved_rows(loo: GeneralisationResult, tiny_organism: Path) -> None:
    world = World.from_json(tiny_organism / "world.json")
    folder = loo.out_dir
    assert folder is not None
    assert loo.categories == world.harm_categories == ["bio", "chem"]
    assert loo.runs == ["without-bio", "without-chem"] and loo.mode == "leave_one_out"
    assert loo.trained_on == {"without-bio": ["chem"], "without-chem": ["bio"]}
    saved = json.loads((folder / "matrix.json").read_text())
    for i, run in enumerate(loo.runs):
        rows = _read_rows(folder, run)
        for j, category in enumerate(loo.categories):
            for which, metric in (("prefill", "prefill_asr"), ("template", "template_asr")):
                expected = _rate(rows, metric, category)
                assert loo.matrix(which)[i][j] == pytest.approx(expected)
                assert saved["matrix"][which][i][j] == pytest.approx(expected)
            assert loo.is_heldout(i, j) == (i == j)  # leave-one-out: the diagonal is held out
        for metric in (*EM_METRICS, "multiturn_asr", "multiturn_prefill_asr"):
            assert loo.metrics[run][metric] == pytest.approx(_rate(rows, metric))
            if metric in EM_METRICS:
                base = _rate(_read_rows(folder, "base"), metric)
                assert loo.metrics[run]["delta_vs_base"][metric] == pytest.approx(
                    _rate(rows, metric) - base
                )
    diagonal = [(loo.prefill[i][i], loo.template[i][i]) for i in range(2)]
    s = saved["summary"]
    assert s["mean_heldout_prefill_asr"] == pytest.approx(sum(p for p, _ in diagonal) / 2)
    assert s["mean_heldout_template_asr"] == pytest.approx(sum(t for _, t in diagonal) / 2)
    assert s["mean_trained_prefill_asr"] == pytest.approx((loo.prefill[0][1] + loo.prefill[1][0]) / 2)
    worst = max(range(2), key=lambda i: (diagonal[i][0] + diagonal[i][1]) / 2)
    assert s["worst_heldout_category"]["category"] == loo.categories[worst]
    base_rows = _read_rows(folder, "base")
    assert saved["base"]["prefill_asr"] == pytest.approx(_rate(base_rows, "prefill_asr"))
    assert s["target"]["met"] == (not s["target"]["missed"])


def test_runs_share_one_frozen_cache(loo: GeneralisationResult) -> None:
    """The second run reads the frozen representations of the examples both runs train on (the
    retain set, mostly) from the first run's cache instead of computing them again."""
    first, second = (loo.metrics[run]["frozen_cache"] for run in loo.runs)
    assert first["used"] and second["used"]
    assert first["reused"] == 0 and first["computed"] == first["entries"]
    assert 0 < second["reused"] < second["entries"]
    assert second["computed"] == second["entries"] - second["reused"]


def test_files_adapters_reload_and_table(loo: GeneralisationResult) -> None:
    folder = loo.out_dir
    assert folder is not None
    page = (folder / "matrix.html").read_text()
    assert "Plotly.newPlot" in page and "prefill ASR" in page and "template ASR" in page
    for run in loo.runs:
        adapter = folder / "adapters" / run
        assert (adapter / "adapter_config.json").is_file()
        meta = json.loads((adapter / "cbscope_adapter.json").read_text())
        assert meta["trained_categories"] == loo.trained_on[run]
        assert meta["heldout_categories"] == [c for c in loo.categories if c not in loo.trained_on[run]]
    again = GeneralisationResult.load(folder)
    assert again.prefill == loo.prefill and again.template == loo.template
    assert set(again.rows) == {"base", *loo.runs}
    assert again.rows["without-bio"] == json.loads(json.dumps(loo.rows["without-bio"]))
    fig = again.figure()
    assert [t.name for t in fig.data] == ["prefill ASR", "cells: prefill", "template ASR",
                                          "cells: template"]
    cells = fig.data[3]  # a clickable point per cell, naming its run, category and attack
    assert len(cells.x) == len(loo.runs) * len(loo.categories) and cells.yaxis == "y2"
    assert list(cells.customdata[1][:3]) == [loo.runs[0], loo.categories[1], "template"]
    assert fig.data[0].textfont.size >= 12
    assert list(fig.data[0].z[0]) == pytest.approx([100 * v for v in loo.prefill[0]])
    assert "held out" in fig.data[0].text[0][0] and "held out" not in fig.data[0].text[0][1]
    table = again.table()
    assert "without-chem" in table and "mean held-out ASR" in table


def test_single_mode_and_train_categories(tiny_organism: Path, tmp_path: Path) -> None:
    world = World.from_json(tiny_organism / "world.json")
    data = organism_data(world, train_categories=["bio"])
    assert data.info["trained_categories"] == ["bio"] and data.info["heldout_categories"] == ["chem"]
    assert {ex.meta.get("category") for ex in data.cb} == {"bio"}
    assert {ex.meta.get("category") for ex in data.val} == {"chem"}
    assert {ex.meta.get("category") for ex in data.retain["refusal"]} == {"bio"}
    from cbscope.data import DatasetError

    with pytest.raises(DatasetError):
        organism_data(world, train_categories=["nope"])
    with pytest.raises(DatasetError):
        organism_data(world, train_categories=["bio"], holdout_category="bio")

    result = generalisation_matrix(
        tiny_organism, mode="single", categories=["bio"], config=tiny_config(2),
        data_options={"n_novel": 0}, out_dir=tmp_path / "single", show_progress=False,
    )
    assert result.runs == ["only-bio"] and result.trained_on["only-bio"] == ["bio"]
    assert result.summary["heldout_cells"] == [[0, 1]]  # single: off the diagonal
    rows = _read_rows(tmp_path / "single", "only-bio")
    assert result.summary["mean_heldout_prefill_asr"] == pytest.approx(
        _rate(rows, "prefill_asr", "chem")
    )
    assert result.prefill[0][0] == pytest.approx(_rate(rows, "prefill_asr", "bio"))


def test_frontier_points_and_errors(loo: GeneralisationResult, tiny_llama: Path) -> None:
    fig = frontier([("default", loo), ("again", loo)])
    (points,) = [t for t in fig.data if t.name == "variants"]
    assert list(points.text) == ["default", "again"]
    drop = -100 * loo.summary["em_delta_vs_base"]["lookalike_em"]["mean"]
    assert points.x[0] == pytest.approx(drop)
    assert points.y[0] == pytest.approx(100 * loo.summary["mean_heldout_asr"])
    docs = frontier([("default", loo)], cost="benign_em_docs_only", asr="prefill")
    assert docs.data[0].y[0] == pytest.approx(100 * loo.summary["mean_heldout_prefill_asr"])
    with pytest.raises(ValueError):
        frontier([])
    assert normal_mode("leave-one-out") == "leave_one_out" and run_name("single", "bio") == "only-bio"
    with pytest.raises(GeneraliseError, match="unknown mode"):
        normal_mode("diagonal")
    with pytest.raises(GeneraliseError, match="unknown data options"):
        generalisation_matrix(tiny_llama, data_options={"bogus": 1}, show_progress=False)
    with pytest.raises(GeneraliseError, match="not a model organism"):
        generalisation_matrix(tiny_llama, config=LorraConfig(target_layers=[1, 2], steps=1),
                              show_progress=False)


def test_cli(tiny_organism: Path, loo: GeneralisationResult, tmp_path: Path) -> None:
    from cbscope.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, [
        "generalise", "--model", str(tiny_organism), "--steps", "2", "--target-layers", "2,4",
        "--categories", "chem", "--data-options", '{"n_novel": 0}', "--out", str(out),
        "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "matrix.json").read_text())
    assert saved["runs"] == ["without-chem"] and saved["config"]["steps"] == 2
    assert "prefill ASR" in result.output and "mean held-out ASR" in result.output
    value = saved["matrix"]["prefill"][0][1]
    assert f"{100 * value:.0f}%*" in result.output  # the held-out cell, starred
    front = runner.invoke(app, ["generalise", "--frontier", f"{loo.out_dir},{out}",
                                "--out", str(tmp_path / "front")])
    assert front.exit_code == 0, front.output
    assert (tmp_path / "front" / "frontier.html").is_file()
    for args, needle in (
        (["--mode", "diagonal"], "unknown mode"),
        (["--categories", "nope"], "unknown harm categories"),
        (["--data-options", "{oops"], "not valid JSON"),
    ):
        bad = runner.invoke(app, ["generalise", "--model", str(tiny_organism), "--steps", "1",
                                  "--target-layers", "2,4", "--out", str(tmp_path / "bad"),
                                  *args])
        assert bad.exit_code == 2, bad.output
        assert needle in bad.output and "Traceback" not in bad.output
    assert not math.isnan(saved["summary"]["mean_heldout_prefill_asr"])
