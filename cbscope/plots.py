"""Plotly figures of cosine traces, firing statistics and probe scores.

One module shared by the Streamlit app, the notebooks and ``cbscope trace --out page.html``.
Every function returns a :class:`plotly.graph_objects.Figure` whose traces have stable names, so
callers (and tests) can find them again:

- :func:`figure6_lines`: traces ``"layer {l}"``, the marker ``"firing point"``; vertical lines
  (layout shapes) named ``"response start"`` and ``"prefill end"`` (and ``"turn 2 (assistant)"``,
  ``"turn 3 (user)"`` ... at the message boundaries of a multi-turn conversation), the horizontal
  ``"threshold"``;
- :func:`cosine_heatmap`: one heatmap named ``"cosine"``;
- :func:`norm_lines`: ``"layer {l} original"`` and ``"layer {l} circuit-broken"``;
- :func:`token_strip`: one heatmap named ``"lowest cosine"``;
- :func:`firing_histogram`: bars ``"harmful"`` and ``"benign"``;
- :func:`probe_scores_figure`: ``"probe score"`` and the ``"threshold"`` line;
- why does it fire? (:mod:`cbscope.why`): :func:`share_heatmap` (``"share"``),
  :func:`block_share_heatmap` (``"share at token"``), :func:`block_effects` (``"direct (own
  LoRA)"``, ``"from changed inputs"``), :func:`patching_bars` (``"necessity (block off)"``,
  ``"sufficiency (only block on)"``), :func:`attribution_strip` (``"attribution"``),
  :func:`logit_lens_heatmap` (``"logit lens"``), :func:`pca_scatter` (``"harmful original"``
  ...), :func:`direction_lines`.

Hover texts name tokens as ``token (pos N)``.

Token strings are HTML-escaped for display (plotly renders ``<assistant>`` as a tag otherwise).
This module never imports the trainer.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from cbscope.layers import figure6_layers
from cbscope.trace import DEFAULT_THRESHOLD, CosineTrace, FiringStats

LAYER_COLORS = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
COSINE_SCALE = "RdBu"


def display_token(token: str) -> str:
    """A token as it should appear in a figure: HTML-escaped, spaces and newlines made visible."""
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    if shown.strip() == "":
        shown = "␣" * max(1, len(shown)) if shown else "∅"
    return html.escape(shown.strip() if shown.strip() else shown, quote=False)


def _example(trace: CosineTrace, example: int) -> CosineTrace:
    return trace.select(example)


def _plot_layers(trace: CosineTrace, layers: Sequence[int] | None) -> list[int]:
    """Requested layers, else the Figure-6 defaults that were traced, else every traced layer."""
    if layers is not None:
        index = trace.layer_indices(layers)
        return [trace.layers[i] for i in index]
    n_layers = max(trace.layers)
    defaults = [layer for layer in figure6_layers(n_layers) if layer in trace.layers]
    return defaults or list(trace.layers)


def _token_axis(fig: go.Figure, tokens: Sequence[str], *, row: int | None = None) -> None:
    positions = list(range(len(tokens)))
    labels = [display_token(t) for t in tokens]
    kwargs: dict[str, Any] = {"row": row, "col": 1} if row is not None else {}
    fig.update_xaxes(
        tickmode="array",
        tickvals=positions,
        ticktext=labels,
        tickangle=-60,
        title_text="token",
        **kwargs,
    )


def _vline(fig: go.Figure, x: float, name: str, color: str, dash: str) -> None:
    fig.add_shape(
        type="line",
        name=name,
        x0=x,
        x1=x,
        y0=0,
        y1=1,
        xref="x",
        yref="paper",
        line={"color": color, "dash": dash, "width": 1.5},
    )
    fig.add_annotation(
        x=x, y=1.0, xref="x", yref="paper", text=name, showarrow=False, yanchor="bottom",
        font={"size": 10, "color": color},
    )


def _segment_markers(fig: go.Figure, single: CosineTrace) -> None:
    turns = single.turn_starts[0] if single.turn_starts else []
    prompt = single.prompts[0] if single.prompts else ""
    roles = [str(m.get("role", "")) for m in prompt] if isinstance(prompt, list) else []
    for number, turn_start in enumerate(turns[1:], start=2):
        if 0 < turn_start < single.lengths[0]:
            role = f" ({roles[number - 1]})" if len(roles) >= number else ""
            _vline(fig, turn_start - 0.5, f"turn {number}{role}", "#9467bd", "dot")
    start = single.response_start[0]
    length = single.lengths[0]
    if start < length:
        _vline(fig, start - 0.5, "response start", "black", "dash")
    prefill_end = single.prefill_end[0]
    if prefill_end is not None and prefill_end != start:
        _vline(fig, prefill_end - 0.5, "prefill end", "#7f7f7f", "dot")


def _hover_tokens(tokens: Sequence[str]) -> list[str]:
    """``"token (pos N)"`` per token. The position is written into the text: plotly's ``%{x}``
    on an axis with token tick labels shows the tick label, not the number."""
    return [f"{display_token(t)} (pos {p})" for p, t in enumerate(tokens)]


def figure6_lines(
    trace: CosineTrace,
    example: int = 0,
    layers: Sequence[int] | None = None,
    threshold: float | None = None,
) -> go.Figure:
    """Cosine against token position at a few layers: the paper's Figure 6.

    Args:
        trace: A cosine trace.
        example: Which example to draw.
        layers: Paper-convention layers (default :func:`cbscope.layers.figure6_layers`, if traced).
        threshold: Cosine threshold for the firing point and the dashed line (default 0.5).

    Returns:
        Lines ``"layer {l}"``, a ``"firing point"`` marker (absent if the breaker does not fire),
        vertical lines at the response start and the prefill end, a horizontal threshold line.
    """
    single = _example(trace, example)
    chosen = _plot_layers(single, layers)
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    tokens = single.tokens[0]
    positions = np.arange(len(tokens))
    hover = _hover_tokens(tokens)
    fig = go.Figure()
    for k, layer in enumerate(chosen):
        index = single.layers.index(layer)
        fig.add_trace(
            go.Scatter(
                x=positions,
                y=single.cos[0, index].numpy(),
                mode="lines+markers",
                name=f"layer {layer}",
                line={"color": LAYER_COLORS[k % len(LAYER_COLORS)], "width": 2},
                marker={"size": 4},
                customdata=hover,
                hovertemplate=f"layer {layer}<br>%{{customdata}}<br>cos %{{y:.3f}}"
                "<extra></extra>",
            )
        )
    point = single.firing_point(threshold, chosen)
    if point is not None:
        fig.add_trace(
            go.Scatter(
                x=[point.pos],
                y=[point.cos],
                mode="markers",
                name="firing point",
                marker={"symbol": "x", "size": 14, "color": "black", "line": {"width": 2}},
                hovertemplate=html.escape(point.describe(), quote=False) + "<extra></extra>",
            )
        )
    fig.add_shape(
        type="line",
        name="threshold",
        x0=0,
        x1=1,
        xref="paper",
        y0=threshold,
        y1=threshold,
        yref="y",
        line={"color": "#999999", "dash": "dash", "width": 1},
    )
    _segment_markers(fig, single)
    _token_axis(fig, tokens)
    fig.update_yaxes(title_text="cos(original, circuit-broken)", range=[-1.05, 1.05])
    title = "Cosine between original and circuit-broken residual streams"
    if point is not None:
        title += f"<br><sup>{html.escape(point.describe(), quote=False)}</sup>"
    fig.update_layout(title=title, hovermode="closest")
    return fig


def cosine_heatmap(trace: CosineTrace, example: int = 0) -> go.Figure:
    """Layer x token heatmap of the cosine; hover shows token, layer, cosine and both norms."""
    single = _example(trace, example)
    tokens = single.tokens[0]
    n_layers, n_pos = single.cos.shape[1], single.cos.shape[2]
    hover_tokens = np.array(_hover_tokens(tokens), dtype=object)
    custom = np.empty((n_layers, n_pos, 3), dtype=object)
    custom[:, :, 0] = hover_tokens[None, :]
    custom[:, :, 1] = single.norm_orig[0].numpy()
    custom[:, :, 2] = single.norm_cb[0].numpy()
    fig = go.Figure(
        go.Heatmap(
            z=single.cos[0].numpy(),
            x=np.arange(n_pos),
            y=[f"layer {layer}" for layer in single.layers],
            customdata=custom,
            zmin=-1,
            zmax=1,
            colorscale=COSINE_SCALE,
            colorbar={"title": {"text": "cos"}},
            name="cosine",
            hovertemplate="%{customdata[0]}<br>%{y}<br>cos %{z:.3f}"
            "<br>norm original %{customdata[1]:.2f}<br>norm circuit-broken %{customdata[2]:.2f}"
            "<extra></extra>",
        )
    )
    _segment_markers(fig, single)
    _token_axis(fig, tokens)
    fig.update_yaxes(title_text="layer")
    fig.update_layout(title="Cosine per layer and token")
    return fig


def norm_lines(
    trace: CosineTrace, example: int = 0, layers: Sequence[int] | None = None
) -> go.Figure:
    """Residual-stream norms of the original (solid) and circuit-broken (dashed) model."""
    single = _example(trace, example)
    chosen = _plot_layers(single, layers)
    tokens = single.tokens[0]
    positions = np.arange(len(tokens))
    hover = _hover_tokens(tokens)
    fig = go.Figure()
    for k, layer in enumerate(chosen):
        index = single.layers.index(layer)
        color = LAYER_COLORS[k % len(LAYER_COLORS)]
        for which, values, dash in (
            ("original", single.norm_orig, "solid"),
            ("circuit-broken", single.norm_cb, "dash"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=positions,
                    y=values[0, index].numpy(),
                    mode="lines",
                    name=f"layer {layer} {which}",
                    line={"color": color, "dash": dash},
                    customdata=hover,
                    hovertemplate=f"layer {layer} {which}<br>%{{customdata}}"
                    "<br>norm %{y:.2f}<extra></extra>",
                )
            )
    _segment_markers(fig, single)
    _token_axis(fig, tokens)
    fig.update_yaxes(title_text="L2 norm of the residual stream")
    fig.update_layout(title="Residual-stream norms")
    return fig


def token_strip(trace: CosineTrace, example: int = 0) -> go.Figure:
    """The tokens in one row, coloured by their lowest cosine across the traced layers."""
    single = _example(trace, example)
    tokens = single.tokens[0]
    lowest = single.cos[0].min(dim=0).values.numpy()
    argmin = single.cos[0].argmin(dim=0).numpy()
    layer_of_min = np.asarray(single.layers)[argmin]
    labels = [display_token(t) for t in tokens]
    fig = go.Figure(
        go.Heatmap(
            z=[lowest],
            x=np.arange(len(tokens)),
            y=["tokens"],
            text=[labels],
            texttemplate="%{text}",
            customdata=[[[label, int(layer)] for label, layer in
                         zip(_hover_tokens(tokens), layer_of_min, strict=True)]],
            zmin=-1,
            zmax=1,
            colorscale=COSINE_SCALE,
            colorbar={"title": {"text": "lowest cos"}},
            name="lowest cosine",
            hovertemplate="%{customdata[0]}<br>lowest cos %{z:.3f} at layer %{customdata[1]}"
            "<extra></extra>",
            xgap=1,
        )
    )
    _segment_markers(fig, single)
    fig.update_xaxes(showticklabels=False, title_text="token")
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title="Tokens coloured by their lowest cosine across layers", height=220)
    return fig


def firing_histogram(stats: FiringStats, by: str = "position") -> go.Figure:
    """Where the breaker fires: a histogram over firing positions (or layers).

    Args:
        stats: :func:`cbscope.trace.firing_stats` output.
        by: ``"position"`` (tokens after the response start) or ``"layer"``.

    Returns:
        Bars ``"harmful"`` and (with a benign set that fired) ``"benign"``.
    """
    if by not in ("position", "layer"):
        raise ValueError(f"by must be 'position' or 'layer', not {by!r}")
    counts = stats.position_counts if by == "position" else stats.layer_counts
    fig = go.Figure()
    for which, color in (("harmful", "#d62728"), ("benign", "#1f77b4")):
        if which == "benign" and stats.n_benign == 0:
            continue
        series = counts(which)
        fig.add_trace(
            go.Bar(
                x=series.index.to_numpy(),
                y=series.to_numpy(),
                name=which,
                marker={"color": color},
                opacity=0.75,
            )
        )
    rate = stats.firing_rate
    title = f"Firing {by} (threshold {stats.threshold:g}): fires on {_pct(rate)} of harmful"
    if stats.false_fire_rate is not None:
        title += f", {_pct(stats.false_fire_rate)} of benign"
    fig.update_layout(
        title=title,
        barmode="overlay",
        xaxis_title="tokens after the response start" if by == "position" else "layer",
        yaxis_title="examples",
    )
    return fig


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.0f}%"


def probe_scores_figure(
    tokens: Sequence[str], scores: Any, threshold: float | None = None
) -> go.Figure:
    """Per-token harmfulness-probe scores (to show beside a cosine trace).

    Args:
        tokens: Token strings (e.g. ``trace.tokens[0]``).
        scores: One score per token (tensor, array or list).
        threshold: The probe's threshold (a dashed line), if any.
    """
    values = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=float)
    if values.shape != (len(tokens),):
        raise ValueError(f"{len(tokens)} tokens but scores of shape {values.shape}")
    positions = np.arange(len(tokens))
    fig = go.Figure(
        go.Scatter(
            x=positions,
            y=values,
            mode="lines+markers",
            name="probe score",
            line={"color": "#9467bd"},
            customdata=_hover_tokens(tokens),
            hovertemplate="%{customdata}<br>score %{y:.3f}<extra></extra>",
        )
    )
    if threshold is not None:
        fig.add_shape(
            type="line",
            name="threshold",
            x0=0,
            x1=1,
            xref="paper",
            y0=threshold,
            y1=threshold,
            yref="y",
            line={"color": "#999999", "dash": "dash"},
        )
        above = values > threshold
        if above.any():
            fig.add_trace(
                go.Scatter(
                    x=positions[above],
                    y=values[above],
                    mode="markers",
                    name="above threshold",
                    marker={"color": "black", "symbol": "x", "size": 10},
                    hoverinfo="skip",
                )
            )
    _token_axis(fig, tokens)
    fig.update_yaxes(title_text="probe score", range=[-0.05, 1.05])
    fig.update_layout(title="Harmfulness probe score per token")
    return fig


def save_html(
    fig: go.Figure | Sequence[go.Figure],
    path: str | os.PathLike[str],
    *,
    title: str = "cbscope",
) -> Path:
    """Write one figure, or several on one page, as standalone HTML that works offline.

    plotly.js is embedded inline once (no CDN), so the file opens without a network.
    """
    figures = [fig] if isinstance(fig, go.Figure) else list(fig)
    if not figures:
        raise ValueError("no figures to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(figures) == 1:
        figures[0].write_html(str(path), include_plotlyjs=True, full_html=True)
        return path
    parts = [
        pio.to_html(figure, include_plotlyjs=(index == 0), full_html=False)
        for index, figure in enumerate(figures)
    ]
    page = (
        "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\" />"
        f"<title>{html.escape(title)}</title></head>\n<body>\n"
        + "\n".join(f"<div>{part}</div>" for part in parts)
        + "\n</body>\n</html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------- why does it fire?
SHARE_SCALE = "RdBu_r"


def share_heatmap(decomposition: Any) -> go.Figure:
    """Component x token heatmap of the decomposition's shares (one heatmap ``"share"``).

    Rows are ``embed``, ``attn.{b}``, ``mlp.{b}`` (bottom to top); each column sums to 1.
    """
    dec = decomposition
    labels = _hover_tokens(dec.tokens)
    z = dec.share.numpy()
    custom = np.empty(z.shape, dtype=object)
    custom[:, :] = np.array(labels, dtype=object)[None, :]
    limit = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(len(dec.tokens)), y=dec.components, customdata=custom,
        zmid=0, zmin=-limit, zmax=limit, colorscale=SHARE_SCALE, name="share",
        colorbar={"title": {"text": "share"}},
        hovertemplate="%{customdata}<br>%{y}<br>share %{z:.3f}<extra></extra>",
    ))
    _token_axis(fig, dec.tokens)
    fig.update_yaxes(title_text="component (block index)")
    fig.update_layout(title=f"Share of the rerouting delta at layer {dec.layer}, per component "
                            "and token", height=max(320, 14 * len(dec.components) + 160))
    return fig


def block_share_heatmap(decomposition: Any, pos: int | None = None) -> go.Figure:
    """Block x component (attention, MLP) shares at one token (heatmap ``"share at token"``)."""
    dec = decomposition
    pos = dec.focus_pos if pos is None else pos
    if pos is None:
        raise ValueError("give a position: the decomposition has no focus token")
    z = np.stack([dec.attn_share[:, pos].numpy(), dec.mlp_share[:, pos].numpy()])
    limit = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    label = f"{display_token(dec.tokens[pos])} (pos {pos})"
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(dec.n_blocks)), y=["attention", "MLP"], zmid=0, zmin=-limit,
        zmax=limit, colorscale=SHARE_SCALE, name="share at token",
        colorbar={"title": {"text": "share"}},
        hovertemplate=f"{label}<br>block %{{x}} %{{y}}<br>share %{{z:.3f}}<extra></extra>",
        texttemplate="%{z:.2f}",
    ))
    fig.update_xaxes(title_text="block", tickmode="linear", dtick=1)
    fig.update_layout(title=f"Who carries the rerouting at {label}, layer {dec.layer}",
                      height=260)
    return fig


def block_effects(decomposition: Any, pos: int | None = None) -> go.Figure:
    """Each block's share at one token, split into its direct part (its own LoRA) and the part
    from inputs changed by earlier blocks (bars ``"direct (own LoRA)"`` and ``"from changed
    inputs"``, stacked)."""
    dec = decomposition
    pos = dec.focus_pos if pos is None else pos
    if pos is None:
        raise ValueError("give a position: the decomposition has no focus token")
    blocks = list(range(dec.n_blocks))
    fig = go.Figure()
    for name, values, color in (("direct (own LoRA)", dec.block_direct[:, pos], "#d62728"),
                                ("from changed inputs", dec.block_indirect[:, pos], "#1f77b4")):
        fig.add_trace(go.Bar(x=blocks, y=values.numpy(), name=name, marker={"color": color},
                             hovertemplate=f"block %{{x}}<br>{name}: %{{y:.3f}}<extra></extra>"))
    label = f"{display_token(dec.tokens[pos])} (pos {pos})"
    fig.update_layout(barmode="relative", title=f"Each block's share of the delta at {label}",
                      xaxis_title="block", yaxis_title="share of |D|²", height=320)
    fig.update_xaxes(tickmode="linear", dtick=1)
    return fig


def patching_bars(result: Any) -> go.Figure:
    """Necessity and sufficiency per block (bars ``"necessity (block off)"`` and
    ``"sufficiency (only block on)"``), with the threshold, all-on and none-on lines."""
    fig = go.Figure()
    for name, values, color in (("necessity (block off)", result.necessity, "#1f77b4"),
                                ("sufficiency (only block on)", result.sufficiency, "#ff7f0e")):
        fig.add_trace(go.Bar(x=result.blocks, y=values, name=name, marker={"color": color},
                             hovertemplate=f"block %{{x}}<br>{name}<br>min cos %{{y:.3f}}"
                                           "<extra></extra>"))
    for name, value, dash in (("threshold", result.threshold, "dash"),
                              ("all adapters on", result.all, "dot"),
                              ("no adapter (original)", result.none, "dot")):
        fig.add_shape(type="line", name=name, x0=0, x1=1, xref="paper", y0=value, y1=value,
                      yref="y", line={"color": "#555555" if name == "threshold" else "#999999",
                                      "dash": dash, "width": 1})
    title = "Minimum response cosine at layers " + ", ".join(map(str, result.layers))
    if result.minimal_set is not None:
        title += f"<br><sup>greedy minimal sufficient set: blocks {result.minimal_set}</sup>"
    fig.update_layout(title=title, barmode="group", xaxis_title="block",
                      yaxis_title="min cos(original, patched)", height=360)
    fig.update_xaxes(tickmode="linear", dtick=1)
    fig.update_yaxes(range=[-1.05, 1.05])
    return fig


def attribution_strip(attribution: Any) -> go.Figure:
    """The tokens coloured by attribution (positive: drives the firing), one row per method
    (heatmap ``"attribution"``)."""
    attr = attribution
    rows = [("occlusion", attr.occlusion.numpy()), ("gradient x input", attr.grad_x_input.numpy())]
    z = np.stack([values for _, values in rows])
    limit = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    labels = [display_token(t) for t in attr.tokens]
    text = [labels, labels]
    custom = np.empty(z.shape, dtype=object)
    custom[:, :] = np.array(_hover_tokens(attr.tokens), dtype=object)[None, :]
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(len(attr.tokens)), y=[name for name, _ in rows], text=text,
        texttemplate="%{text}", customdata=custom, zmid=0, zmin=-limit, zmax=limit,
        colorscale=SHARE_SCALE, name="attribution", xgap=1, textfont={"size": 12},
        colorbar={"title": {"text": "drive"}},
        hovertemplate="%{customdata}<br>%{y}: %{z:.3f}<extra></extra>",
    ))
    target = f"{display_token(attr.tokens[attr.pos])} (pos {attr.pos})"
    fig.update_xaxes(showticklabels=False, title_text="token")
    fig.update_layout(title=f"Which tokens drive the cosine at {target}, layer {attr.layer} down "
                            f"(red: drives the firing; occluded with {display_token(attr.neutral)})",
                      height=260)
    return fig


