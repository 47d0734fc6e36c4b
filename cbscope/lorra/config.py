"""``LorraConfig``: every knob of a circuit-breaker (LoRRA) run, saved as ``lorra_config.json``.

Defaults follow the paper and the official Llama-3 recipe (``lorra_circuit_breaker.py`` +
``scripts/lorra_circuit_breaker_llama3_8b.sh``) where noted; where cbscope's default differs from
the official code the field says so and why. ``recipe="official"`` follows the official code in
every such place (:mod:`cbscope.lorra.official`); ``docs/recipe.md`` lists them all.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cbscope.errors import ConfigError, MissingFileError
from cbscope.io import atomic_write_json
from cbscope.layers import LayerError, default_target_layers, validate_layers
from cbscope.lorra.durability import DURABILITY
from cbscope.lorra.losses import LOSSES
from cbscope.models import DTYPES

CONFIG_FILE = "lorra_config.json"
TOKEN_MASKS = ("full", "response", "request", "content")
RECIPES = ("cbscope", "official")
RETAIN_SOURCES = ("benign", "refusal", "lookalike")
CACHE_STORES = ("memory", "disk")
CACHE_FILLS = ("upfront", "lazy")
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (``int``, ``float``, ``bool``, ``str``, ``Path``,
    ``None``, ``Any``, ``list[X]``, ``dict[K, V]`` and unions of them). A float field takes an int,
    never a bool; an int field never takes a bool."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            _fits(k, key) and _fits(v, item) for k, v in value.items()
        )
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _non_finite(value: Any) -> bool:
    """Whether a number anywhere in ``value`` (lists and dicts included) is NaN or infinite."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def check_field_types(obj: Any, *, skip: tuple[str, ...] = ()) -> None:
    """Check every field of the dataclass ``obj`` (but ``skip``) against its annotation, and that
    no number in it is NaN or infinite.

    Raises:
        ConfigError: Naming the field, its value and the expected type.
    """
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        hint = hints.get(f.name, Any)
        if not _fits(value, hint):
            raise ConfigError(
                f"{f.name} must be {_type_name(hint)}, not {value!r} ({type(value).__name__})"
            )
        if _non_finite(value):
            if isinstance(value, float):
                raise ConfigError(f"{f.name} must be a finite number, not {value!r}")
            raise ConfigError(f"every number in {f.name} must be finite, not {value!r}")


