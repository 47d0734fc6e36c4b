"""The evaluation: every requested attack through the registry, then capability, over-refusal,
retain KL and firing statistics, into one :class:`~cbscope.evaluate.report.Report`."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from cbscope.attacks import AttackContext, AttackRun, get_attack
from cbscope.attacks.generate import generate_responses
from cbscope.attacks.suite import EvalSuite, Item
from cbscope.errors import ConfigError
from cbscope.evaluate.chat_suite import chat_suite
from cbscope.evaluate.config import CHAT_DEFAULT_LIMIT, EvalConfig, parse_attacks
from cbscope.evaluate.measures import (
    chat_over_refusal_rows,
    firing_rows,
    organism_capability_rows,
    retain_divergence,
)
from cbscope.evaluate.organism_suite import organism_suite, organism_world
from cbscope.evaluate.report import Report

if TYPE_CHECKING:
    from cbscope.organism.world import World
    from cbscope.pair import ModelPair

logger = logging.getLogger(__name__)

__all__ = ["evaluate_pair", "pair_modes"]


def pair_modes(pair: ModelPair, requested: Sequence[str] | None) -> list[str]:
    """The states to attack: both with an adapter, ``base`` without, narrowed to ``requested``.

    Raises:
        ConfigError: ``requested`` leaves none (``cb`` alone on a pair without an adapter).
    """
    modes = ["base", "cb"] if pair.has_adapter else ["base"]
    if requested is not None:
        modes = [m for m in modes if m in requested]
        if not modes:
            raise ConfigError(f"modes {list(requested)}: the pair has no adapter, so only 'base'")
    return modes


def evaluate_pair(
    pair: ModelPair,
    *,
    attacks: str | Sequence[str] | None = None,
    config: EvalConfig | None = None,
    judge: Any | None = None,
    world: World | None = None,
    suite: EvalSuite | None = None,
    harmful_path: str | os.PathLike[str] | None = None,
    xstest_path: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
) -> Report:
    """Attack the pair's base and circuit-broken states, measure capability and over-refusal.

    Every name in ``config.attacks`` is looked up in the attack registry
    (:mod:`cbscope.attacks.registry`); per-mode attacks run in the order given, then those that
    span both modes (fine-tuning).

    Args:
        pair: The model pair (with an adapter for base-vs-CB numbers; without one, base only).
        attacks: Attack names (overrides ``config.attacks``), e.g. ``["direct", "prefill"]`` or
            ``"direct,prefill"``.
        config: :class:`EvalConfig`.
        judge: Judge of harmful responses (default: exact for the organism, compliance for real
            models); any object with ``judge(prompts, responses[, metas])``.
        world: The organism's world (default: ``world.json`` of the model folder, if any).
        suite: A ready :class:`EvalSuite` (default: :func:`organism_suite` / :func:`chat_suite`).
        harmful_path: Harmful prompts for real models (default: AdvBench in the shared data).
        xstest_path: XSTest CSV for over-refusal (default: the shared data copy).
        show_progress: Show tqdm bars.

    Returns:
        The :class:`Report` (save it with :meth:`Report.save`).

    Raises:
        ConfigError: Bad config values or attack options, or modes the pair cannot run; all
            raised before any attack runs.
    """
    started = time.perf_counter()
    config = replace(config) if config is not None else EvalConfig()
    if attacks is not None:
        config.attacks = parse_attacks(attacks)
    config.validate()
    modes = pair_modes(pair, config.modes)
    if not pair.has_adapter:
        logger.warning("no adapter: reporting the base model only")
    chosen = [get_attack(name) for name in config.attacks]
    options = {attack.name: config.options_for(attack.name) for attack in chosen}
    world = world if world is not None else organism_world(pair)
    if suite is None:
        if world is not None:
            suite = organism_suite(pair, world, config, judge)
        else:
            if config.limit is None:
                config.limit = CHAT_DEFAULT_LIMIT
                logger.info("real model: evaluating at most %d prompts per set", config.limit)
            suite = chat_suite(
                pair, config, harmful_path=harmful_path, xstest_path=xstest_path, judge=judge
            )
    generation = config.generation(suite.kind)
    max_new = generation.max_new_tokens
    ctx = AttackContext(pair, suite, modes, generation, config, show_progress)
    for attack in chosen:
        attack.check(ctx, options[attack.name])
    compare = pair.has_adapter and "cb" in modes
    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    meta: dict[str, Any] = {}
    runs: dict[tuple[str, str], AttackRun] = {}

    per_mode = [a for a in chosen if not a.spans_modes]
    spanning = [a for a in chosen if a.spans_modes]
    phases = [f"{a.name} ({m})" for a in per_mode for m in modes]
    phases += [a.name for a in spanning]
    phases += ["capability and over-refusal"]
    phases += ["retain KL"] if compare and suite.retain else []
    phases += ["firing stats"] if config.firing and compare else []
    bar = tqdm(total=len(phases), desc="cbscope eval", disable=not show_progress)

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        bar.set_postfix_str(name)
        tick = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - tick
        logger.info("%s: %.1f s", name, timings[name])
        bar.update(1)

    for attack in per_mode:
        for mode in modes:
            with phase(f"{attack.name} ({mode})"):
                run = attack.run(ctx, mode, options[attack.name])
                rows += attack.judge_rows(run, suite.judge)
            runs[(attack.name, mode)] = run
            info = attack.run_meta(run)
            if info is not None:
                meta.setdefault(attack.meta_key or attack.name, {})[mode] = info

    for attack in spanning:
        with phase(attack.name):
            outcome = attack.evaluate(ctx, options[attack.name])
            rows += outcome.rows
            meta.update(outcome.meta)

    with phase("capability and over-refusal"):
        if suite.kind == "organism" and suite.world is not None:
            rows += organism_capability_rows(pair, suite.world, modes, config, max_new)
        else:
            rows += chat_over_refusal_rows(pair, suite, modes, config, max_new)

    retain = list(suite.retain)
    if compare and retain:
        with phase("retain KL"):
            retain = _answer_retain(pair, retain, max_new, config.batch_size)
            rows += retain_divergence(pair, retain)

    meta["firing_threshold"] = config.firing_threshold
    meta["firing_note"] = "skipped (no adapter)" if not compare else "disabled"
    if config.firing and compare:
        with phase("firing stats"):
            harmful_items = _firing_harmful(ctx, runs.get(("prefill", "base")))
            benign = suite.firing_benign or retain[:60]
            try:
                rows += firing_rows(pair, harmful_items, benign, config)
                meta["firing_note"] = "cbscope.trace.firing_stats"
            except ImportError as err:
                meta["firing_note"] = f"cbscope.trace.firing_stats unavailable ({err})"
                logger.warning(meta["firing_note"])
            except Exception as err:  # noqa: BLE001 - firing stats are an extra; keep the report
                meta["firing_note"] = f"firing_stats failed: {type(err).__name__}: {err}"
                logger.warning(meta["firing_note"])
    bar.close()

    soft_prompt = meta.pop("soft_prompt", {})
    meta.update(
        {
            "model": pair.resolved.spec,
            "model_path": str(pair.resolved.path),
            "adapter": str(pair.adapter_path) if pair.adapter_path else None,
            "suite": suite.kind,
            "modes": modes,
            "judge": getattr(suite.judge, "name", type(suite.judge).__name__),
            "max_new_tokens": max_new,
            "generation": asdict(generation),
            "config": asdict(config),
            "data": suite.info,
            "soft_prompt": soft_prompt,
            "timings": timings,
            "seconds": time.perf_counter() - started,
            "torch_threads": torch.get_num_threads(),
            "device": str(pair.device),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    return Report.from_rows(rows, meta)


def _answer_retain(
    pair: ModelPair, retain: list[tuple[str, str]], max_new: int, batch_size: int
) -> list[tuple[str, str]]:
    """Retain pairs with the base model's answer where the response is empty (chat models)."""
    missing = [i for i, (_, r) in enumerate(retain) if not r]
    if missing:
        answers = generate_responses(
            pair,
            [retain[i][0] for i in missing],
            mode="base",
            max_new_tokens=max_new,
            batch_size=batch_size,
        )
        for i, answer in zip(missing, answers, strict=True):
            retain[i] = (retain[i][0], answer)
    return [(p, r) for p, r in retain if r]


def _firing_harmful(ctx: AttackContext, base_prefill: AttackRun | None) -> list[Item]:
    """Harmful examples for the firing rate: the suite's, else the base model's answers under
    the prefill attack (run now if the evaluation did not)."""
    suite = ctx.suite
    if suite.firing_harmful:
        return [Item(p, {**m, "response": r}) for p, r, m in suite.firing_harmful]
    if base_prefill is None:
        prefill = get_attack("prefill")
        base_prefill = prefill.run(ctx, "base", prefill.Options())
    return [
        Item(p, {**m, "response": f"{f} {r}".strip()})
        for p, f, r, m in zip(
            base_prefill.prompts,
            base_prefill.prefills,
            base_prefill.responses,
            base_prefill.metas,
            strict=True,
        )
    ]