def logit_lens_heatmap(lens: Any, model: str = "circuit-broken") -> go.Figure:
    """Layer x token heatmap of ``model``'s top-1 logit-lens probability; hover shows both
    models' top-k (heatmap ``"logit lens"``)."""
    if model not in ("original", "circuit-broken"):
        raise ValueError(f"model must be 'original' or 'circuit-broken', not {model!r}")
    labels = _hover_tokens(lens.tokens)
    n_layers, n_pos = len(lens.layers), len(lens.tokens)
    custom = np.empty((n_layers, n_pos, 3), dtype=object)
    for i, layer in enumerate(lens.layers):
        for pos in range(n_pos):
            parts = []
            for which in ("original", "circuit-broken"):
                top = ", ".join(f"{display_token(t)} {p:.2f}" for t, p in lens.top(which, layer, pos))
                parts.append(top)
            custom[i, pos] = [labels[pos], parts[0], parts[1]]
    z = lens.top_probs[model][:, :, 0].numpy()
    fig = go.Figure(go.Heatmap(
        z=z, x=np.arange(n_pos), y=[f"layer {layer}" for layer in lens.layers], customdata=custom,
        zmin=0, zmax=1, colorscale="Viridis", name="logit lens",
        colorbar={"title": {"text": "top-1 p"}},
        hovertemplate="%{customdata[0]}<br>%{y}<br>original: %{customdata[1]}"
                      "<br>circuit-broken: %{customdata[2]}<extra></extra>",
    ))
    _token_axis(fig, lens.tokens)
    fig.update_yaxes(title_text="layer")
    fig.update_layout(title=f"Logit lens ({model}): top-1 probability per layer and token; hover "
                            "for both models' top-k", height=max(320, 18 * n_layers + 160))
    return fig


