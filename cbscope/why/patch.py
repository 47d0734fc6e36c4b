"""Adapter patching: the circuit-broken model with chosen LoRA modules switched off (or only
those on), per block and per module kind.

A *site* is one adapted projection (block ``b``, kind ``q``/``k``/``v``/``o``/``gate``/``up``/
``down``). :func:`switch_adapters` disables a set of sites with peft's own switch
(``_disable_adapters`` on the ``lora.Linear`` layers, which peft's forward and cbscope's lean
LoRA forward both honour) in both module trees the pair keeps (the bridge's copy and the model
``generate`` runs), and restores every layer's previous state in a ``finally``. With every site
on the model is the breaker; with none on it is the original model (the identities are tested).

:func:`patching` measures, for each block, the minimum response-token cosine at the target
layers with that block's adapter off (*necessity*: does it still fire?) and with only that
block's adapter on (*sufficiency*: does it fire?), the same per module kind, and a greedy minimal
sufficient set of blocks. On the organism it can also generate under each patch and ask the
exact judge what the model now writes.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tqdm.auto import tqdm

from cbscope.why.tokens import (
    ExplainError,
    TokenSeq,
    check_layers,
    check_threshold,
    cosine,
    require_adapter,
    resid_at,
)

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
ATTN_KINDS: tuple[str, ...] = ("q", "k", "v", "o")
MLP_KINDS: tuple[str, ...] = ("gate", "up", "down")
_KIND_OF = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
            "up_proj": "up", "down_proj": "down"}
_SITE_NAME = re.compile(r"layers\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)$")
Mode = Literal["off", "only"]
Judge = Callable[[str], str]


class PatchError(ExplainError):
    """A block or module kind that the adapter does not have."""


@dataclass(frozen=True)
class Site:
    """One adapted projection: its block, its kind, and its LoRA layer in every module tree."""

    block: int
    kind: str
    layers: tuple[Any, ...]


def adapter_sites(pair: Any) -> list[Site]:
    """Every adapted projection of the pair, sorted by block and kind.

    A LoRA layer of the bridge's copy shares its weights with the model's, so each layer is
    matched to its model name (``model.layers.{b}.self_attn.q_proj``) by its ``lora_A`` weight.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    require_adapter(pair)
    names: dict[int, str] = {}
    for name, module in pair.model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for adapter in getattr(module, "lora_A", {}):
                names[id(module.lora_A[adapter].weight)] = name
    grouped: dict[tuple[int, str], list[Any]] = {}
    for layer in pair._modules().lora_layers:
        adapters = list(getattr(layer, "lora_A", {}))
        name = names.get(id(layer.lora_A[adapters[0]].weight)) if adapters else None
        match = _SITE_NAME.search(name or "")
        if match is None:
            logger.debug("LoRA layer %s is not in a decoder block: not a patching site", name)
            continue
        kind = _KIND_OF.get(match.group(2), match.group(2).removesuffix("_proj"))
        grouped.setdefault((int(match.group(1)), kind), []).append(layer)
    order = {kind: i for i, kind in enumerate(KINDS)}
    return [Site(block, kind, tuple(layers)) for (block, kind), layers in
            sorted(grouped.items(), key=lambda item: (item[0][0], order.get(item[0][1], 99),
                                                      item[0][1]))]


def _select(
    pair: Any, sites: list[Site], blocks: Iterable[int] | None, kinds: Iterable[str] | None
) -> list[Site]:
    if blocks is not None:
        blocks = sorted({int(b) for b in blocks})
        bad = [b for b in blocks if not 0 <= b < pair.n_layers]
        if bad:
            raise PatchError(f"blocks {bad} do not exist: this model has blocks 0..{pair.n_layers - 1}"
                             " (TransformerLens indices; paper layer l is block l-1's output)")
    if kinds is not None:
        kinds = sorted(set(kinds))
        known = sorted({site.kind for site in sites})
        bad = [k for k in kinds if k not in known]
        if bad:
            raise PatchError(f"module kinds {bad} are not adapted; the adapter has {known}")
    return [s for s in sites if (blocks is None or s.block in blocks)
            and (kinds is None or s.kind in kinds)]


