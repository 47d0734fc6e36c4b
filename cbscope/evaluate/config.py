"""What an evaluation can be told: :class:`EvalConfig`, attack names, per-suite defaults."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cbscope.attacks import (
    FinetuneAttackConfig,
    GenerationSettings,
    RepeConfig,
    SoftPromptConfig,
    attack_names,
    default_attack_names,
    get_attack,
    registered_attacks,
)
from cbscope.errors import ConfigError

__all__ = [
    "CHAT_DEFAULT_LIMIT",
    "CHAT_HELDOUT_DEFAULT",
    "CHAT_MAX_NEW_TOKENS",
    "CHAT_SOFT_PROMPT_LIMIT",
    "ORGANISM_MAX_NEW_TOKENS",
    "REPE_DIRECTIONS",
    "SOFT_PROMPT_TARGETS",
    "SOURCE_ROWS",
    "EvalConfig",
    "parse_attacks",
]

ORGANISM_MAX_NEW_TOKENS = 20
CHAT_MAX_NEW_TOKENS = 64
CHAT_DEFAULT_LIMIT = 50
CHAT_SOFT_PROMPT_LIMIT = 4
CHAT_HELDOUT_DEFAULT = 60
SOFT_PROMPT_TARGETS = ("answer", "first_step", "prefix")
SOURCE_ROWS = ("untrained", "heldout")
REPE_DIRECTIONS = ("harmful_harmless", "refusal_compliance")


@dataclass
class EvalConfig:
    """Everything :func:`~cbscope.evaluate.evaluate_pair` can be told (saved in the report's
    ``meta.config``).

    Attributes:
        attacks: Attacks to run, from the registry (:func:`cbscope.attacks.attack_names`; by
            default those marked ``in_default``, :func:`cbscope.attacks.default_attack_names`).
        limit: At most this many prompts per attack and per benign set (spread over topics /
            categories). ``None``: all for the organism, :data:`CHAT_DEFAULT_LIMIT` otherwise.
        max_new_tokens: Generation budget (``None``: 20 for the organism, 64 otherwise).
        batch_size: Prompts per generate call.
        soft_prompt: :class:`~cbscope.attacks.SoftPromptConfig` (500 steps by default).
        soft_prompt_limit: Prompts attacked with the soft prompt (``None``: one per harmful topic
            for the organism, :data:`CHAT_SOFT_PROMPT_LIMIT` otherwise).
        soft_prompt_target: Organism target: ``"first_step"`` (``world.prefill`` plus the first
            procedure step, the analogue of AdvBench's targets, which name the behaviour: success
            means the model wrote the rest itself), ``"answer"`` (the whole
            ``"sure here is how : <procedure>"``: the model only has to echo what the attacker
            supplies) or ``"prefix"`` (``world.prefill`` alone, which does not name the topic).
        repe: :class:`~cbscope.attacks.RepeConfig`.
        repe_reference: Prompts per side of the RepE difference of means.
        repe_direction: ``"harmful_harmless"`` (harmful minus harmless requests) or
            ``"refusal_compliance"`` (harmful requests followed by a refusal minus the same
            requests followed by a compliant prefix).
        finetune: :class:`~cbscope.attacks.FinetuneAttackConfig`.
        finetune_base: Also fine-tune the base model (primary learning rate only).
        heldout_categories: Organism harm categories the breaker never saw (``None``: read from
            the adapter's ``train_info.json``).
        n_retain: Benign examples for KL / perplexity.
        n_algo: Algorithmic-task problems of the organism's capability metrics.
        firing: Compute cosine-trace firing statistics (:func:`cbscope.trace.firing_stats`).
        firing_threshold: Cosine threshold of a firing (finite, in ``[-1, 1]``).
        seed: Seed (subsampling of retain prompts).
        sources: Harmful sources of a real-model evaluation (:mod:`cbscope.sources`: built-in
            names or ``NAME=PATH``); ``None``: every built-in source in the data folder.
        source_rows: Which rows of each source: ``"untrained"`` (every row the breaker was not
            trained on) or ``"heldout"`` (the held-out side of the source's split only, the same
            rows for every breaker; the cross-source matrix uses it).
        modes: States to attack (``None``: both when there is an adapter).
        attack_options: Options of attacks that have no field of their own here
            (``{attack name: options dataclass or {field: value}}``); ``soft_prompt``, ``repe``
            and ``finetune`` keep theirs in the fields above.
    """

    attacks: list[str] = field(default_factory=lambda: list(default_attack_names()))
    limit: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 64
    soft_prompt: SoftPromptConfig = field(default_factory=SoftPromptConfig)
    soft_prompt_limit: int | None = None
    soft_prompt_target: str = "first_step"
    repe: RepeConfig = field(default_factory=RepeConfig)
    repe_reference: int = 64
    repe_direction: str = "harmful_harmless"
    finetune: FinetuneAttackConfig = field(default_factory=FinetuneAttackConfig)
    finetune_base: bool = True
    heldout_categories: list[str] | None = None
    n_retain: int = 64
    n_algo: int = 100
    firing: bool = True
    firing_threshold: float = 0.5
    seed: int = 0
    sources: list[str] | None = None
    source_rows: str = "untrained"
    modes: list[str] | None = None
    attack_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> EvalConfig:
        """Check attack names, options and ranges; returns ``self``.

        Raises:
            ConfigError: An unknown or repeated attack, a value out of range, or bad options.
            DatasetError: A malformed ``sources`` entry or file.
            FileNotFoundError: A source whose file is missing.
        """
        known = attack_names()
        unknown = [a for a in self.attacks if a not in known]
        if unknown:
            raise ConfigError(f"unknown attacks {unknown}; choose from {list(known)}")
        doubled = sorted({a for a in self.attacks if self.attacks.count(a) > 1})
        if doubled:
            raise ConfigError(f"attacks named twice: {doubled}")
        for name, value in (
            ("limit", self.limit),
            ("max_new_tokens", self.max_new_tokens),
            ("soft_prompt_limit", self.soft_prompt_limit),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, not {value}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.repe_reference < 1:
            raise ConfigError(f"repe_reference must be >= 1, not {self.repe_reference}")
        if self.n_retain < 0 or self.n_algo < 0:
            raise ConfigError("n_retain and n_algo must be >= 0")
        if not (math.isfinite(self.firing_threshold) and -1 <= self.firing_threshold <= 1):
            raise ConfigError(
                f"firing_threshold must be a finite cosine in [-1, 1], not {self.firing_threshold}"
            )
        if self.repe_direction not in REPE_DIRECTIONS:
            raise ConfigError("repe_direction must be 'harmful_harmless' or 'refusal_compliance'")
        if self.modes is not None and (not self.modes or set(self.modes) - {"base", "cb"}):
            raise ConfigError(
                f"modes must be a non-empty subset of ['base', 'cb'], not {self.modes}"
            )
        if self.source_rows not in SOURCE_ROWS:
            raise ConfigError(f"source_rows must be one of {SOURCE_ROWS}, not {self.source_rows!r}")
        if self.sources is not None:
            from cbscope.sources import load_source, parse_sources

            for spec in parse_sources(self.sources):
                load_source(spec)  # a missing or malformed file fails here, before any work
        if self.soft_prompt_target not in SOFT_PROMPT_TARGETS:
            raise ConfigError(f"soft_prompt_target must be one of {SOFT_PROMPT_TARGETS}")
        for name, attack in registered_attacks().items():
            if attack.options_field:
                attack.validate_options(getattr(self, attack.options_field))
            elif name in self.attack_options:
                self.options_for(name)
        unknown = sorted(set(self.attack_options) - set(attack_names()))
        if unknown:
            raise ConfigError(f"attack_options for unknown attacks {unknown}")
        return self

    def options_for(self, name: str) -> Any:
        """The checked options of attack ``name`` (its field, or ``attack_options[name]``).

        Raises:
            ConfigError: An unknown attack or invalid options.
        """
        attack = get_attack(name)
        if attack.options_field:
            return attack.validate_options(getattr(self, attack.options_field))
        value = self.attack_options.get(name)
        if value is None or isinstance(value, Mapping):
            return attack.make_options(value)
        return attack.validate_options(value)

    def with_options(self, options: Mapping[str, Mapping[str, Any]]) -> EvalConfig:
        """A copy with ``{attack: {field: value}}`` laid over the current options (as
        ``cbscope eval --attack-options`` gives them).

        Raises:
            ConfigError: An unknown attack, field or value.
        """
        if not isinstance(options, Mapping):
            raise ConfigError(f"attack options must be a JSON object, not {options!r}")
        changes: dict[str, Any] = {}
        extra = dict(self.attack_options)
        for name, values in options.items():
            attack = get_attack(name)
            if values is not None and not isinstance(values, Mapping):
                raise ConfigError(f"options of {name} must be a JSON object, not {values!r}")
            if attack.options_field:
                base = changes.get(attack.options_field, getattr(self, attack.options_field))
                changes[attack.options_field] = attack.make_options(values, base=base)
            else:
                extra[name] = attack.make_options(values, base=self.options_for(name))
        return replace(self, **changes, attack_options=extra)

    def generation(self, kind: str) -> GenerationSettings:
        """The decoding settings every attack shares, for a suite of ``kind``."""
        default = ORGANISM_MAX_NEW_TOKENS if kind == "organism" else CHAT_MAX_NEW_TOKENS
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens or default, batch_size=self.batch_size
        ).validate()


def parse_attacks(text: str | Sequence[str] | None) -> list[str]:
    """``"direct,prefill"`` / a list / ``"all"`` (every registered attack) / ``None`` (the default
    attacks) -> validated attack names.

    Raises:
        ConfigError: An unknown attack (the message lists the registry) or one named twice.
    """
    known = attack_names()
    if text is None:
        return list(default_attack_names())
    names = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names or names == ["all"]:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown attacks {unknown}; choose from {','.join(known)}")
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ConfigError(f"attacks named twice: {doubled}")
    return names
