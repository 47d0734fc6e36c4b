"""The attack protocol: what every attack declares and how the evaluation runs it.

An attack is a subclass of :class:`Attack` registered with
:func:`~cbscope.attacks.registry.register_attack` in the module that defines it. It declares

* ``name``: what ``cbscope eval --attacks`` calls it;
* ``Options``: a dataclass of its options (:class:`~cbscope.attacks.options.NoOptions` when it
  has none); ``cbscope eval --help`` lists its fields and ``--attack-options`` sets them;
* ``order``: where it goes in the default attack list and the report.

and implements one of two shapes:

* **per mode** (most attacks): :meth:`Attack.run` attacks one state of the pair (``"base"``:
  adapters off, ``"cb"``: adapters on) and returns an :class:`~cbscope.attacks.base.AttackRun`;
  the evaluation judges it with the suite's judge (:meth:`Attack.judge_rows`) and keeps
  :meth:`Attack.run_meta` in the report's ``meta``;
* **across modes** (``spans_modes = True``, e.g. fine-tuning, which copies the model once per
  learning rate and mode): :meth:`Attack.evaluate` returns every row itself (an
  :class:`AttackOutcome`).

Every attack gets the same :class:`GenerationSettings` (the evaluation's decoding budget) in its
:class:`AttackContext`, together with the pair and the :class:`~cbscope.attacks.suite.EvalSuite`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from cbscope.attacks.base import AttackRun
from cbscope.attacks.options import NoOptions, check_finite, describe_options, options_from_dict
from cbscope.attacks.rows import AttackRow, attack_rows, checkpoint_rows
from cbscope.attacks.suite import EvalSuite
from cbscope.errors import ConfigError
from cbscope.judges import run_judge

if TYPE_CHECKING:
    from cbscope.pair import ModelPair

__all__ = ["SAMPLING", "Attack", "AttackContext", "AttackOutcome", "GenerationSettings"]

#: Decoding strategies of :class:`GenerationSettings`.
SAMPLING: tuple[str, ...] = ("greedy", "sample")


@dataclass(frozen=True)
class GenerationSettings:
    """How every attack of an evaluation decodes its answers.

    Attributes:
        max_new_tokens: Tokens generated per answer (after any prefill).
        batch_size: Prompts per generate call.
        sampling: ``"greedy"`` (the default: one deterministic answer per prompt) or
            ``"sample"`` (for attacks with ``supports_sampling``: ``best_of_n`` answers at
            ``temperature``).
        temperature: Sampling temperature (``sampling="sample"`` only).
        best_of_n: Sampled answers per prompt; an attack succeeds if any is harmful.
        seed: Seed of the sampling.
    """

    max_new_tokens: int = 32
    batch_size: int = 32
    sampling: str = "greedy"
    temperature: float = 1.0
    best_of_n: int = 1
    seed: int = 0

    def validate(self) -> GenerationSettings:
        """Check value ranges; returns ``self``.

        Raises:
            ConfigError: A non-positive budget or batch, an unknown sampling, a temperature
                that is not a finite positive number, or ``best_of_n > 1`` with greedy decoding.
        """
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.sampling not in SAMPLING:
            raise ConfigError(f"sampling must be one of {SAMPLING}, not {self.sampling!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be a finite number > 0, not {self.temperature}")
        if self.best_of_n < 1:
            raise ConfigError(f"best_of_n must be >= 1, not {self.best_of_n}")
        if self.sampling == "greedy" and self.best_of_n > 1:
            raise ConfigError(
                "best_of_n > 1 needs sampling='sample' (greedy answers are all equal)"
            )
        return self

    @property
    def greedy(self) -> bool:
        """Whether answers are decoded greedily."""
        return self.sampling == "greedy"


@dataclass
class AttackContext:
    """Everything an attack runs on.

    Attributes:
        pair: The model pair (``base``: adapters off, ``cb``: adapters on).
        suite: The evaluation's prompts and judge.
        modes: The states attacked, ``["base", "cb"]`` or a subset.
        generation: The shared decoding settings.
        config: The evaluation's :class:`~cbscope.evaluate.EvalConfig` (for evaluation-wide
            choices such as ``finetune_base``).
        show_progress: Show progress bars of long attacks.
    """

    pair: ModelPair
    suite: EvalSuite
    modes: list[str]
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    config: Any = None
    show_progress: bool = False


@dataclass
class AttackOutcome:
    """What an attack that spans modes returns: its report rows and report ``meta`` entries."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


