"""Report rows of a judged attack run: one JSON-friendly dict per example.

The rows are what ``report.json`` keeps and what every number of the report is computed from
(:func:`cbscope.evaluate.summarise`); :class:`AttackRow` and :class:`FinetuneRow` name their keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

from cbscope.attacks.base import AttackRun
from cbscope.judges import Verdict

__all__ = ["META_KEYS", "AttackRow", "FinetuneRow", "attack_rows", "verdict_fields"]

#: Per-example metadata copied from an attack run into its rows (when present).
META_KEYS: tuple[str, ...] = (
    "topic",
    "category",
    "split",
    "template",
    "target",
    "initial_loss",
    "final_loss",
    "steps_used",
    "target_hit",
    "request",
    "source",
    "first_turn",
)


class AttackRow(TypedDict, total=False):
    """One judged response of an attack (``section == "attack"``).

    ``success`` is the judge's harmful verdict; ``outcome`` one of ``complied``, ``refused``,
    ``fired``, ``other``. A multi-turn prompt is its last user turn plus the whole
    ``conversation``. The metadata keys of :data:`META_KEYS` are copied when the run has them.
    """

    section: str
    attack: str
    mode: str
    prompt: str
    conversation: list[dict[str, str]]
    prefill: str
    response: str
    topic: str
    category: str
    split: str
    template: str
    target: str
    initial_loss: float
    final_loss: float
    steps_used: int
    target_hit: bool
    request: str
    source: str
    first_turn: str
    success: bool
    harmful: bool
    refusal: bool | None
    degenerate: bool | None
    outcome: str
    reason: str
    perplexity: float | None


class FinetuneRow(AttackRow, total=False):
    """One judged response of the fine-tuning attack (``section == "finetune"``) at one step."""

    lr: float
    step: int


def verdict_fields(verdict: Verdict) -> dict[str, Any]:
    """The judge's verdict as row fields (``success`` = harmful)."""
    return {
        "success": bool(verdict.harmful),
        "harmful": bool(verdict.harmful),
        "refusal": None if verdict.refusal is None else bool(verdict.refusal),
        "degenerate": None if verdict.degenerate is None else bool(verdict.degenerate),
        "outcome": verdict.outcome,
        "reason": verdict.reason,
        "perplexity": verdict.details.get("perplexity"),
    }


def attack_rows(
    run: AttackRun, verdicts: Sequence[Verdict], section: str = "attack"
) -> list[AttackRow]:
    """Report rows of one judged attack run.

    A multi-turn prompt (a conversation) is stored as its last user turn (``prompt``) plus the
    whole ``conversation``.
    """
    rows: list[AttackRow] = []
    for prompt, prefill, response, meta, verdict in zip(
        run.prompts, run.prefills, run.responses, run.metas, verdicts, strict=True
    ):
        turns: dict[str, Any] = {}
        if not isinstance(prompt, str):
            turns = {"conversation": [dict(m) for m in prompt]}
            prompt = str(prompt[-1]["content"])
        row = {
            "section": section,
            "attack": run.attack,
            "mode": run.mode,
            "prompt": prompt,
            **turns,
            "prefill": prefill,
            "response": response,
            **{k: meta[k] for k in META_KEYS if k in meta},
            **verdict_fields(verdict),
        }
        rows.append(row)  # type: ignore[arg-type]
    return rows
