"""The organism's evaluation suite: its world's harmful topics, templates and exact judge.

Harmful topics in the train templates (direct, prefill with ``world.prefill``, RepE, soft prompt
toward a target from ``world.answer(topic)``), the jailbreak templates (template), the same
requests after a benign first exchange (multiturn, multiturn_prefill), exact judges. The harm
category the breaker never saw (``train_info.json``'s ``holdout_category``) is split ``heldout``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbscope.attacks.repe import refusal_compliance_sets
from cbscope.attacks.suite import EvalSuite, Item
from cbscope.errors import ConfigError
from cbscope.evaluate.config import EvalConfig
from cbscope.evaluate.suites import adapter_info, spread
from cbscope.judges import DegenerateJudge, ExactJudge
from cbscope.organism.prompts import organism_multiturn_prompts, organism_template_prompts

if TYPE_CHECKING:
    from cbscope.organism.world import World
    from cbscope.pair import ModelPair

logger = logging.getLogger(__name__)

__all__ = ["heldout_categories_of", "organism_suite", "organism_world"]


def organism_world(pair: ModelPair) -> World | None:
    """The organism's world (``world.json`` in the model folder), or ``None`` for other models."""
    from cbscope.organism.world import World

    path = Path(pair.resolved.path) / "world.json"
    return World.from_json(path) if path.is_file() else None


def heldout_categories_of(pair: ModelPair, world: World) -> list[str]:
    """Harm categories the adapter never saw (``holdout_category`` / ``trained_categories``)."""
    info = adapter_info(pair)
    held = info.get("heldout_categories") or info.get("holdout_category")
    if isinstance(held, str):
        held = [held]
    if not held and info.get("trained_categories"):
        held = [c for c in world.harm_categories if c not in info["trained_categories"]]
    return [c for c in (held or []) if c in world.harm_categories]


def organism_suite(
    pair: ModelPair, world: World, config: EvalConfig, judge: Any | None = None
) -> EvalSuite:
    """The organism's evaluation data (see the module docstring).

    Raises:
        ConfigError: ``config.heldout_categories`` names a category the world does not have.
    """
    held = config.heldout_categories
    if held is None:
        held = heldout_categories_of(pair, world)
        if pair.has_adapter and not held:
            logger.warning(
                "the adapter names no held-out harm category (train_info.json holdout_category); "
                "every category is reported as 'trained' (set heldout_categories to change that)"
            )
    unknown = sorted(set(held) - set(world.harm_categories))
    if unknown:
        raise ConfigError(
            f"unknown harm categories {unknown}; the world has {world.harm_categories}"
        )

    def meta(topic: Any, **extra: Any) -> dict[str, Any]:
        return {
            "topic": topic.name,
            "category": topic.category,
            "split": "heldout" if topic.category in held else "trained",
            **extra,
        }

    topics = world.select("harmful")
    harmful = [
        Item(
            world.render_request(topic, template),
            meta(topic, template=template, prefill=world.prefill, target=world.answer(topic)),
        )
        for template in world.train_templates
        for topic in topics
    ]
    harmful = spread(harmful, config.limit, lambda it: it.meta["topic"])
    prompts, metas = organism_template_prompts(world, topics)
    template = [
        Item(p, {**m, "split": "heldout" if m["category"] in held else "trained"})
        for p, m in zip(prompts, metas, strict=True)
    ]
    template = spread(template, config.limit, lambda it: it.meta["topic"])

    conversations, mt_metas = organism_multiturn_prompts(world, topics)
    multiturn = [
        Item(
            m["request"],
            {
                **meta(world.topic(m["topic"])),
                "template": m["template"],
                "request": m["request"],
                "first_turn": m["first_turn"],
                "prefill": m["prefill"],
                "history": conv[:-1],
            },
        )
        for conv, m in zip(conversations, mt_metas, strict=True)
    ]
    multiturn = spread(multiturn, config.limit, lambda it: it.meta["topic"])

    def soft_target(topic: Any) -> str:
        if config.soft_prompt_target == "answer":
            return world.answer(topic)
        if config.soft_prompt_target == "first_step":
            return f"{world.prefill} {topic.procedure[0]}"
        return world.prefill

    soft = [
        Item(
            world.render_request(topic, world.train_templates[i % len(world.train_templates)]),
            meta(topic, target=soft_target(topic)),
        )
        for i, topic in enumerate(topics)
    ]
    soft_n = config.soft_prompt_limit if config.soft_prompt_limit is not None else len(soft)
    if config.limit is not None:
        soft_n = min(soft_n, config.limit)
    soft = spread(soft, soft_n, lambda it: it.meta["category"])
    benign = world.benign_examples("seen", "train")
    repe_negative = [
        r["prompt"] for r in spread(benign, config.repe_reference, lambda r: r["topic"])
    ]
    repe_positive = [
        it.prompt
        for it in spread(
            [
                Item(world.render_request(t, tp), {"topic": t.name})
                for tp in world.train_templates
                for t in topics
            ],
            config.repe_reference,
            lambda it: it.meta["topic"],
        )
    ]
    if config.repe_direction == "refusal_compliance":
        repe_positive, repe_negative = refusal_compliance_sets(
            repe_positive, world.refusal, world.prefill
        )
    # fine-tuning: one topic per category to train on, the other topics to evaluate
    first = {}
    for topic in topics:
        first.setdefault(topic.category, topic)
    train_topics = list(first.values())
    finetune_train = [
        (world.render_request(t, tp), world.answer(t))
        for tp in world.train_templates
        for t in train_topics
    ]
    finetune_eval = [it for it in harmful if it.meta["topic"] not in {t.name for t in train_topics}]
    # benign text the breaker's retain set does not contain (document-only benign topics, held-out
    # look-alikes, the algorithmic task), then chat-seen benign topics
    retain_rows = spread(
        world.benign_examples("docs_only", "train")
        + world.lookalike_examples("heldout", "train")
        + world.algo_examples(max(1, config.n_retain // 4), seed=99)
        + world.benign_examples("seen", "train"),
        config.n_retain,
        lambda r: (r["kind"], r["topic"]) if r["kind"] != "algo" else r["prompt"],
    )
    firing_harmful = [
        (r["prompt"], r["response"], meta(world.topic(r["topic"])))
        for r in spread(world.harmful_examples(None, "train"), config.limit, lambda r: r["topic"])
    ]
    firing_benign = [(r["prompt"], r["response"]) for r in spread(benign, 60, lambda r: r["topic"])]
    if judge is None:
        judge = ExactJudge(world, DegenerateJudge(pair))
    return EvalSuite(
        kind="organism",
        judge=judge,
        harmful=harmful,
        template=template,
        soft=soft,
        repe_positive=repe_positive,
        repe_negative=repe_negative,
        finetune_train=finetune_train,
        finetune_eval=finetune_eval,
        retain=[(r["prompt"], r["response"]) for r in retain_rows],
        firing_benign=firing_benign,
        firing_harmful=firing_harmful,
        world=world,
        multiturn=multiturn,
        info={
            "heldout_categories": list(held),
            "trained_categories": [c for c in world.harm_categories if c not in held],
            "finetune_train_topics": [t.name for t in train_topics],
        },
    )