class Attack:
    """Base class of every attack (see the module docstring).

    Attributes:
        name: The attack's name in ``--attacks`` and the report.
        Options: Dataclass of its options.
        options_field: The :class:`~cbscope.evaluate.EvalConfig` attribute that holds its options
            (``soft_prompt``, ``repe``, ``finetune``); ``None``: ``EvalConfig.attack_options``.
        order: Position in the default attack list (lower first).
        description: One line for ``cbscope eval --help``.
        spans_modes: Runs once over every mode (:meth:`evaluate`) instead of once per mode.
        supports_sampling: Decodes with ``GenerationSettings.sampling="sample"``.
        meta_key: Key of :meth:`run_meta` in the report's ``meta`` (default: no entry).
        generation_fields: Option fields the evaluation sets from its
            :class:`GenerationSettings` (e.g. ``max_new_tokens``); they cannot be set as options.
        in_default: Part of the default attack list (:class:`~cbscope.evaluate.EvalConfig`'s
            ``attacks``); the strong, slow attacks are run when named (or with ``all``).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    options_field: ClassVar[str | None] = None
    order: ClassVar[int] = 1000
    description: ClassVar[str] = ""
    spans_modes: ClassVar[bool] = False
    supports_sampling: ClassVar[bool] = False
    meta_key: ClassVar[str | None] = None
    generation_fields: ClassVar[tuple[str, ...]] = ()
    in_default: ClassVar[bool] = True

    def make_options(self, values: Mapping[str, Any] | None = None, *, base: Any = None) -> Any:
        """Options from JSON-like ``values`` laid over ``base`` (default: the defaults), checked.

        Raises:
            ConfigError: An unknown field, a wrong type, a non-finite number, a value its
                ``validate`` refuses, or a field the generation settings own.
        """
        values = dict(values or {})
        own = [
            f.name for f in dataclasses.fields(self.Options) if f.name not in self.generation_fields
        ]
        unknown = sorted(set(values) - set(own) - set(self.generation_fields))
        if unknown:
            raise ConfigError(
                f"unknown options {unknown} for {self.name}; its options: {', '.join(own) or 'none'}"
            )
        shared = sorted(set(values) & set(self.generation_fields))
        if shared:
            raise ConfigError(
                f"{self.name} options {shared} are set by the evaluation's generation settings "
                "(--max-new-tokens, --batch-size), not per attack"
            )
        given = options_from_dict(self.Options, values, owner=self.name)
        start = base if base is not None else self.Options()
        merged = dataclasses.replace(start, **{k: getattr(given, k) for k in values})
        return self.validate_options(merged)

    def validate_options(self, options: Any) -> Any:
        """Check an options object (type, finite numbers, its own ``validate``); returns it.

        Raises:
            ConfigError: Options of another type or with invalid values.
        """
        if not isinstance(options, self.Options):
            raise ConfigError(
                f"options of attack {self.name!r} must be {self.Options.__name__}, "
                f"not {type(options).__name__}"
            )
        check_finite(options, owner=self.name)
        validate = getattr(options, "validate", None)
        if callable(validate):
            validate()
        return options

    def check(self, ctx: AttackContext, options: Any) -> None:
        """Refuse settings this attack cannot honour, before anything runs.

        Raises:
            ConfigError: Sampled decoding for an attack that decodes greedily only.
        """
        if not ctx.generation.greedy and not self.supports_sampling:
            raise ConfigError(f"attack {self.name!r} decodes greedily only")

    def run(self, ctx: AttackContext, mode: str, options: Any) -> AttackRun:
        """Attack ``ctx.pair`` in ``mode`` (per-mode attacks)."""
        raise NotImplementedError(f"attack {self.name!r} does not run per mode")

    def judge_rows(self, run: AttackRun, judge: Any) -> list[AttackRow]:
        """Judge a run and turn it into report rows: one row per response, or, for a run with
        checkpoints, one row per prompt with every sample judged
        (:func:`~cbscope.attacks.rows.checkpoint_rows`)."""
        if run.checkpoints:
            return checkpoint_rows(run, judge)
        verdicts = run_judge(judge, run.prompts, run.responses, run.judge_metas())
        return attack_rows(run, verdicts)

    def run_meta(self, run: AttackRun) -> dict[str, Any] | None:
        """What the report keeps of a run besides its rows, under ``meta[meta_key][mode]``."""
        return None

    def evaluate(self, ctx: AttackContext, options: Any) -> AttackOutcome:
        """Attack every mode of ``ctx.modes`` and return the judged rows (``spans_modes``)."""
        raise NotImplementedError(f"attack {self.name!r} runs per mode")

    def describe(self) -> list[str]:
        """Lines for ``--help``: the description, then one line per option."""
        head = f"{self.name}: {self.description}".rstrip(": ")
        fields = [
            line
            for line in describe_options(self.Options)
            if line.split(" ", 1)[0] not in self.generation_fields
        ]
        return [head, *(f"  {line}" for line in fields)] if fields else [f"{head}; no options"]