@contextlib.contextmanager
def switch_adapters(
    pair: Any,
    blocks: Iterable[int] | None = None,
    kinds: Iterable[str] | None = None,
    mode: Mode = "off",
    *,
    sites: list[Site] | None = None,
) -> Iterator[list[Site]]:
    """Switch the LoRA of chosen blocks and module kinds off (``mode="off"``), or keep only
    those on (``mode="only"``); the selection is the sites in ``blocks`` (None: every block)
    and ``kinds`` (None: every kind). Previous states come back on exit.

    Args:
        pair: The model pair.
        blocks: TransformerLens block indices.
        kinds: Module kinds (:data:`KINDS`).
        mode: ``"off"`` or ``"only"``.
        sites: :func:`adapter_sites` of the pair (found when not given).

    Yields:
        The selected sites.

    Raises:
        PatchError: An unknown block or kind.
    """
    if mode not in ("off", "only"):
        raise PatchError(f"mode must be 'off' or 'only', not {mode!r}")
    every = adapter_sites(pair) if sites is None else sites
    chosen = _select(pair, every, blocks, kinds)
    chosen_ids = {id(site) for site in chosen}
    turned = [s for s in every if (id(s) in chosen_ids) == (mode == "off")]
    layers = [layer for site in turned for layer in site.layers]
    previous = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield chosen
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer._disable_adapters = state


# ---------------------------------------------------------------------- the measurement
def organism_judge(world: Any, prompt: str) -> Judge:
    """The organism's exact judge for generations answering ``prompt``: ``"harmful"`` (the
    procedure of the request's harmful topic, or of any harmful topic, reproduced),
    ``"refusal"``, or ``"other"``."""
    from cbscope.organism import judges

    text = f" {prompt} "
    topics = [t for t in world.select("harmful") if f" {t.name} " in text]

    def judge(response: str) -> str:
        if any(judges.is_harmful(response, t.procedure) for t in topics) or (
            not topics and judges.harmful_topics(response, world)
        ):
            return "harmful"
        if judges.is_refusal(response, world.refusal):
            return "refusal"
        return "other"

    return judge


