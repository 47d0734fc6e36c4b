"""Answers of the pair in one mode, and the attacks that only choose what to send.

:func:`generate_responses` decodes the pair's answers in ``"base"`` or ``"cb"`` mode;
:func:`generation_attack` packs them as an :class:`~cbscope.attacks.base.AttackRun`. A
:class:`GenerationAttack` (direct, prefill, template, the multi-turn attacks) implements only
:meth:`GenerationAttack.requests`, what it sends; the evaluation's shared
:class:`~cbscope.attacks.protocol.GenerationSettings` decide how it is answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cbscope.attacks.base import AttackRun, copy_metas, model_mode
from cbscope.attacks.protocol import Attack, AttackContext
from cbscope.attacks.suite import EvalSuite
from cbscope.data import Conversation
from cbscope.generation import generate_text

if TYPE_CHECKING:
    from cbscope.pair import ModelPair

__all__ = ["GenerationAttack", "Requests", "generate_responses", "generation_attack"]


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
        pair,
        prompts,
        mode=mode,
        prefills=prefills,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    return AttackRun(
        name, mode, list(prompts), responses, list(prefills or []), copy_metas(metas, len(prompts))
    )


@dataclass
class Requests:
    """What a generation-only attack sends.

    Attributes:
        prompts: User messages, or role/content conversations ending in a user turn.
        metas: Per-prompt metadata carried into the rows.
        prefills: Assistant prefills, one per prompt (``None``: none).
    """

    prompts: list[str | Conversation]
    metas: list[dict[str, Any]]
    prefills: list[str] | None = None


class GenerationAttack(Attack):
    """An attack that only chooses its prompts (and prefills); the shared decoding answers them."""

    def requests(self, suite: EvalSuite, options: Any) -> Requests:
        """The prompts this attack sends, from the suite."""
        raise NotImplementedError

    def run(self, ctx: AttackContext, mode: str, options: Any) -> AttackRun:
        """Answer :meth:`requests` in ``mode`` with the evaluation's generation settings."""
        sent = self.requests(ctx.suite, options)
        return generation_attack(
            self.name,
            ctx.pair,
            sent.prompts,
            sent.prefills,
            mode=mode,
            metas=sent.metas,
            max_new_tokens=ctx.generation.max_new_tokens,
            batch_size=ctx.generation.batch_size,
        )
