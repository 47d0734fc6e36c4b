"""``cbscope.explain``: why does the breaker fire on this example? Every part at once.

:func:`explain` traces one example through both models (all layers, one forward each, the
residual stream split into its summands), finds where the breaker fires
(:func:`~cbscope.why.tokens.find_focus`), and runs the five parts there: the exact
decomposition (:mod:`cbscope.why.decomposition`), adapter patching (:mod:`cbscope.why.patch`),
input attribution (:mod:`cbscope.why.attribution`), the logit lens (:mod:`cbscope.why.lens`)
and the rerouting direction with a PCA of the states (:mod:`cbscope.why.direction`). The
result is an :class:`Explanation`, saved as one JSON file whose top-level keys are the parts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from cbscope.data import Conversation
from cbscope.io import atomic_write_json
from cbscope.why.attribution import Attribution, attribute
from cbscope.why.decomposition import Decomposition, capture_models, decompose_captured
from cbscope.why.direction import (
    DEFAULT_HARMFUL,
    DEFAULT_HARMLESS,
    DirectionReport,
    direction_report,
    pca_states,
    refusal_direction,
)
from cbscope.why.lens import LogitLens, logit_lens
from cbscope.why.patch import Patching, organism_judge, patching
from cbscope.why.tokens import (
    ExplainError,
    Focus,
    TokenSeq,
    check_layers,
    check_threshold,
    cosine,
    encode,
    find_focus,
    require_adapter,
)

logger = logging.getLogger(__name__)

EXPLAIN_FORMAT_VERSION = 1
PARTS = ("decomposition", "patching", "attribution", "logit_lens", "direction")
Pair = tuple[str | Conversation, str]


def world_of(pair: Any) -> Any | None:
    """The organism's world when the pair's model is an organism (a folder with world.json)."""
    path = getattr(getattr(pair, "resolved", None), "path", None)
    if path is None or not (Path(path) / "world.json").is_file():
        return None
    from cbscope.organism import World

    return World.from_json(Path(path) / "world.json")


def default_references(world: Any | None) -> tuple[list[Pair], Pair, tuple[list[Any], list[Any]]]:
    """Reference sets: harmful examples with responses (the rerouting direction), one benign
    example (the PCA), and harmful vs harmless requests (the refusal direction).

    On the organism: two topics of every harm category in the first train template with their
    compliant answers, the first chat-seen benign topic, and every harmful vs every chat-seen
    benign topic's request. Elsewhere the small built-in lists of :mod:`cbscope.why.direction`.
    """
    if world is None:
        return (list(DEFAULT_HARMFUL), DEFAULT_HARMLESS[0],
                ([p for p, _ in DEFAULT_HARMFUL], [p for p, _ in DEFAULT_HARMLESS]))
    template = world.train_templates[0]
    harmful = []
    for category in world.harm_categories:
        for topic in world.select("harmful", categories=[category])[:2]:
            harmful.append((world.render_request(topic, template), world.answer(topic)))
    benign_topic = world.select("benign", split="seen")[0]
    benign = (world.render_request(benign_topic, template), world.answer(benign_topic))
    refusal = ([world.render_request(t, template) for t in world.select("harmful")],
               [world.render_request(t, template) for t in world.select("benign", split="seen")])
    return harmful, benign, refusal


@dataclass
class Explanation:
    """Why the breaker fires on one example (see :func:`explain`).

    Attributes:
        model_name: The model spec.
        prompt: The prompt (string or conversation).
        response: The response or prefill text.
        tokens: Token texts.
        token_ids: The exact ids analysed.
        response_start: First response token.
        layers: Target layers (where firing is looked for and patching measures).
        threshold: Firing threshold.
        focus: The firing point (or the request dip, or the lowest cosine).
        cos: ``[layer, pos]`` cosine at every traced layer.
        traced_layers: The layers of ``cos``.
        decomposition: Part 1 (None when not computed).
        patching: Part 2.
        attribution: Part 3.
        logit_lens: Part 4a.
        direction: Part 4b (with the PCA).
        seconds: Wall time of each part.
    """

    model_name: str
    prompt: str | Conversation
    response: str
    tokens: list[str]
    token_ids: list[int]
    response_start: int
    layers: list[int]
    threshold: float
    focus: Focus
    cos: Float[Tensor, "layer pos"]
    traced_layers: list[int]
    decomposition: Decomposition | None = None
    patching: Patching | None = None
    attribution: Attribution | None = None
    logit_lens: LogitLens | None = None
    direction: DirectionReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ findings
    def summary(self) -> dict[str, Any]:
        """The headline findings as plain JSON (what the CLI prints and the view says)."""
        out: dict[str, Any] = {"focus": self.focus.to_dict(), "fires": self.focus.fires}
        if self.patching is not None:
            patch = self.patching
            out["minimal_set"] = patch.minimal_set
            out["necessary_blocks"] = patch.necessary_blocks
            out["sufficient_blocks"] = patch.sufficient_blocks
            out["attn_only"] = patch.attn_only
            out["mlp_only"] = patch.mlp_only
        if self.decomposition is not None:
            out["shares_at_focus"] = self.decomposition.kind_shares(self.focus.pos)
            out["top_components"] = self.decomposition.top_components(self.focus.pos, 3) \
                if self.focus.pos < len(self.tokens) else []
        if self.attribution is not None:
            out["top_tokens"] = self.attribution.top(3)
        if self.logit_lens is not None:
            last = self.logit_lens.layers[-1]
            out["prediction_at_focus"] = {
                model: self.logit_lens.top(model, last, self.focus.pos)[:3]
                for model in ("original", "circuit-broken")}
        if self.direction is not None and self.focus.layer in self.direction.layers:
            out["direction_at_focus_layer"] = self.direction.at(self.focus.layer)
        return out

    def describe(self) -> list[str]:
        """The findings in sentences."""
        lines = [f"The breaker {self.focus.describe()}."]
        patch, dec, attr = self.patching, self.decomposition, self.attribution
        if patch is not None and not patch.fires(patch.all):
            lines.append(f"With every adapter on the {patch.segment} tokens stay above the "
                         f"threshold (lowest cosine {patch.all:.2f}): no block to blame.")
        elif patch is not None:
            if patch.minimal_set is not None:
                blocks = ", ".join(map(str, patch.minimal_set))
                lines.append(f"Blocks whose adapters alone make it fire (greedy minimal set): "
                             f"{blocks} (cosine {patch.minimal_cos:.2f} with only them on).")
            necessary = patch.necessary_blocks
            lines.append("Without the adapter of block(s) " + ", ".join(map(str, necessary))
                         + " it no longer fires." if necessary else
                         "No single block's adapter is necessary: it still fires without any one.")
            sufficient = patch.sufficient_blocks
            if sufficient:
                lines.append("The adapter of block(s) " + ", ".join(map(str, sufficient))
                             + " alone is enough to make it fire.")
            if patch.attn_only is not None and patch.mlp_only is not None:
                lines.append(f"Only the attention LoRA on: cosine {patch.attn_only:.2f}; only the "
                             f"MLP LoRA on: {patch.mlp_only:.2f} (threshold {self.threshold:g}).")
        if dec is not None:
            shares = dec.kind_shares(self.focus.pos)
            lines.append(f"At layer {dec.layer}, token {self.focus.pos}, the rerouting delta is "
                         f"{100 * shares['attn']:.0f}% attention output and "
                         f"{100 * shares['mlp']:.0f}% MLP output.")
        if attr is not None:
            top = ", ".join(f'"{t.strip()}" (pos {p}, {s:+.2f})' for p, t, s in attr.top(3))
            if top:
                lines.append(f"Tokens that drive it (occlusion): {top}.")
        if self.logit_lens is not None:
            last = self.logit_lens.layers[-1]
            cb = self.logit_lens.top("circuit-broken", last, self.focus.pos)[0]
            orig = self.logit_lens.top("original", last, self.focus.pos)[0]
            lines.append(f'Next token there: the original model predicts "{orig[0].strip()}" '
                         f'({orig[1]:.2f}), the circuit-broken one "{cb[0].strip()}" ({cb[1]:.2f}).')
        if self.direction is not None and self.focus.layer in self.direction.layers:
            at = self.direction.at(self.focus.layer)
            lines.append(f"Rerouting direction at layer {self.focus.layer}: mean pairwise cosine "
                         f"{at['shared']:.2f} over {self.direction.n_examples} harmful examples, "
                         f"cosine {at['cos_refusal']:.2f} with the refusal direction.")
        return lines

    # ------------------------------------------------------------------ export
    def to_dataframe(self) -> pd.DataFrame:
        """The decomposition in long form (see :meth:`Decomposition.to_dataframe`)."""
        if self.decomposition is None:
            raise ExplainError("this explanation has no decomposition")
        return self.decomposition.to_dataframe()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the meta data, then one key per part."""
        return {
            "format_version": EXPLAIN_FORMAT_VERSION,
            "model": self.model_name,
            "prompt": self.prompt,
            "response": self.response,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "response_start": self.response_start,
            "target_layers": self.layers,
            "threshold": self.threshold,
            "focus": self.focus.to_dict(),
            "traced_layers": self.traced_layers,
            "cos": [[round(v, 6) for v in row] for row in self.cos.tolist()],
            "seconds": self.seconds,
            "summary": self.summary(),
            **{part: (getattr(self, part).to_dict() if getattr(self, part) is not None else None)
               for part in PARTS},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (``.json`` is added to a path without a suffix)."""
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".json")
        return atomic_write_json(path, self.to_dict(), indent=None, default=_json_default)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Explanation:
        """Read a file written by :meth:`save`.

        Raises:
            ExplainError: Not an explanation file, or one of a newer format.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ExplainError(f"cannot read explanation {path}: {err}") from err
        if not isinstance(data, dict) or "focus" not in data:
            raise ExplainError(f"{path} is not an explanation written by Explanation.save")
        if int(data.get("format_version", 0)) > EXPLAIN_FORMAT_VERSION:
            raise ExplainError(f"{path} has format {data['format_version']}; this cbscope reads "
                               f"up to {EXPLAIN_FORMAT_VERSION}: upgrade cbscope")
        readers = {"decomposition": Decomposition, "patching": Patching,
                   "attribution": Attribution, "logit_lens": LogitLens,
                   "direction": DirectionReport}
        parts = {part: readers[part].from_dict(data[part]) if data.get(part) else None
                 for part in PARTS}
        return cls(
            model_name=data["model"], prompt=data["prompt"], response=data["response"],
            tokens=list(data["tokens"]), token_ids=[int(i) for i in data["token_ids"]],
            response_start=int(data["response_start"]),
            layers=[int(x) for x in data["target_layers"]], threshold=float(data["threshold"]),
            focus=Focus.from_dict(data["focus"]),
            cos=torch.tensor([[math.nan if v is None else v for v in row] for row in data["cos"]]),
            traced_layers=[int(x) for x in data["traced_layers"]],
            seconds=dict(data.get("seconds", {})), **parts,
        )


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def explain(
    pair: Any,
    prompt: str | Conversation | None = None,
    response: str = "",
    *,
    tokens: TokenSeq | None = None,
    layers: Sequence[int] | None = None,
    threshold: float = 0.5,
    layer: int | None = None,
    parts: Sequence[str] = PARTS,
    judge: Any = "auto",
    gen_tokens: int = 16,
    k: int = 5,
    references: Sequence[Pair] | None = None,
    benign: Pair | None = None,
    refusal_prompts: tuple[Sequence[Any], Sequence[Any]] | None = None,
    show_progress: bool = False,
) -> Explanation:
    """Why does the breaker fire on this example? Decomposition, patching, attribution, logit
    lens and rerouting direction, at the firing point.

    Args:
        pair: The model pair (adapters on = circuit-broken).
        prompt: The request (string or conversation); or give ``tokens``.
        response: The response or prefill.
        tokens: The exact tokens to explain (e.g. :func:`cbscope.why.from_trace` of a traced
            generation) instead of ``prompt`` and ``response``.
        layers: Target layers (default: the adapter's own, from its ``lorra_config.json``).
        threshold: Firing threshold.
        layer: Layer of the decomposition (default: the firing point's).
        parts: Which of :data:`PARTS` to compute.
        judge: ``"auto"`` (the exact judge on the organism, none elsewhere), None, or a
            ``judge(generation) -> verdict`` for the patched generations.
        gen_tokens: Tokens generated per patch for the judge.
        k: Logit-lens predictions kept per token.
        references: Harmful ``(prompt, response)`` examples for the rerouting direction
            (default :func:`default_references`).
        benign: A benign ``(prompt, response)`` for the PCA (default as above).
        refusal_prompts: ``(harmful, harmless)`` requests for the refusal direction.
        show_progress: Show tqdm bars.

    Raises:
        ExplainError: No adapter, no prompt, an unknown part, or a bad threshold, ``k`` or
            ``gen_tokens``.
        LayerError: A layer outside the model.
    """
    require_adapter(pair)
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise ExplainError(f"unknown parts {unknown}; choose from {list(PARTS)}")
    threshold = check_threshold(threshold)
    targets = check_layers(pair, layers)
    if layer is not None:
        check_layers(pair, [layer])
    if k < 1:
        raise ExplainError(f"k must be >= 1, got {k}")
    if gen_tokens < 0:
        raise ExplainError(f"gen_tokens must be >= 0, got {gen_tokens}")
    if tokens is None:
        if prompt is None:
            raise ExplainError("give a prompt (or the tokens to explain)")
        seq = encode(pair, prompt, response)
    else:
        seq = tokens
    world = world_of(pair)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    top = pair.n_layers if "logit_lens" in parts else max(targets + [layer or 0])
    top = max(top, layer or 0)
    orig, cb, off = capture_models(pair, seq, top, direct="decomposition" in parts)
    traced = list(range(1, top + 1))
    cos = torch.stack([cosine(orig.resid[i][0], cb.resid[i][0]) for i in range(top)])
    focus = find_focus(cos, traced, seq, targets, threshold)
    seconds["trace"] = time.perf_counter() - started

    result = Explanation(
        model_name=str(getattr(pair.resolved, "spec", "")), prompt=seq.prompt,
        response=seq.response, tokens=list(seq.tokens), token_ids=list(seq.ids),
        response_start=seq.response_start, layers=targets, threshold=threshold, focus=focus,
        cos=cos, traced_layers=traced, seconds=seconds,
    )

    def timed(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - start
        return value

    if "decomposition" in parts:
        result.decomposition = timed("decomposition", lambda: decompose_captured(
            seq, orig, cb, off, layer or focus.layer, focus.pos))
    if "patching" in parts:
        chosen_judge = judge
        if judge == "auto":
            prompt_text = seq.prompt if isinstance(seq.prompt, str) else (
                seq.prompt[-1]["content"] if seq.prompt else "")
            chosen_judge = organism_judge(world, prompt_text) if world is not None else None
        segment = "request" if focus.kind == "request" else "auto"
        result.patching = timed("patching", lambda: patching(
            pair, seq, layers=targets, threshold=threshold, segment=segment, judge=chosen_judge,
            gen_tokens=max(1, gen_tokens), show_progress=show_progress))
    if "attribution" in parts:
        result.attribution = timed("attribution", lambda: attribute(
            pair, seq, focus.layer, focus.pos, world=world, show_progress=show_progress))
    if "logit_lens" in parts:
        resid = {"original": [orig.resid[i][0] for i in range(top)],
                 "circuit-broken": [cb.resid[i][0] for i in range(top)]}
        result.logit_lens = timed("logit_lens", lambda: logit_lens(
            pair, seq, traced, k=k, resid=resid))
    if "direction" in parts:
        result.direction = timed("direction", lambda: _direction(
            pair, seq, targets, focus, world, references, benign, refusal_prompts))
    seconds["total"] = time.perf_counter() - started
    logger.info("explained %d tokens in %.2f s", len(seq), seconds["total"])
    return result


def _direction(
    pair: Any, seq: TokenSeq, targets: list[int], focus: Focus, world: Any | None,
    references: Sequence[Pair] | None, benign: Pair | None,
    refusal_prompts: tuple[Sequence[Any], Sequence[Any]] | None,
) -> DirectionReport:
    default_refs, default_benign, default_refusal = default_references(world)
    refs = [encode(pair, p, r) for p, r in (references or default_refs)]
    harmful, harmless = refusal_prompts or default_refusal
    layers = sorted(set(targets) | {focus.layer})
    refusal = refusal_direction(pair, list(harmful), list(harmless), layers)
    report = direction_report(pair, refs, layers, refusal=refusal,
                              example=seq if seq.has_response else None)
    benign_seq = encode(pair, *(benign or default_benign))
    report.pca = pca_states(pair, seq, benign_seq, focus.layer)
    return report
