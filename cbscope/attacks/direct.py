"""Direct request: the harmful request as it is, greedy decoding (the no-attack baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cbscope.attacks.base import AttackRun
from cbscope.attacks.generate import (
    GenerationAttack,
    Requests,
    generate_responses,
    generation_attack,
)
from cbscope.attacks.registry import register_attack
from cbscope.attacks.suite import EvalSuite, item_metas, item_prompts

if TYPE_CHECKING:
    from cbscope.pair import ModelPair

__all__ = ["DirectAttack", "direct_attack", "generate_responses", "generation_attack"]


def direct_attack(
    pair: ModelPair,
    prompts: Sequence[str],
    *,
    mode: str = "cb",
    metas: Sequence[dict[str, Any]] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    show_progress: bool = False,
) -> AttackRun:
    """Send each request unchanged.

    Args:
        pair: The model pair.
        prompts: Harmful requests (user messages).
        mode: ``"base"`` (adapters off) or ``"cb"`` (adapters on).
        metas: Per-prompt metadata carried into the run.
        max_new_tokens: Generation budget.
        batch_size: Prompts per generate call.
        show_progress: Show a tqdm bar.
    """
    return generation_attack(
        "direct", pair, prompts, mode=mode, metas=metas, max_new_tokens=max_new_tokens,
        batch_size=batch_size, show_progress=show_progress,
    )


@register_attack
class DirectAttack(GenerationAttack):
    """The suite's harmful requests, unchanged."""

    name = "direct"
    order = 10
    description = "the harmful request as it is (the no-attack baseline)"

    def requests(self, suite: EvalSuite, options: Any) -> Requests:
        """``suite.harmful``."""
        return Requests(item_prompts(suite.harmful), item_metas(suite.harmful))
