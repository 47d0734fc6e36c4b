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
- :func:`probe_scores_figure`: ``"probe score"`` and the ``"threshold"`` line.

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
    return [display_token(t) for t in tokens]


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
                hovertemplate=f"layer {layer}<br>%{{customdata}} (pos %{{x}})<br>cos %{{y:.3f}}"
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
            hovertemplate="token %{customdata[0]} (pos %{x})<br>%{y}<br>cos %{z:.3f}"
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
                    hovertemplate=f"layer {layer} {which}<br>%{{customdata}} (pos %{{x}})"
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
            customdata=[layer_of_min],
            zmin=-1,
            zmax=1,
            colorscale=COSINE_SCALE,
            colorbar={"title": {"text": "lowest cos"}},
            name="lowest cosine",
            hovertemplate="%{text} (pos %{x})<br>lowest cos %{z:.3f} at layer %{customdata}"
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
            hovertemplate="%{customdata} (pos %{x})<br>score %{y:.3f}<extra></extra>",
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
