"""The report's rows, one typed dict per section (``row["section"]`` says which).

Rows stay plain dicts (``report.json`` holds them as they are); these types name their keys:

* ``"attack"``: :class:`~cbscope.attacks.rows.AttackRow`, one judged attack response;
* ``"finetune"``: :class:`~cbscope.attacks.rows.FinetuneRow`, the same at one fine-tuning step;
* ``"capability"``: :class:`CapabilityRow`, one exact-match task of the organism;
* ``"over_refusal"``: :class:`OverRefusalRow`, one benign look-alike;
* ``"retain"``: :class:`RetainRow`, KL and log-likelihood sums on one benign text;
* ``"firing"``: :class:`FiringRow`, whether the breaker's cosine trace fired on one example.
"""

from __future__ import annotations

from typing import TypedDict

from cbscope.attacks.rows import AttackRow, FinetuneRow

__all__ = [
    "AttackRow",
    "CapabilityRow",
    "FinetuneRow",
    "FiringRow",
    "OverRefusalRow",
    "RetainRow",
    "Row",
]


class CapabilityRow(TypedDict):
    """One capability problem (``section == "capability"``); ``success``: exact answer."""

    section: str
    metric: str
    mode: str
    prompt: str
    response: str
    expected: str
    topic: str
    success: bool


class OverRefusalRow(TypedDict, total=False):
    """One benign request (``section == "over_refusal"``); ``success``: refused or fired."""

    section: str
    metric: str
    mode: str
    prompt: str
    response: str
    expected: str
    topic: str
    refusal: bool
    degenerate: bool
    exact: bool
    success: bool
    perplexity: float | None
    off_topic_words: int
    reason: str


class RetainRow(TypedDict):
    """Sums over one benign response's tokens (``section == "retain"``)."""

    section: str
    metric: str
    prompt: str
    response: str
    n_tokens: int
    kl_sum: float
    nll_base_sum: float
    nll_cb_sum: float


class FiringRow(TypedDict):
    """One example's cosine trace (``section == "firing"``; ``set``: harmful or benign)."""

    section: str
    set: str
    prompt: str
    response: str
    split: str | None
    category: str | None
    fired: bool
    pos_after_start: int | None
    layer: int | None
    min_cos: float | None


Row = AttackRow | FinetuneRow | CapabilityRow | OverRefusalRow | RetainRow | FiringRow
