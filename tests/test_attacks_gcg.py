"""GCG through nanoGCG: it lowers the target loss, optimises the prompt that is evaluated, keeps
its strings along the way and leaves global state as it found it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cbscope.attacks.gcg import ORGANISM_GCG_INIT, GcgConfig, _kept_steps, gcg_attack
from cbscope.attacks.placement import fill_slot
from cbscope.errors import ConfigError


@pytest.fixture(scope="module")
def soft_items(shipped_pair):
    from cbscope.evaluate import EvalConfig, organism_suite, organism_world

    suite = organism_suite(shipped_pair, organism_world(shipped_pair), EvalConfig(limit=2))
    return [it.prompt for it in suite.soft[:2]], [str(it.meta["target"]) for it in suite.soft[:2]]


def test_gcg_lowers_the_target_loss_and_restores_global_state(shipped_pair, soft_items) -> None:
    prompts, targets = soft_items
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    deterministic = torch.are_deterministic_algorithms_enabled()
    config = GcgConfig(
        steps=6, search_width=16, topk=16, keep_every=3, early_stop=False, max_new_tokens=6
    )
    run = gcg_attack(shipped_pair, prompts, targets, mode="cb", config=config, init=ORGANISM_GCG_INIT)
    assert torch.equal(torch.rand(3), expected_next)  # nanoGCG's set_seed undone
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    for meta, kept, sent, prompt in zip(
        run.metas, run.checkpoints, run.prompts, prompts, strict=True
    ):
        budgets = [c.budget for c in kept]
        assert {0, 3, 6} <= set(budgets) and budgets == sorted(set(budgets)) and budgets[-1] == 6
        assert kept[0].extra["optim_str"] == ORGANISM_GCG_INIT
        assert kept[-1].loss < kept[0].loss  # cbscope's own recomputed target loss
        assert meta["final_loss"] == kept[-1].loss and meta["steps_used"] == 6
        assert sent == fill_slot(config.template, prompt, meta["optim_str"])
        assert meta["retokenizes"] is True  # word-level: the text is the optimised ids


def test_gcg_runs_with_the_adapter_off_and_stops_early(shipped_pair, soft_items) -> None:
    prompts, targets = soft_items
    config = GcgConfig(steps=30, search_width=16, topk=16, keep_every=None, max_new_tokens=6)
    run = gcg_attack(shipped_pair, prompts[:1], targets[:1], mode="base", config=config,
                     init=ORGANISM_GCG_INIT)
    kept = run.checkpoints[0]
    assert kept[0].budget == 0 and kept[-1].budget == run.metas[0]["steps_used"]
    assert run.metas[0]["steps_used"] < 30  # the base model writes the target: early stop
    assert kept[-1].loss <= kept[0].loss


def test_gcg_through_the_registry_on_the_tiny_organism(tiny_organism: Path) -> None:
    """On a freshly built organism (no adapter): ``cbscope eval --attacks gcg`` reaches it."""
    from cbscope.evaluate import EvalConfig, evaluate_pair
    from cbscope.pair import load_pair

    pair = load_pair(tiny_organism)
    config = EvalConfig(
        attacks=["gcg"], limit=2, max_new_tokens=4, modes=["base"],
        attack_options={"gcg": {"steps": 2, "search_width": 8, "topk": 8, "keep_every": 1}},
    )
    report = evaluate_pair(pair, config=config, show_progress=False)
    entry = report.attacks["gcg"]
    assert entry["budget"]["unit"] == "steps" and [b for b, _ in entry["curve"]][0] == 0


def test_kept_steps_and_bad_options() -> None:
    config = GcgConfig(keep_every=4, loss_thresholds=[1.0, 0.5])
    assert _kept_steps([2.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3], config) == [0, 2, 4, 6, 7]
    for bad in ({"steps": -1}, {"search_width": 0}, {"template": "{optim_str}"}, {"init": " "}):
        with pytest.raises(ConfigError):
            GcgConfig(**bad).validate()


def test_gcg_without_nanogcg_is_a_named_error_before_any_work(
        tiny_organism: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nanoGCG is installed with --no-deps (its pins exclude transformers 5); without it the
    attack says how to install it, before a single step or generation runs."""
    import importlib.util

    from cbscope.attacks import gcg
    from cbscope.evaluate import EvalConfig, evaluate_pair
    from cbscope.pair import load_pair

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nanogcg" else real(name, *a))

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("GCG ran before nanoGCG was checked")

    monkeypatch.setattr(gcg, "gcg_attack", no_work)
    pair = load_pair(tiny_organism)
    config = EvalConfig(attacks=["gcg"], limit=2, max_new_tokens=4, modes=["base"])
    with pytest.raises(ConfigError, match="--no-deps nanogcg==0.3.0"):
        evaluate_pair(pair, config=config, show_progress=False)
