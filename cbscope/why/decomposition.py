"""Exact decomposition of the rerouting into per-block attention and MLP contributions.

For Llama-style pre-norm blocks the paper-layer-``L`` residual stream is a sum,
``h_L = embed + sum_{b < L} (attn_out_b + mlp_out_b)`` (``blocks.0.hook_resid_pre`` and the
blocks' ``hook_attn_out`` / ``hook_mlp_out``). So the rerouting delta
``D_L = h^cb_L - h^orig_L`` splits exactly into component deltas ``d_c`` (``embed``,
``attn.{b}``, ``mlp.{b}``, ``b`` the TransformerLens block index), and per token

- ``share``: ``s_c = <d_c, D_L> / |D_L|^2``; the shares sum to 1;
- ``orth_share``: the same for the part that turns the vector away from the original one,
  ``d_c`` and ``D_L`` projected off ``h^orig_L``; these sum to 1 too;
- ``parallel``: ``<d_c, h^orig_L / |h^orig_L|>``, the component's change along the original
  direction (negative values shrink the original component).

Per block, the *total* effect is ``attn.{b} + mlp.{b}``; its *direct* part is what the block's
own LoRA does with the block's input held at the circuit-broken value,
``f_b^{LoRA on}(h^cb_b) - f_b^{LoRA off}(h^cb_b)``; the rest (total minus direct) comes from
the inputs that earlier blocks changed: the block outputs of an adapters-off forward whose every
block input is replaced by the circuit-broken one at ``blocks.{b}.hook_resid_pre``.
:func:`capture_models` runs the original, the circuit-broken and that patched forward as three
rows of one batched forward (per-row LoRA scale 0, 1, 0).

Each component is what the attention or MLP *added* to the model's float32 residual stream
(``hook_resid_mid - hook_resid_pre``, ``hook_resid_post - hook_resid_mid``, in float64; see
:meth:`~cbscope.why.tokens.Captured.added`). It equals ``hook_attn_out`` / ``hook_mlp_out`` up to
the rounding of the model's own float32 addition (about 1e-7 of ``|h|``), and the increments
telescope, so the components sum to ``D_L`` to float64 precision at every token, including
tokens the breaker barely moves (where that rounding would otherwise be a large part of
``D_L``). Everything is computed in float64 from the models' float32 activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from cbscope import native_paths
from cbscope.why.tokens import (
    Captured,
    ExplainError,
    TokenSeq,
    capture,
    check_layers,
    check_threshold,
    cosine,
    find_focus,
    require_adapter,
)

#: Below this |D|^2 / |h^orig|^2 the delta is rounding noise and its shares are NaN.
NOISE_RATIO = 1e-12


def component_names(n_blocks: int) -> list[str]:
    """``["embed", "attn.0", "mlp.0", ..., "attn.{n-1}", "mlp.{n-1}"]``."""
    names = ["embed"]
    for block in range(n_blocks):
        names += [f"attn.{block}", f"mlp.{block}"]
    return names


def _nested(t: Tensor) -> list[Any]:
    return [[None if math.isnan(v) else round(v, 6) for v in row] for row in t.tolist()]


def _tensor(rows: list[Any]) -> Tensor:
    return torch.tensor([[math.nan if v is None else v for v in row] for row in rows],
                        dtype=torch.float32)


@dataclass
class Decomposition:
    """The rerouting delta at one layer, split into the embedding and every block's attention
    and MLP output (see the module docstring).

    Attributes:
        layer: Paper-convention layer ``L``.
        tokens: Token texts.
        token_ids: The exact ids traced.
        response_start: First response token.
        components: ``embed``, ``attn.{b}``, ``mlp.{b}`` for ``b < L``.
        share: ``[component, pos]`` share of ``|D_L|^2`` (NaN where ``D_L`` is rounding noise).
        orth_share: ``[component, pos]`` share of the part orthogonal to ``h^orig_L``.
        parallel: ``[component, pos]`` change along the original direction.
        delta_norm: ``[pos]`` ``|D_L|``.
        orig_norm: ``[pos]`` ``|h^orig_L|``.
        cos: ``[pos]`` cosine of the two residual streams at ``L``.
        error: ``[pos]`` ``|sum_c d_c - D_L| / |D_L|`` (the decomposition's exactness).
        direct_attn: ``[block, pos]`` share of the block's direct (own-LoRA) attention part.
        direct_mlp: ``[block, pos]`` the same for the MLP.
        focus_pos: The token the view centres on (the firing point), if any.
    """

    layer: int
    tokens: list[str]
    token_ids: list[int]
    response_start: int
    components: list[str]
    share: Float[Tensor, "component pos"]
    orth_share: Float[Tensor, "component pos"]
    parallel: Float[Tensor, "component pos"]
    delta_norm: Float[Tensor, " pos"]
    orig_norm: Float[Tensor, " pos"]
    cos: Float[Tensor, " pos"]
    error: Float[Tensor, " pos"]
    direct_attn: Float[Tensor, "block pos"]
    direct_mlp: Float[Tensor, "block pos"]
    focus_pos: int | None = None

    @property
    def n_blocks(self) -> int:
        """Blocks below the layer."""
        return self.layer

    def _rows(self, kind: str) -> Tensor:
        return self.share[[self.components.index(f"{kind}.{b}") for b in range(self.n_blocks)]]

    @property
    def attn_share(self) -> Float[Tensor, "block pos"]:
        """Each block's attention share."""
        return self._rows("attn")

    @property
    def mlp_share(self) -> Float[Tensor, "block pos"]:
        """Each block's MLP share."""
        return self._rows("mlp")

    @property
    def block_total(self) -> Float[Tensor, "block pos"]:
        """Each block's total share (attention + MLP)."""
        return self.attn_share + self.mlp_share

    @property
    def block_direct(self) -> Float[Tensor, "block pos"]:
        """Each block's direct share (its own LoRA, input held at the circuit-broken value)."""
        return self.direct_attn + self.direct_mlp

    @property
    def block_indirect(self) -> Float[Tensor, "block pos"]:
        """Each block's share that comes from inputs changed by earlier blocks."""
        return self.block_total - self.block_direct

    def max_error(self, positions: Sequence[int] | None = None, *, min_ratio: float = 0.0) -> float:
        """The largest per-token relative error ``|sum_c d_c - D| / |D|``.

        Args:
            positions: Tokens to look at (default: all).
            min_ratio: Only tokens where the breaker moves the stream by at least this much,
                ``|D| >= min_ratio * |h^orig|``. Where ``D`` is tiny (e.g. the first token at a
                late layer) the float32 rounding of the model's own residual additions,
                ~1e-7 of ``|h|``, is a larger part of ``|D|``.
        """
        keep = ~torch.isnan(self.error) & (self.delta_norm >= min_ratio * self.orig_norm)
        if positions is not None:
            chosen = torch.zeros_like(keep)
            chosen[list(positions)] = True
            keep &= chosen
        values = self.error[keep]
        return float(values.max()) if values.numel() else 0.0

    def total_error(self) -> float:
        """``|sum_c d_c - D| / |D|`` over all tokens at once (Frobenius norms)."""
        keep = ~torch.isnan(self.error)
        absolute = (self.error[keep].double() * self.delta_norm[keep].double()).pow(2).sum()
        return float(absolute.sqrt() / self.delta_norm[keep].double().pow(2).sum().sqrt())

    def kind_shares(self, pos: int | None = None) -> dict[str, float]:
        """Embedding, attention and MLP shares at ``pos`` (default: the focus token; ``None``
        without one: the mean over response tokens, else over all tokens)."""
        if pos is None:
            pos = self.focus_pos
        cols = [pos] if pos is not None else list(
            range(self.response_start if self.response_start < len(self.tokens) else 0,
                  len(self.tokens)))
        share = self.share[:, cols].double()
        return {
            "embed": float(share[0].nanmean()),
            "attn": float(self.attn_share[:, cols].double().sum(0).nanmean()),
            "mlp": float(self.mlp_share[:, cols].double().sum(0).nanmean()),
        }

    def top_components(self, pos: int | None = None, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` components with the largest share at ``pos`` (default: the focus token)."""
        pos = self.focus_pos if pos is None else pos
        if pos is None:
            raise ExplainError("give a position: this decomposition has no focus token")
        column = torch.nan_to_num(self.share[:, pos], nan=-math.inf)
        order = torch.argsort(column, descending=True)[:k]
        return [(self.components[int(i)], float(self.share[int(i), pos])) for i in order]

    def to_dataframe(self) -> pd.DataFrame:
        """Long form: one row per (component, token): component, block, kind, pos, token,
        segment, share, orth_share, parallel."""
        rows = []
        for c, name in enumerate(self.components):
            kind, _, block = name.partition(".")
            for pos, token in enumerate(self.tokens):
                rows.append({
                    "component": name, "block": int(block) if block else None, "kind": kind,
                    "pos": pos, "token": token,
                    "segment": "response" if pos >= self.response_start else "request",
                    "share": float(self.share[c, pos]),
                    "orth_share": float(self.orth_share[c, pos]),
                    "parallel": float(self.parallel[c, pos]),
                })
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (``share`` etc. as ``[component][token]`` lists; NaN as null)."""
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "response_start": self.response_start,
            "components": self.components,
            "share": _nested(self.share),
            "orth_share": _nested(self.orth_share),
            "parallel": _nested(self.parallel),
            "delta_norm": _nested(self.delta_norm[None])[0],
            "orig_norm": _nested(self.orig_norm[None])[0],
            "cos": _nested(self.cos[None])[0],
            "error": _nested(self.error[None])[0],
            "direct_attn": _nested(self.direct_attn),
            "direct_mlp": _nested(self.direct_mlp),
            "focus_pos": self.focus_pos,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decomposition:
        """Inverse of :meth:`to_dict`."""
        return cls(
            layer=int(data["layer"]), tokens=list(data["tokens"]),
            token_ids=[int(i) for i in data["token_ids"]],
            response_start=int(data["response_start"]), components=list(data["components"]),
            share=_tensor(data["share"]), orth_share=_tensor(data["orth_share"]),
            parallel=_tensor(data["parallel"]), delta_norm=_tensor([data["delta_norm"]])[0],
            orig_norm=_tensor([data["orig_norm"]])[0], cos=_tensor([data["cos"]])[0],
            error=_tensor([data["error"]])[0], direct_attn=_tensor(data["direct_attn"]),
            direct_mlp=_tensor(data["direct_mlp"]), focus_pos=data.get("focus_pos"),
        )


def _stack(captured: Captured, layer: int, row: int) -> Float[Tensor, "component pos d_model"]:
    parts = [captured.embed[row].double()]
    for block in range(layer):
        parts += [captured.added("attn", block)[row], captured.added("mlp", block)[row]]
    return torch.stack(parts)


def direct_outputs(pair: Any, seq: TokenSeq, cb: Captured, layer: int) -> Captured:
    """Each block's output with the adapters off and the block's input replaced by the
    circuit-broken one (``blocks.{b}.hook_resid_pre``), for blocks ``0 .. layer - 1``: one
    forward, stopped after block ``layer - 1``."""
    inputs = [cb.embed[0]] + [cb.resid[b][0] for b in range(layer - 1)]

    def patch(block: int):
        def hook(activation: Tensor, hook: Any) -> Tensor:
            return inputs[block][None].to(activation.dtype)

        return hook

    hooks = [(f"blocks.{b}.hook_resid_pre", patch(b)) for b in range(layer)]
    with pair.original():
        return capture(pair, seq.tensor(pair.device), layer, extra_hooks=hooks)


def _row(captured: Captured, index: int) -> Captured:
    def pick(t: Tensor) -> Tensor:
        return t[index : index + 1]

    return Captured(pick(captured.embed), [pick(t) for t in captured.attn],
                    [pick(t) for t in captured.mlp], [pick(t) for t in captured.resid],
                    [pick(t) for t in captured.mid])


def capture_models(
    pair: Any, seq: TokenSeq, up_to: int, *, direct: bool = True
) -> tuple[Captured, Captured, Captured | None]:
    """The original model's, the circuit-broken model's and (``direct``) the adapters-off
    patched forward's residual summands up to layer ``up_to``.

    When every LoRA layer runs cbscope's lean forward, all of them come from one batched
    forward: the rows' LoRA updates are scaled by 0 (original), 1 (circuit-broken, the pair's
    current state) and 0 (patched: at every ``blocks.{b}.hook_resid_pre`` its input is replaced
    by the circuit-broken row's), see :func:`cbscope.native_paths.lora_row_scale`. Otherwise
    they are separate forwards.

    Returns:
        ``(original, circuit_broken, patched or None)``.
    """
    layers = pair._modules().lora_layers
    if not native_paths.row_scale_supported(layers, pair.dtype):
        cb = capture(pair, seq.tensor(pair.device), up_to)
        with pair.original():
            orig = capture(pair, seq.tensor(pair.device), up_to)
        return orig, cb, direct_outputs(pair, seq, cb, up_to) if direct else None
    rows = 3 if direct else 2
    scale = torch.tensor([0.0, 1.0, 0.0][:rows], device=pair.device)

    def copy_cb_row(activation: Tensor, hook: Any) -> Tensor:
        activation = activation.clone()
        activation[2] = activation[1]
        return activation

    hooks = [(f"blocks.{b}.hook_resid_pre", copy_cb_row) for b in range(1, up_to)] if direct else []
    ids = seq.tensor(pair.device).repeat(rows, 1)
    with native_paths.lora_row_scale(layers, scale):
        both = capture(pair, ids, up_to, attention_mask=torch.ones_like(ids), extra_hooks=hooks)
    return _row(both, 0), _row(both, 1), _row(both, 2) if direct else None


def decompose_captured(
    seq: TokenSeq, orig: Captured, cb: Captured, off: Captured | None, layer: int,
    focus_pos: int | None = None,
) -> Decomposition:
    """:class:`Decomposition` from captured forwards (``off``: see :func:`direct_outputs`)."""
    if not 1 <= layer <= min(orig.n_blocks, cb.n_blocks):
        raise ExplainError(f"layer {layer} was not captured (blocks: {orig.n_blocks})")
    # float64 on the CPU: exact enough to measure float32 rounding, and device-independent
    d = (_stack(cb, layer, 0) - _stack(orig, layer, 0)).cpu()  # [component, pos, d]
    h_orig = orig.resid[layer - 1][0].double().cpu()
    h_cb = cb.resid[layer - 1][0].double().cpu()
    delta = h_cb - h_orig
    dd = (delta * delta).sum(-1)
    noise = dd <= NOISE_RATIO * (h_orig * h_orig).sum(-1)
    safe = torch.where(noise, torch.ones_like(dd), dd)
    share = (d * delta).sum(-1) / safe
    unit = h_orig / torch.linalg.vector_norm(h_orig, dim=-1, keepdim=True).clamp_min(1e-30)
    parallel = (d * unit).sum(-1)
    d_orth = d - parallel[..., None] * unit
    delta_orth = delta - (delta * unit).sum(-1, keepdim=True) * unit
    oo = (delta_orth * delta_orth).sum(-1)
    orth_noise = noise | (oo <= NOISE_RATIO * (h_orig * h_orig).sum(-1))
    orth_share = (d_orth * delta_orth).sum(-1) / torch.where(orth_noise, torch.ones_like(oo), oo)
    error = torch.linalg.vector_norm(d.sum(0) - delta, dim=-1) / safe.sqrt()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    share = torch.where(noise, nan, share)
    orth_share = torch.where(orth_noise, nan, orth_share)
    error = torch.where(noise, nan, error)
    if off is not None:
        # the patched forward's block inputs are the circuit-broken ones (replaced at
        # hook_resid_pre, after its own hook_resid_post was captured), so its attention added
        # off.mid - cb.pre and its MLP off.resid - off.mid
        attn_direct = torch.stack([cb.mid[b][0].double() - off.mid[b][0].double()
                                   for b in range(layer)]).cpu()
        mlp_direct = torch.stack([cb.added("mlp", b)[0] - off.added("mlp", b)[0]
                                  for b in range(layer)]).cpu()
        direct_attn = torch.where(noise, nan, (attn_direct * delta).sum(-1) / safe)
        direct_mlp = torch.where(noise, nan, (mlp_direct * delta).sum(-1) / safe)
    else:
        direct_attn = torch.full((layer, len(seq)), math.nan, dtype=torch.float64)
        direct_mlp = direct_attn.clone()
    return Decomposition(
        layer=layer,
        tokens=list(seq.tokens),
        token_ids=list(seq.ids),
        response_start=seq.response_start,
        components=component_names(layer),
        share=share.float(),
        orth_share=orth_share.float(),
        parallel=parallel.float(),
        delta_norm=dd.sqrt().float(),
        orig_norm=torch.linalg.vector_norm(h_orig, dim=-1).float(),
        cos=cosine(h_orig, h_cb),
        error=error.float(),
        direct_attn=direct_attn.float(),
        direct_mlp=direct_mlp.float(),
        focus_pos=focus_pos,
    )


def decompose(
    pair: Any,
    seq: TokenSeq,
    layer: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    threshold: float = 0.5,
    direct: bool = True,
) -> Decomposition:
    """Split the rerouting delta at paper layer ``layer`` into per-block, per-component parts.

    Args:
        pair: The model pair (adapters on = circuit-broken).
        seq: The example (:func:`cbscope.why.encode`).
        layer: Paper-convention layer ``L`` (default: the layer of the firing point at
            ``layers``, see :func:`cbscope.why.tokens.find_focus`).
        layers: Layers the firing point is looked for at (default: the adapter's target layers).
        threshold: Firing threshold.
        direct: Also split each block's effect into its direct part and the part from changed
            inputs (one more, batched, forward).

    Raises:
        ExplainError: No adapter, or a bad threshold.
        LayerError: A layer outside the model.
    """
    require_adapter(pair)
    chosen = check_layers(pair, layers)
    threshold = check_threshold(threshold)
    if layer is not None:
        check_layers(pair, [layer])
    top = max(chosen + ([layer] if layer is not None else []))
    orig, cb, off = capture_models(pair, seq, top, direct=direct)
    cos = torch.stack([cosine(orig.resid[lay - 1][0], cb.resid[lay - 1][0]) for lay in chosen])
    focus = find_focus(cos, chosen, seq, chosen, threshold)
    return decompose_captured(seq, orig, cb, off, focus.layer if layer is None else layer,
                              focus.pos)
