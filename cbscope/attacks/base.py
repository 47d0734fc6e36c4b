"""What every attack shares: the two model states, and the record of one attack run.

Every attack runs against one *mode* of a :class:`~cbscope.pair.ModelPair`:

* ``"base"``: adapters off (the original model), inside ``pair.original()``;
* ``"cb"``: adapters on (the circuit-broken model).

An attack returns an :class:`AttackRun`: the prompts it sent (after any wrapping), the prefills,
the greedy responses and per-example metadata, ready for a judge. An optimising attack also keeps
its solutions along the way (:class:`Checkpoint`: the budget spent, the loss, one or more sampled
answers), from which the report draws its ASR-vs-budget curve.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from cbscope.data import Conversation
    from cbscope.pair import ModelPair

Mode = Literal["base", "cb"]
MODES: tuple[Mode, ...] = ("base", "cb")


def check_mode(mode: str) -> Mode:
    """Validate a mode string."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'base' (adapters off) or 'cb' (adapters on), not {mode!r}")
    return mode  # type: ignore[return-value]


@contextlib.contextmanager
def model_mode(pair: ModelPair, mode: str) -> Iterator[ModelPair]:
    """Run with the adapters off (``"base"``) or as they are, on (``"cb"``).

    Raises:
        ValueError: For ``"cb"`` on a pair without an adapter.
    """
    check_mode(mode)
    if mode == "base":
        with pair.original():
            yield pair
        return
    if not pair.has_adapter:
        raise ValueError("mode 'cb' needs a pair with a circuit-breaker adapter")
    yield pair


@dataclass
class Checkpoint:
    """One kept solution of an optimising attack, for one prompt.

    Attributes:
        budget: What the attack had spent when it kept this solution (steps).
        responses: The answers decoded from it (``best_of_n`` samples, or one greedy answer);
            each is judged on its own.
        loss: The attack's loss at this solution (``None`` when it has none).
        extra: Numbers measured at this solution (e.g. the target-layer cosine).
    """

    budget: int
    responses: list[str]
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackRun:
    """The outcome of one attack in one mode, before judging.

    Attributes:
        attack: Attack name (``"direct"``, ``"prefill"`` ...).
        mode: ``"base"`` or ``"cb"``.
        prompts: The user messages actually sent (after template wrapping); role/content
            conversations for multi-turn attacks.
        responses: Greedy responses (the prefill, if any, not repeated).
        prefills: Assistant prefills (empty strings when none).
        metas: Per-example metadata (topic, category, the original request ...).
        extra: Attack-specific results (soft-prompt losses, the RepE direction norms ...).
        checkpoints: Optimising attacks: per prompt, the solutions kept along the way in budget
            order (empty: one judged response per prompt). Judged by
            :func:`~cbscope.attacks.rows.checkpoint_rows`: success at a budget means some sample
            of some solution kept by then is harmful.
        budget_unit: What a checkpoint's ``budget`` counts (``"steps"``).
    """

    attack: str
    mode: str
    prompts: list[str | Conversation]
    responses: list[str]
    prefills: list[str] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[list[Checkpoint]] = field(default_factory=list)
    budget_unit: str = "steps"

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if self.checkpoints and len(self.checkpoints) != n:
            raise ValueError(
                f"attack run {self.attack!r}: {n} prompts but {len(self.checkpoints)} checkpoint lists"
            )
        if any(not kept for kept in self.checkpoints):
            raise ValueError(f"attack run {self.attack!r}: a prompt has no checkpoint")
        if not self.prefills:
            self.prefills = [""] * n
        if not self.metas:
            self.metas = [{} for _ in range(n)]
        lengths = {len(self.responses), len(self.prefills), len(self.metas)}
        if lengths != {n}:
            raise ValueError(
                f"attack run {self.attack!r}: {n} prompts, {len(self.responses)} responses, "
                f"{len(self.prefills)} prefills, {len(self.metas)} metas"
            )

    def judge_metas(self) -> list[dict[str, Any]]:
        """Metas with the prefill added, as judges expect."""
        return [
            {**meta, "prefill": prefill}
            for meta, prefill in zip(self.metas, self.prefills, strict=True)
        ]


def as_list(values: Sequence[Any] | None, n: int, default: Any) -> list[Any]:
    """``values`` as a list of length ``n`` (``default`` repeated when ``None``)."""
    if values is None:
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"expected {n} values, got {len(values)}")
    return values


def copy_metas(metas: Sequence[dict[str, Any] | None] | None, n: int) -> list[dict[str, Any]]:
    """Per-example metadata dicts (copied; empty dicts when ``None``)."""
    return [dict(meta or {}) for meta in as_list(metas, n, None)]
