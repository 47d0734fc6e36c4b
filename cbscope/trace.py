"""Per-token, per-layer cosine probes between the original and the circuit-broken model.

A circuit breaker (a LoRA adapter trained with Representation Rerouting) leaves the residual
stream on benign text almost unchanged and scrambles it on harmful text. :func:`cosine_trace`
measures exactly that: every example runs through the :class:`~cbscope.pair.ModelPair` twice,
adapters off (:meth:`~cbscope.pair.ModelPair.original`) and on, the residual stream is read at
``blocks.{l-1}.hook_resid_post`` (paper layer ``l``) through
:meth:`~cbscope.pair.ModelPair.resid`, and for every token and layer we keep

- ``cos``: the cosine similarity between the two residual vectors (1 = untouched),
- ``norm_orig`` / ``norm_cb``: their L2 norms.

Each batch costs exactly two forward passes, which stop after the highest requested layer (no
unembedding). :func:`trace_generation` is the recipe of the paper's Figure 6 (generate with the
circuit-broken model, optionally after a prefill, then trace the whole sequence);
:func:`firing_stats` summarises where the breaker fires over a dataset.

Positions are token indices into the chat-formatted sequence (request, then response);
``response_start`` is the index of the first response token. Padded positions hold NaN and are
``False`` in ``mask``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from cbscope.data import (
    ChatExample,
    Conversation,
    as_messages,
    check_request_length,
    context_length,
    encode_chat,
    pad_id_of,
    pad_right,
)
from cbscope.errors import ConfigError
from cbscope.layers import LayerError, validate_layers
from cbscope.sidecar import read_sidecar, write_sidecar

if TYPE_CHECKING:
    from cbscope.pair import PairLike

logger = logging.getLogger(__name__)

TRACE_FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.5
COS_EPS = 1e-8
Segment = Literal["all", "request", "response"]
SEGMENTS = ("all", "request", "response")


# ---------------------------------------------------------------------- firing point
def check_threshold(threshold: Any, name: str = "threshold") -> float:
    """A cosine threshold as a float, or a :class:`~cbscope.errors.ConfigError`.

    A cosine lies in [-1, 1], so a threshold outside it (or NaN, which every comparison calls
    False: "never fires") would answer a question nobody asked.

    Raises:
        ConfigError: If ``threshold`` is not a finite number in [-1, 1].
    """
    try:
        value = float(threshold)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} {threshold!r} is not a number: use one in [-1, 1]") from err
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise ConfigError(f"{name} {threshold!r} must be a finite cosine in [-1, 1]")
    return value


@dataclass
class FiringPoint:
    """Where a circuit breaker fires: the first response token whose cosine drops below a threshold.

    Attributes:
        example: Example index in the trace.
        pos: Token position in the full sequence.
        layer: Paper-convention layer (the lowest one below the threshold at ``pos``).
        token: The token's text.
        cos: Cosine at ``(layer, pos)``.
        pos_after_start: ``pos - response_start`` (0 = the first response token).
        threshold: The threshold it was found with.
    """

    example: int
    pos: int
    layer: int
    token: str
    cos: float
    pos_after_start: int = 0
    threshold: float = DEFAULT_THRESHOLD

    def describe(self) -> str:
        """In words, e.g. ``fires at token "Start" (position 14), layer 10, cosine 0.08``."""
        token = self.token.strip() or self.token
        return (
            f'fires at token "{token}" (position {self.pos}, {self.pos_after_start} after the '
            f"response start), layer {self.layer}, cosine {self.cos:.2f}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "example": self.example,
            "pos": self.pos,
            "layer": self.layer,
            "token": self.token,
            "cos": self.cos,
            "pos_after_start": self.pos_after_start,
            "threshold": self.threshold,
        }


# ---------------------------------------------------------------------- the trace
@dataclass
class CosineTrace:
    """Cosines and norms of original vs circuit-broken residual streams, per example/layer/token.

    Attributes:
        cos: Cosine similarity ``cos(orig, cb)``; NaN at padded positions.
        norm_orig: L2 norm of the original model's residual; NaN at padded positions.
        norm_cb: L2 norm of the circuit-broken model's residual; NaN at padded positions.
        tokens: Per example, the text of each token (``tokenizer.decode([id])``).
        mask: True at real tokens.
        layers: Paper-convention layers along the ``layer`` axis (sorted).
        response_start: Per example, index of the first response token (== length if none).
        prefill_end: Per example, where a prefill ends and generation starts (``None`` when no
            generation happened).
        turn_starts: Per example, start index of each message (multi-turn boundaries).
        prompts: Per example, the prompt string or conversation.
        responses: Per example, the response text (prefill + generation for generated traces).
        model_name: The model spec or name.
        token_ids: Per example, the token ids.
    """

    cos: Float[Tensor, "example layer pos"]
    norm_orig: Float[Tensor, "example layer pos"]
    norm_cb: Float[Tensor, "example layer pos"]
    tokens: list[list[str]]
    mask: Bool[Tensor, "example pos"]
    layers: list[int]
    response_start: list[int]
    prefill_end: list[int | None] = field(default_factory=list)
    turn_starts: list[list[int]] = field(default_factory=list)
    prompts: list[str | Conversation] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    model_name: str = ""
    token_ids: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.cos.shape[0]
        if not self.prefill_end:
            self.prefill_end = [None] * n
        if not self.turn_starts:
            self.turn_starts = [[0] for _ in range(n)]
        for name in ("tokens", "response_start", "prefill_end", "turn_starts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} examples")
        if self.cos.shape[1] != len(self.layers):
            raise ValueError(f"cos has {self.cos.shape[1]} layers but layers={self.layers}")

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.cos.shape[0])

    @property
    def lengths(self) -> list[int]:
        """Number of real tokens of each example."""
        return [int(n) for n in self.mask.sum(dim=1).tolist()]

    def layer_indices(self, layers: Sequence[int] | None) -> list[int]:
        """Indices along the ``layer`` axis of paper-convention ``layers`` (None: all).

        Raises:
            LayerError: If a layer was not traced.
        """
        if layers is None:
            return list(range(len(self.layers)))
        layers = sorted(set(int(layer) for layer in layers))
        if not layers:
            raise LayerError("no layers given")
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise LayerError(f"layers {missing} are not in this trace (traced: {self.layers})")
        return [self.layers.index(layer) for layer in layers]

    def _check_example(self, example: int) -> int:
        if not -len(self) <= example < len(self):
            raise IndexError(f"example {example} out of range: the trace has {len(self)}")
        return example % len(self)

    def segment_mask(self, segment: Segment = "all") -> Bool[Tensor, "example pos"]:
        """Real tokens of a segment: ``"request"`` (before the response start), ``"response"``."""
        if segment not in SEGMENTS:
            raise ValueError(f"segment must be one of {SEGMENTS}, not {segment!r}")
        if segment == "all":
            return self.mask.clone()
        positions = torch.arange(self.mask.shape[1]).unsqueeze(0)
        starts = torch.tensor(self.response_start).unsqueeze(1)
        inside = positions >= starts if segment == "response" else positions < starts
        return self.mask & inside

    def select(self, example: int) -> CosineTrace:
        """A one-example trace, trimmed to that example's length."""
        example = self._check_example(example)
        n = self.lengths[example]
        return CosineTrace(
            cos=self.cos[example : example + 1, :, :n].clone(),
            norm_orig=self.norm_orig[example : example + 1, :, :n].clone(),
            norm_cb=self.norm_cb[example : example + 1, :, :n].clone(),
            tokens=[list(self.tokens[example])],
            mask=self.mask[example : example + 1, :n].clone(),
            layers=list(self.layers),
            response_start=[self.response_start[example]],
            prefill_end=[self.prefill_end[example]],
            turn_starts=[list(self.turn_starts[example])],
            prompts=[self.prompts[example]] if self.prompts else [],
            responses=[self.responses[example]] if self.responses else [],
            model_name=self.model_name,
            token_ids=[list(self.token_ids[example])] if self.token_ids else [],
        )

    # ------------------------------------------------------------------ statistics
    def mean_cos(self, layers: Sequence[int] | None = None, segment: Segment = "all") -> float:
        """Mask-weighted mean cosine over examples, the given layers and a segment's tokens.

        Over circuit-breaker examples at the target layers with ``segment="all"`` this is the
        ``cb_cos`` the trainer logs on the same batch: ``sum(cos * mask) / sum(mask)`` with the
        mask repeated over layers.
        """
        index = self.layer_indices(layers)
        keep = self.segment_mask(segment).unsqueeze(1).expand(-1, len(index), -1)
        values = self.cos[:, index, :].double()[keep]
        if values.numel() == 0:
            return math.nan
        return float(values.mean())

    def min_cos(self, example: int = 0, layers: Sequence[int] | None = None) -> float:
        """Lowest cosine over an example's response tokens at ``layers`` (NaN without response)."""
        example = self._check_example(example)
        index = self.layer_indices(layers)
        start, end = self.response_start[example], self.lengths[example]
        values = self.cos[example, index, start:end]
        return float(values.min()) if values.numel() else math.nan

    def firing_point(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        layers: Sequence[int] | None = None,
        example: int = 0,
    ) -> FiringPoint | None:
        """The first response token whose cosine falls below ``threshold`` at any of ``layers``.

        The earliest position wins; at that position the lowest layer below the threshold is
        reported.

        Args:
            threshold: Cosine threshold.
            layers: Paper-convention layers to look at (None: every traced layer).
            example: Example index.

        Returns:
            The :class:`FiringPoint`, or ``None`` if the breaker never fires on the response.

        Raises:
            ConfigError: If ``threshold`` is not a finite number in [-1, 1].
        """
        threshold = check_threshold(threshold)
        example = self._check_example(example)
        index = self.layer_indices(layers)
        start, end = self.response_start[example], self.lengths[example]
        values = self.cos[example, index, start:end]  # [layer, pos]
        below = values < threshold  # NaN compares False
        if not bool(below.any()):
            return None
        offset = int(below.any(dim=0).nonzero()[0, 0])
        layer_row = int(below[:, offset].nonzero()[0, 0])
        pos = start + offset
        return FiringPoint(
            example=example,
            pos=pos,
            layer=self.layers[index[layer_row]],
            token=self.tokens[example][pos],
            cos=float(values[layer_row, offset]),
            pos_after_start=offset,
            threshold=float(threshold),
        )

    def firing_points(
        self, threshold: float = DEFAULT_THRESHOLD, layers: Sequence[int] | None = None
    ) -> list[FiringPoint | None]:
        """:meth:`firing_point` for every example."""
        return [self.firing_point(threshold, layers, example) for example in range(len(self))]

    def summary(
        self, threshold: float = DEFAULT_THRESHOLD, layers: Sequence[int] | None = None
    ) -> dict[str, Any]:
        """Per-layer mean cosines and per-example firing points.

        Returns:
            A dict with ``"per_layer"`` (DataFrame: layer, request, response, all: mean cosine
            over those tokens of every example), ``"per_example"`` (DataFrame: example, fired,
            pos, pos_after_start, layer, token, cos, min_cos, mean_cos_request,
            mean_cos_response) and ``"firing_points"`` (list of :class:`FiringPoint` or None).
        """
        index = self.layer_indices(layers)
        chosen = [self.layers[i] for i in index]
        per_layer = pd.DataFrame(
            {
                "layer": chosen,
                **{
                    segment: [self.mean_cos([layer], segment) for layer in chosen]
                    for segment in ("request", "response", "all")
                },
            }
        )
        points = self.firing_points(threshold, chosen)
        rows = []
        for example, point in enumerate(points):
            single = self.select(example)
            rows.append(
                {
                    "example": example,
                    "fired": point is not None,
                    "pos": point.pos if point else None,
                    "pos_after_start": point.pos_after_start if point else None,
                    "layer": point.layer if point else None,
                    "token": point.token if point else None,
                    "cos": point.cos if point else None,
                    "min_cos": self.min_cos(example, chosen),
                    "mean_cos_request": single.mean_cos(chosen, "request"),
                    "mean_cos_response": single.mean_cos(chosen, "response"),
                }
            )
        return {"per_layer": per_layer, "per_example": pd.DataFrame(rows), "firing_points": points}

    # ------------------------------------------------------------------ export
    def to_dataframe(self) -> pd.DataFrame:
        """Long form: one row per (example, layer, real token).

        Columns: example, layer, pos, token, segment (``"request"``/``"response"``), cos,
        norm_orig, norm_cb.
        """
        n_ex, n_layer, width = self.cos.shape
        ex_idx, layer_idx, pos = np.meshgrid(
            np.arange(n_ex), np.arange(n_layer), np.arange(width), indexing="ij"
        )
        keep = self.mask.unsqueeze(1).expand(-1, n_layer, -1).numpy()
        ex_idx, layer_idx, pos = ex_idx[keep], layer_idx[keep], pos[keep]
        starts = np.asarray(self.response_start)[ex_idx]
        tokens = [self.tokens[e][p] for e, p in zip(ex_idx.tolist(), pos.tolist(), strict=True)]
        return pd.DataFrame(
            {
                "example": ex_idx,
                "layer": np.asarray(self.layers)[layer_idx],
                "pos": pos,
                "token": tokens,
                "segment": np.where(pos >= starts, "response", "request"),
                "cos": self.cos.numpy()[keep],
                "norm_orig": self.norm_orig.numpy()[keep],
                "norm_cb": self.norm_cb.numpy()[keep],
            }
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save as ``<stem>.safetensors`` (tensors) and ``<stem>.json`` (everything else).

        ``path`` may end in ``.json``, ``.safetensors`` or nothing. No pickle is involved.

        Returns:
            The JSON path.
        """
        tensors = {
            "cos": self.cos.float().contiguous(),
            "norm_orig": self.norm_orig.float().contiguous(),
            "norm_cb": self.norm_cb.float().contiguous(),
            "mask": self.mask.bool().contiguous(),
        }
        meta = {
            "format_version": TRACE_FORMAT_VERSION,
            "layers": self.layers,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "response_start": self.response_start,
            "prefill_end": self.prefill_end,
            "turn_starts": self.turn_starts,
            "prompts": self.prompts,
            "responses": self.responses,
            "model_name": self.model_name,
        }
        return write_sidecar(path, tensors, meta, kind="trace")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CosineTrace:
        """Load a trace written by :meth:`save` (give the ``.json`` or ``.safetensors`` path)."""
        tensors, meta = read_sidecar(path, kind="trace")
        return cls(
            cos=tensors["cos"],
            norm_orig=tensors["norm_orig"],
            norm_cb=tensors["norm_cb"],
            tokens=meta["tokens"],
            mask=tensors["mask"].bool(),
            layers=[int(layer) for layer in meta["layers"]],
            response_start=[int(s) for s in meta["response_start"]],
            prefill_end=meta["prefill_end"],
            turn_starts=meta["turn_starts"],
            prompts=meta["prompts"],
            responses=meta["responses"],
            model_name=meta["model_name"],
            token_ids=meta.get("token_ids", []),
        )


# ---------------------------------------------------------------------- computation
def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Text of each token on its own (special tokens kept)."""
    return list(tokenizer.batch_decode([[int(i)] for i in ids], skip_special_tokens=False))


@torch.no_grad()
def pair_cosines(
    pair: PairLike,
    input_ids: Tensor,
    attention_mask: Tensor,
    layers: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """Cosines and norms for one padded batch: exactly two (truncated) forward passes.

    Returns:
        ``cos``, ``norm_orig``, ``norm_cb``, each ``[batch, layer, pos]`` float32 on the CPU
        (padded positions are not masked here).
    """
    with pair.original():
        orig = pair.resid(input_ids, attention_mask, layers)
    cb = pair.resid(input_ids, attention_mask, layers)
    orig, cb = orig.float(), cb.float()
    norm_orig = torch.linalg.vector_norm(orig, dim=-1)
    norm_cb = torch.linalg.vector_norm(cb, dim=-1)
    dot = torch.einsum("lbpd,lbpd->lbp", orig, cb)
    cos = dot / (norm_orig * norm_cb).clamp_min(COS_EPS)
    return tuple(t.permute(1, 0, 2).cpu() for t in (cos, norm_orig, norm_cb))  # type: ignore[return-value]


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def cosine_trace_ids(
    pair: PairLike,
    input_ids: Sequence[Sequence[int]],
    response_starts: Sequence[int],
    *,
    layers: Sequence[int] | None = None,
    prefill_ends: Sequence[int | None] | None = None,
    turn_starts: Sequence[Sequence[int]] | None = None,
    prompts: Sequence[str | Conversation] | None = None,
    responses: Sequence[str] | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
) -> CosineTrace:
    """Trace already tokenised sequences (the core of :func:`cosine_trace`).

    Sequences are sorted by length into right-padded batches (less padding), each batch runs
    through the pair twice (:func:`pair_cosines`), and results are put back in input order.

    Args:
        pair: The model pair.
        input_ids: Token ids per example (request + response).
        response_starts: Index of the first response token per example.
        layers: Paper-convention layers (default: all).
        prefill_ends: Where a prefill ends and generation starts, per example.
        turn_starts: Message boundaries per example.
        prompts: Prompt per example (stored, not used).
        responses: Response text per example (stored, not used).
        batch_size: Examples per forward pass.
        show_progress: Show a tqdm bar.
    """
    n = len(input_ids)
    if n == 0:
        raise ValueError("nothing to trace: no examples")
    if len(response_starts) != n:
        raise ValueError(f"{n} sequences but {len(response_starts)} response starts")
    if any(len(seq) == 0 for seq in input_ids):
        raise ValueError("cannot trace an empty token sequence")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = validate_layers(range(1, pair.n_layers + 1) if layers is None else layers, pair.n_layers)
    lengths = [len(seq) for seq in input_ids]
    width = max(lengths)
    cos = torch.full((n, len(chosen), width), math.nan)
    norm_orig = torch.full_like(cos, math.nan)
    norm_cb = torch.full_like(cos, math.nan)
    mask = torch.zeros((n, width), dtype=torch.bool)
    pad_id = pad_id_of(pair.tokenizer)
    order = sorted(range(n), key=lambda i: -lengths[i])
    batches = list(_batches(order, batch_size))
    for batch in tqdm(batches, desc="trace", disable=not show_progress):
        ids, attn = pad_right([input_ids[i] for i in batch], pad_id)
        b_cos, b_orig, b_cb = pair_cosines(pair, ids, attn, chosen)
        for row, example in enumerate(batch):
            length = lengths[example]
            cos[example, :, :length] = b_cos[row, :, :length]
            norm_orig[example, :, :length] = b_orig[row, :, :length]
            norm_cb[example, :, :length] = b_cb[row, :, :length]
            mask[example, :length] = True
    ids_lists = [[int(i) for i in seq] for seq in input_ids]
    return CosineTrace(
        cos=cos,
        norm_orig=norm_orig,
        norm_cb=norm_cb,
        tokens=[token_texts(pair.tokenizer, seq) for seq in ids_lists],
        mask=mask,
        layers=chosen,
        response_start=[min(int(s), lengths[i]) for i, s in enumerate(response_starts)],
        prefill_end=list(prefill_ends) if prefill_ends is not None else [None] * n,
        turn_starts=[list(t) for t in turn_starts] if turn_starts is not None else [[0] for _ in range(n)],
        prompts=list(prompts) if prompts is not None else [""] * n,
        responses=list(responses) if responses is not None else [""] * n,
        model_name=_model_name(pair),
        token_ids=ids_lists,
    )


def _model_name(pair: Any) -> str:
    resolved = getattr(pair, "resolved", None)
    return str(getattr(resolved, "spec", "") or getattr(resolved, "name", "") or "")


def warn_over_context(pair: PairLike, lengths: Sequence[int]) -> int:
    """Warn (once per call) when sequences are longer than the model's context; returns how
    many are. Their positions past the context mean nothing; ``max_length`` truncates."""
    context = context_length(pair)
    over = [n for n in lengths if context is not None and n > context]
    if over:
        logger.warning(
            "%d of %d sequences are longer than the model's context of %d tokens (the longest "
            "has %d): their cosines past it are not meaningful; pass max_length=%d to truncate",
            len(over), len(lengths), context, max(over), context,
        )
    return len(over)


def cosine_trace(
    pair: PairLike,
    prompts: Sequence[str | Conversation] | str,
    responses: Sequence[str] | str | None = None,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
    max_length: int | None = None,
) -> CosineTrace:
    """Trace prompts (and optional responses or prefills) through both models of a pair.

    Each prompt (a string or a role/content conversation, possibly multi-turn) is chat-formatted
    with :func:`cbscope.data.encode_chat` and followed by its response; the sequences are batched
    with right padding and attention masks; each batch costs two forward passes that stop at the
    highest requested layer.

    Args:
        pair: The model pair (adapters on = circuit-broken).
        prompts: Prompt strings or conversations (a single string is one example).
        responses: Response or prefill text per prompt (None: the request alone).
        layers: Paper-convention layers (``1 .. n_layers``; default all).
        batch_size: Examples per forward pass.
        show_progress: Show a tqdm bar.
        max_length: Truncate each sequence (response first, see ``encode_chat``).

    Raises:
        LayerError: If a layer is out of range.
        PromptError: If a conversation is malformed.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(responses, str):
        responses = [responses]
    prompts = list(prompts)
    if responses is None:
        responses = [""] * len(prompts)
    responses = list(responses)
    if len(responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    encoded = [
        encode_chat(pair.tokenizer, prompt, response, max_length=max_length)
        for prompt, response in zip(prompts, responses, strict=True)
    ]
    warn_over_context(pair, [len(enc.input_ids) for enc in encoded])
    return cosine_trace_ids(
        pair,
        [enc.input_ids for enc in encoded],
        [enc.response_start for enc in encoded],
        layers=layers,
        turn_starts=[enc.turn_starts for enc in encoded],
        prompts=[p if isinstance(p, str) else as_messages(p) for p in prompts],
        responses=responses,
        batch_size=batch_size,
        show_progress=show_progress,
    )


# ---------------------------------------------------------------------- generation (Figure 6)
@dataclass
class GenerationTrace:
    """A Figure-6 trace: the circuit-broken model's generation traced through both models.

    Attributes:
        trace: One-example trace of request + prefill + generated tokens.
        text_cb: The circuit-broken model's generation (after the prefill).
        text_orig: The original model's generation from the same prompt and prefill.
        prefill: The prefill text ("" if none).
    """

    trace: CosineTrace
    text_cb: str
    text_orig: str
    prefill: str = ""

    def firing_point(
        self, threshold: float = DEFAULT_THRESHOLD, layers: Sequence[int] | None = None
    ) -> FiringPoint | None:
        """The trace's firing point."""
        return self.trace.firing_point(threshold, layers)


@torch.no_grad()
def _greedy_ids(pair: PairLike, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation ids (without the prompt), cut before the first end-of-sequence."""
    tokenizer = pair.tokenizer
    model = pair.generator
    device = pair.device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id_of(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    new = [int(i) for i in out[0, len(ids) :].tolist()]
    stops = {tokenizer.eos_token_id, *(_as_list(getattr(model.generation_config, "eos_token_id", None)))}
    for index, token in enumerate(new):
        if token in stops:
            return new[:index]
    return new


def greedy_continuation(pair: PairLike, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """The greedy continuation ids of ``ids`` (adapters as the pair has them: on, or off inside
    ``pair.original()``), cut before the first end-of-sequence token."""
    return _greedy_ids(pair, list(ids), max_new_tokens) if max_new_tokens > 0 else []


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def trace_generation(
    pair: PairLike,
    prompt: str | Conversation,
    *,
    prefill: str | None = None,
    max_new_tokens: int = 32,
    layers: Sequence[int] | None = None,
) -> GenerationTrace:
    """The paper's Figure-6 recipe: generate with the circuit breaker on, then trace the tokens.

    The circuit-broken model greedily continues the chat-formatted prompt (plus ``prefill``)
    through ``pair.generator`` (KV cache); the token ids of request + prefill + generation are then
    traced through both models as they are (no re-tokenisation). The original model's generation
    from the same input is returned too.

    Args:
        pair: The model pair.
        prompt: Prompt string or conversation.
        prefill: Assistant text forced before generating (a prefilling attack).
        max_new_tokens: Tokens to generate after the prefill (0: trace the prefill only).
        layers: Paper-convention layers to trace (default all).

    Returns:
        A :class:`GenerationTrace`; its trace's ``prefill_end`` is where generation starts.

    Raises:
        PromptError: An empty or over-long prompt or prefill, or one that with
            ``max_new_tokens`` does not fit in the model's context
            (:func:`cbscope.data.check_request_length`), before anything runs.
    """
    prefill = prefill or ""
    encoded = check_request_length(pair.tokenizer, prompt, prefill, context=context_length(pair),
                                   gen_tokens=max(0, max_new_tokens))
    if max_new_tokens > 0:
        new_cb = _greedy_ids(pair, encoded.input_ids, max_new_tokens)
        with pair.original():
            new_orig = _greedy_ids(pair, encoded.input_ids, max_new_tokens)
    else:
        new_cb, new_orig = [], []
    decode = pair.tokenizer.decode
    sequence = encoded.input_ids + new_cb
    trace = cosine_trace_ids(
        pair,
        [sequence],
        [encoded.response_start],
        layers=layers,
        prefill_ends=[len(encoded.input_ids)],
        turn_starts=[encoded.turn_starts],
        prompts=[prompt if isinstance(prompt, str) else as_messages(prompt)],
        responses=[decode(sequence[encoded.response_start :], skip_special_tokens=True).strip()],
    )
    return GenerationTrace(
        trace=trace,
        text_cb=decode(new_cb, skip_special_tokens=True).strip(),
        text_orig=decode(new_orig, skip_special_tokens=True).strip(),
        prefill=prefill,
    )


# ---------------------------------------------------------------------- dataset statistics
@dataclass
class FiringStats:
    """Where and how often a circuit breaker fires over a dataset.

    Attributes:
        rows: One row per example: example (index within its set), set (``"harmful"`` /
            ``"benign"``), prompt, response, fired, pos, pos_after_start, layer, token, cos,
            min_cos.
        threshold: The cosine threshold.
        layers: Paper-convention layers that were checked.
        trace: The harmful examples' trace.
        benign_trace: The benign examples' trace (None without a benign set).
    """

    rows: pd.DataFrame
    threshold: float
    layers: list[int]
    trace: CosineTrace | None = None
    benign_trace: CosineTrace | None = None

    def _set(self, name: str) -> pd.DataFrame:
        return self.rows[self.rows["set"] == name]

    @property
    def n_harmful(self) -> int:
        """Number of harmful examples."""
        return len(self._set("harmful"))

    @property
    def n_benign(self) -> int:
        """Number of benign examples."""
        return len(self._set("benign"))

    @property
    def firing_rate(self) -> float:
        """Share of harmful examples on which the breaker fires."""
        harmful = self._set("harmful")
        return float(harmful["fired"].mean()) if len(harmful) else math.nan

    @property
    def false_fire_rate(self) -> float | None:
        """Share of benign examples on which the breaker fires (None without a benign set)."""
        benign = self._set("benign")
        return float(benign["fired"].mean()) if len(benign) else None

    def position_counts(self, which: str = "harmful") -> pd.Series:
        """Histogram of firing positions (tokens after the response start) of fired examples."""
        fired = self._set(which)
        fired = fired[fired["fired"]]
        return fired["pos_after_start"].astype(int).value_counts().sort_index()

    def layer_counts(self, which: str = "harmful") -> pd.Series:
        """Histogram of firing layers of fired examples."""
        fired = self._set(which)
        fired = fired[fired["fired"]]
        return fired["layer"].astype(int).value_counts().sort_index()

    def sweep(self, categories: Sequence[str | None] | None = None,
              thresholds: Sequence[float] | None = None) -> pd.DataFrame:
        """Firing rate against false-fire rate as the threshold sweeps (exact: an example fires
        at threshold ``t`` exactly when its ``min_cos`` is below ``t``).

        Args:
            categories: A harm category per harmful example (in ``rows`` order): a curve per
                category besides ``"all"`` (every category's harmful examples against every
                benign example). None: ``"all"`` only.
            thresholds: Where to evaluate (default: every example's ``min_cos``, the current
                threshold, -1 and just above the largest value: the whole curve).

        Returns:
            Rows ``group, threshold, firing_rate, false_fire_rate`` (false-fire rate NaN without
            a benign set), thresholds ascending within each group.
        """
        return threshold_sweep(*self._min_cos_sets(categories), thresholds=thresholds,
                               current=self.threshold)

    def aucs(self, categories: Sequence[str | None] | None = None) -> dict[str, float]:
        """The area under each :meth:`sweep` curve: the chance that a harmful example's lowest
        cosine is below a benign one's (ties count half); NaN without a benign set."""
        groups, benign = self._min_cos_sets(categories)
        return {name: roc_auc(values, benign) for name, values in groups.items()}

    def _min_cos_sets(self, categories: Sequence[str | None] | None
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        harmful = self._set("harmful")["min_cos"].to_numpy(dtype=float)
        benign = self._set("benign")["min_cos"].to_numpy(dtype=float)
        groups = {"all": harmful}
        if categories is not None:
            if len(categories) != len(harmful):
                raise ValueError(f"{len(categories)} categories for {len(harmful)} harmful "
                                 "examples")
            for name in dict.fromkeys(str(c) for c in categories if c is not None):
                groups[name] = harmful[[str(c) == name for c in categories]]
        return groups, benign

    def summary(self) -> dict[str, Any]:
        """Headline numbers as plain JSON."""
        harmful = self._set("harmful")
        fired = harmful[harmful["fired"]]
        return {
            "threshold": self.threshold,
            "layers": self.layers,
            "n_harmful": self.n_harmful,
            "n_benign": self.n_benign,
            "firing_rate": self.firing_rate,
            "false_fire_rate": self.false_fire_rate,
            "median_pos_after_start": float(fired["pos_after_start"].median())
            if len(fired)
            else None,
            "position_counts": {int(k): int(v) for k, v in self.position_counts().items()},
            "layer_counts": {int(k): int(v) for k, v in self.layer_counts().items()},
        }


def _fire_rate(values: np.ndarray, threshold: float) -> float:
    finite = values[~np.isnan(values)]
    if not len(values):
        return math.nan
    return float((finite < threshold).sum() / len(values))  # no response: never fires


def threshold_sweep(groups: dict[str, np.ndarray], benign: np.ndarray, *,
                    thresholds: Sequence[float] | None = None,
                    current: float | None = None) -> pd.DataFrame:
    """:meth:`FiringStats.sweep` on arrays of lowest cosines: ``{group: harmful}`` and the
    benign set's (NaN: no response, never fires)."""
    if thresholds is None:
        values = np.concatenate([*groups.values(), benign]) if groups else benign
        values = values[~np.isnan(values)]
        top = float(values.max()) if len(values) else 1.0
        grid = [-1.0, *values.tolist(), float(np.nextafter(top, np.inf))]
        if current is not None:
            grid.append(float(current))
        thresholds = sorted(set(grid))
    rows = []
    for name, values in groups.items():
        for t in thresholds:
            rows.append({"group": name, "threshold": float(t),
                         "firing_rate": _fire_rate(values, t),
                         "false_fire_rate": _fire_rate(benign, t) if len(benign) else math.nan})
    return pd.DataFrame(rows, columns=["group", "threshold", "firing_rate", "false_fire_rate"])


def rates_at(sweep: pd.DataFrame, threshold: float) -> tuple[float, float]:
    """``(firing_rate, false_fire_rate)`` of one group's sweep at ``threshold`` (rates change
    only at the examples' values, all of which the default sweep holds)."""
    part = sweep.sort_values("threshold")
    at = part[part["threshold"] >= threshold]
    row = at.iloc[0] if len(at) else part.iloc[-1]
    return float(row["firing_rate"]), float(row["false_fire_rate"])


def roc_auc(harmful: np.ndarray, benign: np.ndarray) -> float:
    """P(harmful lowest cosine < benign lowest cosine) + P(equal) / 2: the area under the
    firing-rate vs false-fire-rate curve (examples without a response count as cosine +inf,
    never firing). NaN when a set is empty."""
    if not len(harmful) or not len(benign):
        return math.nan
    h = np.nan_to_num(np.asarray(harmful, dtype=float), nan=np.inf)[:, None]
    b = np.nan_to_num(np.asarray(benign, dtype=float), nan=np.inf)[None, :]
    return float((h < b).mean() + 0.5 * (h == b).mean())


def _prompt_response(example: ChatExample | dict[str, Any]) -> tuple[str | Conversation, str]:
    if isinstance(example, ChatExample):
        prompt: str | Conversation = (
            example.messages if len(example.messages) > 1 else example.prompt
        )
        return prompt, example.response
    if isinstance(example, dict):
        if "prompt" not in example:
            raise ValueError(f"example needs a 'prompt' key, got keys {sorted(example)}")
        return example["prompt"], str(example.get("response", "") or "")
    raise TypeError(f"examples must be ChatExample or dict, not {type(example).__name__}")


def _prompt_text(prompt: str | Conversation) -> str:
    return prompt if isinstance(prompt, str) else as_messages(prompt)[-1]["content"]


def _firing_rows(trace: CosineTrace, name: str, threshold: float) -> list[dict[str, Any]]:
    rows = []
    for example in range(len(trace)):
        point = trace.firing_point(threshold, None, example)
        rows.append(
            {
                "example": example,
                "set": name,
                "prompt": _prompt_text(trace.prompts[example]),
                "response": trace.responses[example],
                "fired": point is not None,
                "pos": point.pos if point else None,
                "pos_after_start": point.pos_after_start if point else None,
                "layer": point.layer if point else None,
                "token": point.token if point else None,
                "cos": point.cos if point else None,
                "min_cos": trace.min_cos(example),
            }
        )
    return rows


def firing_stats(
    pair: PairLike,
    examples: Sequence[ChatExample | dict[str, Any]],
    threshold: float = DEFAULT_THRESHOLD,
    *,
    layers: Sequence[int] | None = None,
    benign: Sequence[ChatExample | dict[str, Any]] | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
) -> FiringStats:
    """Firing rate, position and layer distributions over harmful examples (and benign ones).

    The breaker *fires* on an example when some response token's cosine falls below
    ``threshold`` at one of ``layers`` (:meth:`CosineTrace.firing_point`).

    Args:
        pair: The model pair.
        examples: Harmful examples (``ChatExample`` or dicts with ``prompt``/``response``).
        threshold: Cosine threshold.
        layers: Paper-convention layers to trace and check (default all).
        benign: Benign examples: their firing rate is the false-fire rate.
        batch_size: Examples per forward pass.
        show_progress: Show tqdm bars.
    """
    threshold = check_threshold(threshold)
    if not examples:
        raise ValueError("firing_stats needs at least one example")
    chosen = validate_layers(range(1, pair.n_layers + 1) if layers is None else layers, pair.n_layers)
    rows: list[dict[str, Any]] = []
    traces: dict[str, CosineTrace] = {}
    for name, items in (("harmful", examples), ("benign", benign or [])):
        if not items:
            continue
        pairs = [_prompt_response(item) for item in items]
        empty = sum(1 for _, response in pairs if not response)
        if empty:
            logger.warning("%d %s examples have no response: they cannot fire", empty, name)
        traces[name] = cosine_trace(
            pair,
            [p for p, _ in pairs],
            [r for _, r in pairs],
            layers=chosen,
            batch_size=batch_size,
            show_progress=show_progress,
        )
        rows.extend(_firing_rows(traces[name], name, threshold))
    return FiringStats(
        rows=pd.DataFrame(rows),
        threshold=float(threshold),
        layers=chosen,
        trace=traces.get("harmful"),
        benign_trace=traces.get("benign"),
    )