PCA_STYLE = {
    ("harmful", "original"): ("#1f77b4", "circle"),
    ("harmful", "circuit-broken"): ("#d62728", "circle"),
    ("benign", "original"): ("#2ca02c", "square"),
    ("benign", "circuit-broken"): ("#ff7f0e", "square"),
}


def pca_scatter(pca: Any) -> go.Figure:
    """2-D PCA of original and circuit-broken states (traces ``"harmful original"``,
    ``"harmful circuit-broken"``, ``"benign original"``, ``"benign circuit-broken"``)."""
    fig = go.Figure()
    for (which, model), (color, symbol) in PCA_STYLE.items():
        index = [i for i in range(len(pca.x)) if pca.set[i] == which and pca.model[i] == model]
        if not index:
            continue
        fig.add_trace(go.Scatter(
            x=[pca.x[i] for i in index], y=[pca.y[i] for i in index], mode="markers",
            name=f"{which} {model}",
            marker={"color": color, "symbol": symbol, "size": 8,
                    "line": {"width": [2 if pca.segment[i] == "response" else 0 for i in index],
                             "color": "black"}},
            customdata=[f"{display_token(pca.token[i])} (pos {pca.pos[i]}), {pca.segment[i]}"
                        for i in index],
            hovertemplate=f"{which} {model}<br>%{{customdata}}<extra></extra>",
        ))
    ex = pca.explained
    fig.update_layout(title=f"Original vs circuit-broken states at layer {pca.layer} (PCA; "
                            "outlined: response tokens)",
                      xaxis_title=f"PC 1 ({100 * ex[0]:.0f}% of variance)",
                      yaxis_title=f"PC 2 ({100 * ex[1]:.0f}% of variance)", height=420)
    return fig


def direction_lines(report: Any) -> go.Figure:
    """The rerouting direction per layer: ``"shared (mean pairwise cos)"``, ``"cos with the
    refusal direction"`` and ``"cos with {token}"`` for each end-of-turn token."""
    fig = go.Figure()
    series = [("shared (mean pairwise cos)", report.shared),
              ("cos with the refusal direction", report.cos_refusal)]
    series += [(f"cos with {name}", values) for name, values in report.cos_tokens.items()]
    for k, (name, values) in enumerate(series):
        fig.add_trace(go.Scatter(
            x=report.layers, y=values, mode="lines+markers", name=html.escape(name),
            line={"color": LAYER_COLORS[k % len(LAYER_COLORS)]},
            hovertemplate=f"{html.escape(name)}<br>layer %{{x}}: %{{y:.3f}}<extra></extra>",
        ))
    fig.update_layout(title=f"The rerouting direction over {report.n_examples} harmful examples",
                      xaxis_title="layer", yaxis_title="cosine", height=320)
    fig.update_yaxes(range=[-1.05, 1.05])
    return fig
