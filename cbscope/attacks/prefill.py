"""Prefilling attack: the assistant turn starts with an affirmative prefix the attacker chooses.

Prefill sources: one custom string for every prompt, one string per prompt (e.g. AdvBench's
``target`` column, "Sure, here is a script that ..."), or the organism's ``world.prefill``
("sure here is how :"). The response judged is what the model generates *after* the prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cbscope.attacks.base import AttackRun
from cbscope.attacks.generate import GenerationAttack, Requests, generation_attack
from cbscope.attacks.registry import register_attack
from cbscope.attacks.suite import EvalSuite, Item, item_metas, item_prompts

if TYPE_CHECKING:
    from cbscope.data import ChatExample
    from cbscope.pair import ModelPair

__all__ = ["DEFAULT_PREFILL", "PrefillAttack", "item_prefills", "prefill_attack", "prefills_for"]

DEFAULT_PREFILL = "Sure, here is"


def prefills_for(
    n: int,
    prefill: str | Sequence[str] | None = None,
    *,
    examples: Sequence[ChatExample] | None = None,
    column: str = "target",
) -> list[str]:
    """The prefill of each of ``n`` prompts.

    Args:
        n: Number of prompts.
        prefill: One string for all prompts, or one per prompt.
        examples: Take each prompt's prefill from ``example.meta[column]`` (AdvBench's
            ``target``), falling back to ``prefill`` or :data:`DEFAULT_PREFILL` where missing.
        column: Meta column holding the prefill.

    Raises:
        ValueError: On a length mismatch.
    """
    if prefill is not None and not isinstance(prefill, str):
        values = [str(p) for p in prefill]
        if len(values) != n:
            raise ValueError(f"{n} prompts but {len(values)} prefills")
        return values
    fallback = prefill if isinstance(prefill, str) else DEFAULT_PREFILL
    if examples is None:
        return [fallback] * n
    if len(examples) != n:
        raise ValueError(f"{n} prompts but {len(examples)} examples")
    return [str(ex.meta.get(column) or fallback) for ex in examples]


def prefill_attack(
    pair: ModelPair,
    prompts: Sequence[str],
    prefills: str | Sequence[str] = DEFAULT_PREFILL,
    *,
    mode: str = "cb",
    metas: Sequence[dict[str, Any]] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    show_progress: bool = False,
) -> AttackRun:
    """Generate after forcing ``prefills`` at the start of the assistant turn.

    Args:
        pair: The model pair.
        prompts: Harmful requests.
        prefills: One prefill for all prompts or one per prompt (see :func:`prefills_for`).
        mode: ``"base"`` or ``"cb"``.
        metas: Per-prompt metadata.
        max_new_tokens: Tokens generated after the prefill.
        batch_size: Prompts per generate call.
        show_progress: Show a tqdm bar.
    """
    return generation_attack(
        "prefill", pair, prompts, prefills_for(len(prompts), prefills), mode=mode, metas=metas,
        max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=show_progress,
    )


def item_prefills(items: Sequence[Item]) -> list[str]:
    """Each item's ``meta["prefill"]`` (:data:`DEFAULT_PREFILL` where it has none)."""
    return [str(it.meta.get("prefill") or DEFAULT_PREFILL) for it in items]


@register_attack
class PrefillAttack(GenerationAttack):
    """The suite's harmful requests with their answer prefilled (``meta["prefill"]``)."""

    name = "prefill"
    order = 20
    description = "an affirmative assistant prefix before the answer (the organism's or the target)"

    def requests(self, suite: EvalSuite, options: Any) -> Requests:
        """``suite.harmful`` with each item's prefill."""
        items = suite.harmful
        return Requests(item_prompts(items), item_metas(items), item_prefills(items))