@dataclass
class Patching:
    """Necessity and sufficiency of each block's (and each module kind's) adapter.

    Every value is the minimum cosine over the measured tokens (``segment``: the response by
    default) at the target layers; the breaker *fires* when it is below the threshold.

    Attributes:
        layers: Target layers measured.
        threshold: Firing threshold.
        segment: The tokens measured: ``"response"``, ``"request"`` or ``"all"``.
        blocks: Every block index ``0 .. n_blocks - 1``.
        adapted: Whether each block has LoRA layers.
        necessity: Per block, with that block's adapter off.
        sufficiency: Per block, with only that block's adapter on.
        all: Every adapter on (the breaker).
        none: No adapter on (the original model: 1 up to rounding).
        minimal_set: A greedy minimal set of blocks whose adapters alone make it fire (None
            when the full breaker does not fire).
        minimal_cos: The value with only ``minimal_set`` on.
        kinds: Module kinds adapted.
        kind_necessity: Per kind, with that kind off in every block.
        kind_sufficiency: Per kind, with only that kind on in every block.
        attn_only: Only the attention projections on (q, k, v, o) in every block.
        mlp_only: Only the MLP projections on (gate, up, down).
        verdicts: The judge's verdict on the generation under each patch (``"all"``,
            ``"none"``, ``"minimal_set"``, ``"necessity"``/``"sufficiency"`` per block), when a
            judge was given.
        generations: The generations the verdicts are about.
    """

    layers: list[int]
    threshold: float
    segment: str
    blocks: list[int]
    adapted: list[bool]
    necessity: list[float]
    sufficiency: list[float]
    all: float
    none: float
    minimal_set: list[int] | None
    minimal_cos: float | None
    kinds: list[str] = field(default_factory=list)
    kind_necessity: list[float] = field(default_factory=list)
    kind_sufficiency: list[float] = field(default_factory=list)
    attn_only: float | None = None
    mlp_only: float | None = None
    verdicts: dict[str, Any] = field(default_factory=dict)
    generations: dict[str, Any] = field(default_factory=dict)

    def fires(self, value: float | None) -> bool:
        """Whether a measured value is below the threshold."""
        return value is not None and value < self.threshold

    @property
    def necessary_blocks(self) -> list[int]:
        """Blocks without whose adapter the breaker no longer fires."""
        if not self.fires(self.all):
            return []
        return [b for b, v in zip(self.blocks, self.necessity, strict=True) if not self.fires(v)]

    @property
    def sufficient_blocks(self) -> list[int]:
        """Blocks whose adapter alone makes it fire."""
        return [b for b, v in zip(self.blocks, self.sufficiency, strict=True) if self.fires(v)]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "layers": self.layers, "threshold": self.threshold, "segment": self.segment,
            "blocks": self.blocks, "adapted": self.adapted, "necessity": self.necessity,
            "sufficiency": self.sufficiency, "all": self.all, "none": self.none,
            "minimal_set": self.minimal_set, "minimal_cos": self.minimal_cos,
            "kinds": self.kinds, "kind_necessity": self.kind_necessity,
            "kind_sufficiency": self.kind_sufficiency, "attn_only": self.attn_only,
            "mlp_only": self.mlp_only, "verdicts": self.verdicts,
            "generations": self.generations,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Patching:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def patching(
    pair: Any,
    seq: TokenSeq,
    *,
    layers: Sequence[int] | None = None,
    threshold: float = 0.5,
    segment: str = "auto",
    kinds: bool = True,
    minimal: bool = True,
    judge: Judge | None = None,
    gen_tokens: int = 16,
    show_progress: bool = False,
) -> Patching:
    """Per-block (and per-kind) necessity and sufficiency of the adapter on one example.

    Blocks without LoRA and blocks at or above the highest target layer cannot change the
    target layers: their values are the full breaker's (necessity) and the original model's
    (sufficiency) without another forward.

    Args:
        pair: The model pair.
        seq: The example.
        layers: Target layers (default: the adapter's own).
        threshold: Firing threshold.
        segment: Tokens measured: ``"response"``, ``"request"``, ``"all"``, or ``"auto"``
            (the response, or every token without one).
        kinds: Also patch per module kind, and attention vs MLP.
        minimal: Find a greedy minimal sufficient set of blocks: blocks are added in order of
            their sufficiency (most rerouting alone first) until the breaker fires, then each is
            dropped again if it still fires without it.
        judge: ``judge(generation) -> verdict`` (e.g. :func:`organism_judge`), asked of the
            greedy generation of ``gen_tokens`` new tokens after the sequence (its response is
            the prefill; a traced generation restarts where the prefill ended) under the full
            breaker, none, each block's patches, attention / MLP only and the minimal set.
        gen_tokens: Tokens generated for the judge.
        show_progress: Show a tqdm bar.

    Raises:
        ExplainError: No adapter, a bad threshold or ``gen_tokens``.
        LayerError: A layer outside the model.
    """
    require_adapter(pair)
    chosen = check_layers(pair, layers)
    threshold = check_threshold(threshold)
    if judge is not None and gen_tokens < 1:
        raise ExplainError(f"gen_tokens must be >= 1 to judge generations, got {gen_tokens}")
    if segment == "auto":
        segment = "response" if seq.has_response else "all"
    spans = {"response": (seq.response_start, len(seq)), "request": (0, seq.response_start),
             "all": (0, len(seq))}
    if segment not in spans:
        raise ExplainError(f"segment must be 'auto' or one of {sorted(spans)}, not {segment!r}")
    lo, hi = spans[segment]
    if hi <= lo:
        raise ExplainError(f"the example has no {segment} tokens to measure")
    sites = adapter_sites(pair)
    with pair.original():
        orig = resid_at(pair, seq, chosen)

    def measure() -> float:
        cb = resid_at(pair, seq, chosen)
        return min(float(cosine(o[lo:hi], c[lo:hi]).min()) for o, c in zip(orig, cb, strict=True))

    generations: dict[str, Any] = {}
    verdicts: dict[str, Any] = {}

    prefix = seq.ids[: seq.prefill_end] if seq.prefill_end else seq.ids

    def judged(key: str, index: int | None = None) -> None:
        if judge is None or key.startswith("kind"):
            return
        from cbscope.trace import _greedy_ids

        text = pair.tokenizer.decode(_greedy_ids(pair, prefix, gen_tokens),
                                     skip_special_tokens=True).strip()
        verdict = judge(text)
        if index is None:
            generations[key], verdicts[key] = text, verdict
        else:
            generations.setdefault(key, [None] * pair.n_layers)[index] = text
            verdicts.setdefault(key, [None] * pair.n_layers)[index] = verdict

    adapted_blocks = sorted({s.block for s in sites})
    effective = [b for b in adapted_blocks if b < max(chosen)]
    steps = 2 + 2 * len(effective) + (2 * len(KINDS) + 2 if kinds else 0)
    bar = tqdm(total=steps, desc="patching", disable=not show_progress)

    def run(key: str, index: int | None = None, **switch: Any) -> float:
        with switch_adapters(pair, sites=sites, **switch):
            value = measure()
            judged(key, index)
        bar.update(1)
        return value

    value_all = run("all", blocks=[], mode="off")
    value_none = run("none", blocks=[], mode="only")
    necessity, sufficiency = [], []
    for block in range(pair.n_layers):
        if block in effective:
            necessity.append(run("necessity", block, blocks=[block], mode="off"))
            sufficiency.append(run("sufficiency", block, blocks=[block], mode="only"))
            continue
        necessity.append(value_all)
        sufficiency.append(value_none)
        if judge is not None and block in adapted_blocks:  # generation reads every block
            with switch_adapters(pair, sites=sites, blocks=[block], mode="off"):
                judged("necessity", block)
            with switch_adapters(pair, sites=sites, blocks=[block], mode="only"):
                judged("sufficiency", block)
    result = Patching(
        layers=chosen, threshold=threshold, segment=segment, blocks=list(range(pair.n_layers)),
        adapted=[b in adapted_blocks for b in range(pair.n_layers)], necessity=necessity,
        sufficiency=sufficiency, all=value_all, none=value_none, minimal_set=None,
        minimal_cos=None, verdicts=verdicts, generations=generations,
    )
    if kinds:
        result.kinds = [k for k in KINDS if any(s.kind == k for s in sites)]
        result.kinds += sorted({s.kind for s in sites} - set(result.kinds))
        for kind in result.kinds:
            result.kind_necessity.append(run("kind_off", kinds=[kind], mode="off"))
            result.kind_sufficiency.append(run("kind_only", kinds=[kind], mode="only"))
        attn = [k for k in ATTN_KINDS if k in result.kinds]
        mlp = [k for k in MLP_KINDS if k in result.kinds]
        result.attn_only = run("attn_only", kinds=attn, mode="only") if attn else value_none
        result.mlp_only = run("mlp_only", kinds=mlp, mode="only") if mlp else value_none
    if minimal and result.fires(value_all):
        order = sorted(effective, key=lambda b: sufficiency[b])
        chosen_set: list[int] = []
        value = value_none
        for block in order:
            chosen_set.append(block)
            with switch_adapters(pair, sites=sites, blocks=chosen_set, mode="only"):
                value = measure()
            if result.fires(value):
                break
        for block in list(reversed(chosen_set)):
            if len(chosen_set) == 1:
                break
            trial = [b for b in chosen_set if b != block]
            with switch_adapters(pair, sites=sites, blocks=trial, mode="only"):
                trial_value = measure()
            if result.fires(trial_value):
                chosen_set, value = trial, trial_value
        result.minimal_set, result.minimal_cos = sorted(chosen_set), value
        if judge is not None:
            with switch_adapters(pair, sites=sites, blocks=chosen_set, mode="only"):
                judged("minimal_set")
    bar.close()
    return result
