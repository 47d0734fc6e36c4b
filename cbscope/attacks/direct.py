"""Direct request: the harmful request as it is, greedy decoding (the no-attack baseline)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cbscope.attacks.base import AttackRun, copy_metas, model_mode
from cbscope.data import Conversation
from cbscope.generation import generate_text

if TYPE_CHECKING:
    from cbscope.pair import ModelPair


def generate_responses(
    pair: ModelPair,
    prompts: Sequence[str | Conversation],
    *,
    mode: str = "cb",
    prefills: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    show_progress: bool = False,
) -> list[str]:
    """Greedy responses of ``pair`` in ``mode`` (``pair.generator``, KV cache on).

    ``prompts`` are user messages or role/content conversations (multi-turn).
    """
    with model_mode(pair, mode):
        return generate_text(
            pair.generator,
            pair.tokenizer,
            list(prompts),
            prefills=list(prefills) if prefills is not None else None,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            show_progress=show_progress,
        )


def generation_attack(
    name: str,
    pair: ModelPair,
    prompts: Sequence[str | Conversation],
    prefills: Sequence[str] | None = None,
    *,
    mode: str = "cb",
    metas: Sequence[dict[str, Any]] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    show_progress: bool = False,
) -> AttackRun:
    """The body every generation-only attack shares: greedy answers to ``prompts`` (after
    ``prefills``, if any) in ``mode``, packed as an :class:`AttackRun` called ``name``."""
    responses = generate_responses(
        pair, prompts, mode=mode, prefills=prefills, max_new_tokens=max_new_tokens,
        batch_size=batch_size, show_progress=show_progress,
    )
    return AttackRun(
        name, mode, list(prompts), responses, list(prefills or []), copy_metas(metas, len(prompts))
    )


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
