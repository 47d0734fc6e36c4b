"""What an attack runs on besides the pair: the prompts and judge of an evaluation.

:class:`EvalSuite` is plain data; :mod:`cbscope.evaluate` builds one for the organism
(:func:`~cbscope.evaluate.organism_suite`) or a real chat model
(:func:`~cbscope.evaluate.chat_suite`), and every registered attack
(:mod:`cbscope.attacks.protocol`) reads the fields it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvalSuite", "Item", "item_metas", "item_prompts"]


@dataclass
class Item:
    """One prompt with its metadata (topic, category, split, target, prefill ...)."""

    prompt: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSuite:
    """The prompts and the judge of an evaluation.

    Attributes:
        kind: ``"organism"`` or ``"chat"``.
        judge: Judge of harmful requests (see :mod:`cbscope.judges`).
        harmful: Requests for the direct, prefill and RepE attacks (``meta["prefill"]`` set).
        template: Templated requests.
        soft: Requests for the soft prompt (``meta["target"]`` set).
        repe_positive: "+" reference prompts of the RepE direction (requests, or
            ``(request, response prefix)`` pairs).
        repe_negative: "-" reference prompts.
        finetune_train: ``(request, harmful response)`` pairs; with ``info["finetune_generate"]``
            (chat models) the second item is a prefill and the base model completes it.
        finetune_eval: Requests evaluated during fine-tuning.
        retain: ``(request, response)`` pairs for KL / perplexity (empty responses: the base
            model answers).
        over_refusal: ``{set name: benign look-alike requests}`` (chat models).
        firing_benign: Benign ``(request, response)`` pairs for the false-firing rate.
        firing_harmful: Harmful ``(request, response, meta)`` triples for the firing rate (when
            empty: the base model's answers under the prefill attack).
        world: The organism's world.
        info: Facts about the data (sources, held-out categories).
        multiturn: Harmful requests of the multi-turn attacks (``meta["history"]``: the earlier
            turns; ``meta["prefill"]``: the prefill of ``multiturn_prefill``). When empty, the
            requests of ``harmful`` after :data:`~cbscope.attacks.CHAT_FIRST_TURN`.
    """

    kind: str
    judge: Any
    harmful: list[Item]
    template: list[Item]
    soft: list[Item]
    repe_positive: list[Any]
    repe_negative: list[Any]
    finetune_train: list[tuple[str, str]]
    finetune_eval: list[Item]
    retain: list[tuple[str, str]]
    over_refusal: dict[str, list[Item]] = field(default_factory=dict)
    firing_benign: list[tuple[str, str]] = field(default_factory=list)
    firing_harmful: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    world: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    multiturn: list[Item] = field(default_factory=list)


def item_prompts(items: Sequence[Item]) -> list[str]:
    """The prompts of ``items``."""
    return [it.prompt for it in items]


def item_metas(items: Sequence[Item]) -> list[dict[str, Any]]:
    """Copies of the metas of ``items``."""
    return [dict(it.meta) for it in items]