@dataclass
class LorraConfig:
    """Configuration of a LoRRA (Representation Rerouting) run.

    Attributes:
        target_layers: Paper-convention layers whose representations are rerouted (layer ``l`` =
            ``blocks.{l-1}.hook_resid_post``). ``None``: the paper's 10,20 of 32, scaled to the
            model (:func:`cbscope.layers.default_target_layers`).
        lora_layers: Decoder *block* indices that get LoRA (peft ``layers_to_transform``).
            ``None``: blocks ``0 .. max(target_layers) - 1``, every block below the highest target
            layer. The official code also adapts block ``max(target)``: it cannot change a target
            representation, but it does change the official retain term's final-norm state, so
            ``recipe="official"`` adapts blocks ``0 .. max(target)``.
        lora_r: LoRA rank (16).
        lora_alpha: LoRA alpha (16).
        lora_dropout: LoRA dropout (0.05).
        lora_target_modules: Linear modules that get LoRA (attention and MLP projections).
        lora_b_init_std: Std of the normal init of LoRA ``B`` (cbscope's default, not the
            official code's). peft zero-initialises ``B`` (official), so the adapted model starts
            *equal* to the frozen one: the cosine is at its maximum and the whole gradient is
            zero in exact arithmetic; what is left is float rounding (``docs/recipe.md`` gives
            the measured sizes), which in bf16, the official setting, is large enough for the
            run to escape, late. A small random ``B`` (1e-3) breaks the tie; ``0`` keeps peft's
            init. Small models need more: the retain loss's gradient has a constant size near
            zero while the cosine's vanishes, so with 1e-3 the retain term pins the adapter at
            zero (the presets use 1e-2 / 3e-2).
        lorra_alpha: ``alpha`` of the schedule ``c_s = alpha (1 - t/2T)``, ``c_r = alpha t/2T``
            (paper: 10 for Llama-3, 5 for Mistral). The official code divides ``t`` by a fixed
            300 instead of ``2T`` (the same only at ``T = 150``); cbscope scales it to the run so
            that every run ends at ``c_s = c_r`` (``recipe="official"``: the 300).
        retain_weight: Extra factor on ``c_r`` (1 in the official code). The L2 retain term is in
            the units of the residual stream: a model with small representation norms (the
            organism) needs a larger factor to keep retain examples as firmly as a 7B model does.
        retain_relative: Divide each token's retain distance by the frozen representation's
            norm (scale-free; not in the official code). Use it for models with large residual
            norms or attention-sink tokens (SmolLM2).
        lr: AdamW learning rate (1e-4), constant as in the official recipe.
        weight_decay: AdamW weight decay (0).
        max_grad_norm: Gradient clipping norm (1.0, the HF Trainer default the official code runs
            with); ``0`` disables.
        steps: Optimiser steps ``T`` (150, the official Llama-3 recipe).
        batch_size: Circuit-breaker examples per step; the step also takes as many retain
            examples (16 in the official recipe).
        max_length: Token limit of retain examples (1024).
        cb_max_length: Token limit of circuit-breaker examples (``None``: ``max_length``).
        token_mask: Tokens of the circuit-breaker examples the loss covers: ``"full"`` (request and
            response, official), ``"response"``, ``"request"`` or ``"content"`` (the last user
            message's text and the response: not the chat template's shared prefix, such as a
            default system prompt every example starts with).
        retain_token_mask: The same for retain examples (``"full"``, official); a dict gives a
            mask per retain source (``{"refusal": "response"}``; unnamed sources use ``"full"``).
        response_only_fraction: Fraction of circuit-breaker examples whose request is dropped
            (an empty user turn), so the breaker also fires on a harmful response with no
            harmful request (the official Llama-3 data does this for half of them). cbscope
            draws the flag anew each time an example is used; ``recipe="official"`` draws it
            once per example, as the official dataset does.
        retain_response_only_fraction: The same for chat retain examples (the official
            Llama-3 data drops the request of half of its retain examples too; cbscope's
            default keeps every request, 0).
        retain_mixture: Sampling weights of the retain sources ``benign`` (ordinary chat),
            ``refusal`` (harmful requests answered with refusals) and ``lookalike`` (benign
            requests that sound harmful); sources without data are skipped.
        retain_layers: ``"all"``: the retain loss covers paper layers ``1 .. max(target)``;
            ``"target"``: only the target layers. Neither is the official code's: it also counts
            the embedding output and the final-norm state of layer ``max(target) + 1``, and
            divides by every position, padding included (``recipe="official"``).
        loss: ``"rr"`` (Representation Rerouting), ``"rmu"``, ``"random_norm"``,
            ``"refusal_direction"`` or ``"repbend"`` (RepBend; see :mod:`cbscope.lorra.losses`).
        repbend_unsafe: RepBend's weight (beta) on the L2 push of the circuit-breaker
            representations away from the frozen ones (subtracted from the loss).
        repbend_cohesion: RepBend's weight (gamma) on the cohesion term: ``1 - cos`` between
            the adapted representations of different circuit-breaker examples at their last
            request token.
        repbend_kl: RepBend's weight (epsilon) on the KL divergence of the retain rows' next-token
            distributions (temperature 2) from the frozen model's.
        repbend_pull: RepBend's weight (eta) on the pull of a harmful request's adapted states
            toward the frozen states of the same request answered with its refusal (from the
            ``refusal`` retain source), over ``repbend_pull_tokens`` positions from the last
            request token.
        repbend_pull_tokens: Positions the pull term covers.
        durability: ``"none"``, ``"tar"`` (simulate harmful fine-tuning inside each step and
            penalise the circuit-breaker cosine it recovers) or ``"repnoise"`` (pull the
            circuit-breaker representations toward Gaussian noise); see
            :mod:`cbscope.lorra.durability`.
        durability_weight: Weight of the durability term.
        durability_steps: Simulated fine-tuning steps per training step (``tar``).
        durability_lr: Size of each simulated step (``tar``: ``lr * sign(gradient)``).
        recipe: ``"cbscope"`` (default) or ``"official"``: follow the official code in every
            place that changes the numbers (:mod:`cbscope.lorra.official`: the retain term over
            every hidden state of the truncated model with denominators that count padding, the
            schedule divisor 300, LoRA on block ``max(target)``, fixed-length left padding,
            per-example request dropping). Needs ``token_mask`` and ``retain_token_mask`` "full",
            ``steps < 300``, ``loss="rr"``, one process.
        rmu_scale: ``c`` of the ``rmu`` loss; ``None``: per layer, the frozen model's mean token
            norm on the circuit-breaker set.
        val_size: Held-out circuit-breaker examples for ``val_cos`` (taken from the end of the
            circuit-breaker set when no validation set is given; ``0`` disables).
        seed: Seed of the LoRA init, the data order and dropout.
        log_every: Write a ``metrics.jsonl`` line (and compute ``val_cos``) every N steps.
        checkpoint_every: Write a resumable checkpoint every K steps (``0``: never).
        keep_checkpoints: Keep the checkpoints folder after a successful run.
        dtype: Model dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``, or ``"auto"``
            (the dtype the checkpoint was saved in, e.g. bf16 for most 7-8B models). The LoRA
            weights, AdamW state and representations take the same dtype; the losses and
            cosines are computed in float32 (see :mod:`cbscope.lorra.losses`).
        gradient_checkpointing: Recompute each decoder block's activations in the backward pass
            instead of storing them (transformers' non-reentrant checkpointing on the bridged
            copy of the model): much less activation memory for about one extra forward of
            compute; the gradients are the same up to float error. Does not change the math, so
            a checkpoint made with it off can be resumed with it on.
        cache_frozen: Compute the frozen model's representations of each example once (the
            target layers of circuit-breaker examples, the retain layers of retain examples, in
            the model dtype) and reuse them at every step, instead of a frozen forward per step
            (cbscope.lorra.frozen). On when the cache fits cache_budget_gb, else off with one
            log line saying what it would need. The cached values come from a forward of each
            example at its own length, which differs from the batched one in the last float
            bits; a step's losses and gradients agree within float tolerance, but a long run
            amplifies the difference (docs/training.md), so the shipped organism breaker is
            reproduced with it off.
        cache_budget_gb: The largest frozen-representation cache a run may build, in GiB (the
            run's own entries, plus what a shared cache already holds).
        cache_store: Where the cache lives: "memory" (on the training device, for this
            process) or "disk" (safetensors files under cache_dir()/frozen/, memory-mapped;
            reused by a resumed run and by later runs on the same model).
        cache_fill: "upfront" (every example of the run before the first step, with a progress
            bar) or "lazy" (each example at the first step that uses it).
    """

    target_layers: list[int] | None = None
    lora_layers: list[int] | None = None
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    lora_b_init_std: float = 1e-3
    lorra_alpha: float = 10.0
    retain_weight: float = 1.0
    retain_relative: bool = False
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    steps: int = 150
    batch_size: int = 16
    max_length: int = 1024
    cb_max_length: int | None = None
    token_mask: str = "full"
    retain_token_mask: str | dict[str, str] = "full"
    response_only_fraction: float = 0.5
    retain_mixture: dict[str, float] = field(
        default_factory=lambda: {"benign": 1.0, "refusal": 1.0, "lookalike": 1.0}
    )
    retain_response_only_fraction: float = 0.0
    retain_layers: str = "all"
    loss: str = "rr"
    rmu_scale: float | None = None
    repbend_unsafe: float = 0.1
    repbend_cohesion: float = 0.5
    repbend_kl: float = 1.0
    repbend_pull: float = 0.5
    repbend_pull_tokens: int = 8
    durability: str = "none"
    durability_weight: float = 1.0
    durability_steps: int = 2
    durability_lr: float = 1e-3
    recipe: str = "cbscope"
    val_size: int = 8
    seed: int = 42
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: bool = False
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    cache_frozen: bool = True
    cache_budget_gb: float = 4.0
    cache_store: str = "memory"
    cache_fill: str = "upfront"

    def validate(self) -> LorraConfig:
        """Check value ranges and choices; returns ``self``.

        Raises:
            ConfigError: Naming the field and the allowed values (a wrong type, or a NaN or
                infinite number anywhere, is named before any range is checked).
        """
        check_field_types(self)
        checks: list[tuple[bool, str]] = [
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, not {self.loss!r}"),
            (self.token_mask in TOKEN_MASKS, f"token_mask must be one of {TOKEN_MASKS}"),
            (
                all(m in TOKEN_MASKS for m in self.retain_masks().values()),
                f"retain_token_mask values must be among {TOKEN_MASKS}",
            ),
            (self.retain_layers in ("all", "target"), "retain_layers must be 'all' or 'target'"),
            (self.steps >= 1, f"steps must be >= 1, not {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, not {self.batch_size}"),
            (self.max_length >= 2, f"max_length must be >= 2, not {self.max_length}"),
            (self.lora_r >= 1, f"lora_r must be >= 1, not {self.lora_r}"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout must be in [0, 1)"),
            (self.lora_b_init_std >= 0.0, "lora_b_init_std must be >= 0"),
            (self.retain_weight >= 0, "retain_weight must be >= 0"),
            (self.lr > 0, f"lr must be > 0, not {self.lr}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, not {self.lora_alpha}"),
            (self.lorra_alpha >= 0, f"lorra_alpha must be >= 0, not {self.lorra_alpha}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, not {self.weight_decay}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, not {self.max_grad_norm}"),
            (self.cb_max_length is None or self.cb_max_length >= 2,
             f"cb_max_length must be >= 2 (or null), not {self.cb_max_length}"),
            (self.rmu_scale is None or self.rmu_scale > 0,
             f"rmu_scale must be > 0 (or null), not {self.rmu_scale}"),
            (0.0 <= self.response_only_fraction <= 1.0, "response_only_fraction must be in [0, 1]"),
            (0.0 <= self.retain_response_only_fraction <= 1.0,
             "retain_response_only_fraction must be in [0, 1]"),
            (all(w >= 0 for w in (self.repbend_unsafe, self.repbend_cohesion, self.repbend_kl,
                                  self.repbend_pull)), "the repbend_* weights must be >= 0"),
            (self.repbend_pull_tokens >= 1, "repbend_pull_tokens must be >= 1"),
            (self.recipe in RECIPES, f"recipe must be one of {RECIPES}, not {self.recipe!r}"),
            (self.durability in DURABILITY,
             f"durability must be one of {DURABILITY}, not {self.durability!r}"),
            (self.durability_weight >= 0, "durability_weight must be >= 0"),
            (self.durability_steps >= 1, "durability_steps must be >= 1"),
            (self.durability_lr > 0, "durability_lr must be > 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.val_size >= 0, "val_size must be >= 0"),
            (self.cache_budget_gb >= 0, f"cache_budget_gb must be >= 0, not {self.cache_budget_gb}"),
            (self.cache_store in CACHE_STORES,
             f"cache_store must be one of {CACHE_STORES}, not {self.cache_store!r}"),
            (self.cache_fill in CACHE_FILLS,
             f"cache_fill must be one of {CACHE_FILLS}, not {self.cache_fill!r}"),
            (
                self.dtype == "auto" or str(self.dtype).lower() in DTYPES,
                f"dtype must be 'auto' or one of {sorted(DTYPES)}, not {self.dtype!r}",
            ),
        ]
        unknown = sorted(set(self.retain_mixture) - set(RETAIN_SOURCES))
        checks.append((not unknown, f"unknown retain sources {unknown}; use {RETAIN_SOURCES}"))
        checks.append(
            (all(w >= 0 for w in self.retain_mixture.values()), "retain_mixture weights must be >= 0")
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.recipe == "official":
            self._check_official()
        return self

    def _check_official(self) -> None:
        """What ``recipe="official"`` needs (the official code has no other choice)."""
        from cbscope.lorra.official import SCHEDULE_DIVISOR

        if self.steps >= SCHEDULE_DIVISOR:
            raise ConfigError(
                f"recipe 'official' runs at most {SCHEDULE_DIVISOR - 1} steps, not {self.steps}: "
                f"the official schedule divides by {SCHEDULE_DIVISOR}, and from step "
                f"{SCHEDULE_DIVISOR} on its circuit-breaker coefficient is <= 0, the term is "
                "never computed and the official code fails"
            )
        if self.token_mask != "full" or self.retain_masks() != {s: "full" for s in RETAIN_SOURCES}:
            raise ConfigError("recipe 'official' covers every real token (the attention mask): "
                              "token_mask and retain_token_mask must be 'full'")
        if self.loss != "rr" or self.durability != "none":
            raise ConfigError(f"recipe 'official' is the official RR loss; loss must be 'rr', "
                              f"not {self.loss!r}, and durability 'none'")
        if (self.cb_max_length or self.max_length) < 2:
            raise ConfigError("recipe 'official' needs cb_max_length >= 2 (request + response)")

    def retain_masks(self) -> dict[str, str]:
        """The token mask of each retain source."""
        if isinstance(self.retain_token_mask, str):
            return {source: self.retain_token_mask for source in RETAIN_SOURCES}
        return {source: self.retain_token_mask.get(source, "full") for source in RETAIN_SOURCES}

    def resolved_target_layers(self, n_layers: int) -> list[int]:
        """Target layers for a model with ``n_layers`` blocks (validated, sorted)."""
        layers = self.target_layers or default_target_layers(n_layers)
        return validate_layers(layers, n_layers, what="target layer")

    def resolved_lora_layers(self, n_layers: int) -> list[int]:
        """Block indices that get LoRA (validated against the model's depth)."""
        if self.lora_layers is None:
            top = max(self.resolved_target_layers(n_layers))
            return list(range(min(top + 1, n_layers) if self.recipe == "official" else top))
        blocks = sorted(set(int(b) for b in self.lora_layers))
        bad = [b for b in blocks if not 0 <= b < n_layers]
        if bad or not blocks:
            raise LayerError(
                f"lora_layers {bad or blocks} out of range: block indices run 0..{n_layers - 1}"
            )
        return blocks

    def resolved_retain_layers(self, n_layers: int) -> list[int]:
        """Paper layers the retain loss covers."""
        targets = self.resolved_target_layers(n_layers)
        if self.recipe == "official":
            top = max(targets)
            if top + 1 > n_layers:
                raise LayerError(
                    f"recipe 'official' reads the final-norm state of layer {top + 1} (the "
                    f"official code truncates the model after block {top}), but the model has "
                    f"{n_layers} blocks: use target layers below {n_layers}"
                )
            return list(range(1, top + 2))
        if self.retain_layers == "target":
            return targets
        return list(range(1, max(targets) + 1))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LorraConfig:
        """Build from a dict, rejecting unknown keys and values of the wrong type."""
        if not isinstance(data, dict):
            raise ConfigError(f"a LorraConfig must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LorraConfig fields {unknown}")
        return cls(**data).validate()

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``lorra_config.json`` into ``folder``."""
        return atomic_write_json(Path(folder) / CONFIG_FILE, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LorraConfig:
        """Read a ``lorra_config.json`` (or the folder holding one).

        Raises:
            MissingFileError: No such file (or a folder without ``lorra_config.json``).
            ConfigError: The file is not UTF-8 JSON, or holds a bad config (the file is named).
        """
        path = Path(path)
        if path.is_dir():
            if not (path / CONFIG_FILE).is_file():
                raise MissingFileError(f"{path} is a folder without {CONFIG_FILE}: give a LoRRA "
                                       "config file (or a run folder holding one)")
            path = path / CONFIG_FILE
        if not path.is_file():
            raise MissingFileError(f"{path}: no such config file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at "
                              f"offset {err.start}); a LoRRA config is a JSON file") from err
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); a LoRRA "
                              "config is a JSON object such as lorra_config.json") from err
        try:
            return cls.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err

    def lora_config(self, n_layers: int) -> Any:
        """The :class:`peft.LoraConfig` of this run."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(self.lora_target_modules),
            layers_to_transform=self.resolved_lora_layers(n_layers),
            bias="none",
            task_type="CAUSAL_LM",
        )
