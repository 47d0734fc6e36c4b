"""The worst-case fine-tuning sweep: the maximum ASR under the capability bound, its grid in
the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cbscope
from cbscope.attacks.finetune import FinetuneSweepConfig, worst_case
from cbscope.errors import ConfigError

ASSETS = Path(cbscope.__file__).parent / "assets"


def _point(lr: float, steps: int, asr: float, drop: float) -> dict:
    return {"lr": lr, "seed": 0, "steps": steps, "asr": asr, "em_drop": drop}


def test_the_sweep_picks_the_maximum_under_the_bound() -> None:
    grid = [
        _point(1e-4, 5, 0.20, 0.00),
        _point(1e-4, 10, 0.60, 0.10),  # exactly at the bound: allowed
        _point(1e-3, 5, 0.60, 0.05),  # a tie, later in the grid
        _point(1e-3, 10, 0.95, 0.30),  # the highest ASR, but capability fell too far
        _point(3e-3, 5, 0.55, 0.00),
    ]
    assert worst_case(grid, 0.10) is grid[1]
    assert worst_case(grid, 0.30) is grid[3]
    assert worst_case(grid, 0.0) is grid[4]
    assert worst_case([_point(1e-3, 5, 1.0, 0.5)], 0.1) is None


def test_finetune_worst_reports_the_chosen_points_rows_and_the_grid() -> None:
    from cbscope.evaluate import EvalConfig, evaluate_pair
    from cbscope.pair import load_pair

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = load_pair(ASSETS / "organism", ASSETS / "organism-breaker")
        options = {"lrs": [3e-3], "seeds": [0, 1], "step_grid": [2, 4], "n_benign": 6,
                   "n_examples": 4, "batch_size": 2}
        config = EvalConfig(attacks=["finetune_worst"], limit=6, max_new_tokens=16, modes=["cb"],
                            attack_options={"finetune_worst": options})
        report = evaluate_pair(pair, config=config, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    info = report.meta["finetune_worst"]["cb"]
    grid = info["grid"]
    assert [(g["seed"], g["steps"]) for g in grid] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    chosen = info["chosen"]
    assert chosen == worst_case(grid, 0.10)
    rows = [r for r in report.rows if r.get("attack") == "finetune_worst"]
    assert {(r["lr"], r["seed"], r["step"]) for r in rows} == {
        (chosen["lr"], chosen["seed"], chosen["steps"])
    }
    assert report.attacks["finetune_worst"]["cb"] == pytest.approx(chosen["asr"])
    assert all(0 <= g["benign_em"] <= 1 and g["benign_em_before"] is not None for g in grid)
    assert "Worst-case fine-tuning (cb" in report.markdown()


def test_bad_sweep_options() -> None:
    from cbscope.attacks import get_attack

    with pytest.raises(ConfigError, match="step_grid"):
        get_attack("finetune_worst").make_options({"steps": 30})
    for bad in ({"step_grid": []}, {"seeds": []}, {"max_em_drop": 1.5}, {"n_benign": 0}):
        with pytest.raises(ConfigError):
            FinetuneSweepConfig(**bad).validate()
