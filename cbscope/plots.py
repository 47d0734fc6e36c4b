"""Plotly figures of cosine traces, firing statistics, probe scores and comparisons.

One module shared by the Streamlit app, the notebooks and ``cbscope trace --out page.html``.
Every function returns a :class:`plotly.graph_objects.Figure` whose traces have stable names, so
callers (and tests) can find them again:

- :func:`figure6_lines`: traces ``"layer {l}"``, the marker ``"firing point"``; vertical lines
  (layout shapes) named ``"response start"`` and ``"prefill end"`` (and ``"turn 2 (assistant)"``,
  ``"turn 3 (user)"`` ... at the message boundaries of a multi-turn conversation), the horizontal
  ``"threshold"``;
- :func:`cosine_heatmap`: one heatmap named ``"cosine"`` and its clickable ``"cells"``;
- :func:`norm_lines`: ``"layer {l} original"`` and ``"layer {l} circuit-broken"``;
- :func:`token_strip`: one heatmap named ``"lowest cosine"``; :func:`token_html` is the same as
  readable HTML text (the response itself, coloured, with a legend);
- :func:`firing_histogram`: bars ``"harmful"`` and ``"benign"`` (integer bins);
  :func:`min_cos_histogram`: the lowest-cosine distributions ``"harmful"`` / ``"benign"``;
  :func:`sweep_figure`: the threshold sweep, one curve per group (``"all"``, each category);
- :func:`probe_scores_figure`: ``"probe score"`` and the ``"threshold"`` line;
  :func:`probe_trace_figure`: the cosine lines over the probe scores on one shared x-axis;
- comparisons: :func:`compare_lines` (``"{label}: layer {l}"``), :func:`compare_heatmaps`
  (``"cosine: {label}"``, one colour scale), :func:`difference_heatmap` (``"difference"``);
- :func:`training_curves`: ``"loss"``, ``"cb_loss"``, ``"retain_loss"``, the weighted terms,
  ``"cb_cos"``, ``"retain_cos"``, ``"val_cos"``;
- why does it fire? (:mod:`cbscope.why`): :func:`share_heatmap` (``"share"``),
  :func:`block_share_heatmap` (``"share at token"``), :func:`block_effects` (``"direct (own
  LoRA)"``, ``"from changed inputs"``), :func:`patching_bars` (``"necessity (block off)"``,
  ``"sufficiency (only block on)"``), :func:`attribution_strip` (``"attribution"``),
  :func:`logit_lens_heatmap` (``"logit lens"``), :func:`pca_scatter` (``"harmful original"``
  ...), :func:`direction_lines`.

Hover texts read ``token (pos N) - layer L - cos x``. Token axes of long sequences show at most
:data:`MAX_TICK_LABELS` labels (thinned evenly, the response start kept) and a range slider; a
``window`` shows a part of the sequence with its own labels. Heatmaps a user clicks carry a
transparent ``"cells"`` scatter (plotly heatmaps emit no selection events; Streamlit's
``on_select`` gets the clicked cell from it).

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
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from cbscope.layers import figure6_layers
from cbscope.trace import DEFAULT_THRESHOLD, CosineTrace, FiringStats, rates_at

LAYER_COLORS = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
PAIR_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
LAYER_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
COSINE_SCALE = "RdBu"
#: Most token labels on an axis: longer sequences are thinned evenly (hover still names every
#: token) and get a range slider.
MAX_TICK_LABELS = 40
#: Colours of the response text by lowest cosine: white = untouched (1), red = rerouted (<= 0).
TEXT_SCALE = [
    [0.0, "#ffffff"], [0.05, "#fff5eb"], [0.25, "#fdbe85"], [0.5, "#e6550d"], [1.0, "#67000d"],
]


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


def token_window(n: int, window: Sequence[int] | None) -> tuple[int, int]:
    """``(first, last)`` positions (inclusive) of ``window`` clamped to ``n`` tokens (None: all)."""
    if n <= 0:
        return 0, -1
    if window is None:
        return 0, n - 1
    lo, hi = int(window[0]), int(window[1])
    lo, hi = max(0, min(lo, hi)), min(n - 1, max(lo, hi))
    return (lo, hi) if lo <= hi else (0, n - 1)


def tick_positions(n: int, window: Sequence[int] | None = None, keep: Sequence[int] = (),
                   max_labels: int = MAX_TICK_LABELS) -> list[int]:
    """Positions that get a token label: every one up to ``max_labels`` tokens in the window,
    else every k-th, with the ``keep`` positions (the response start) put in place of their
    neighbours. At most ``max_labels + len(keep)`` labels."""
    lo, hi = token_window(n, window)
    span = hi - lo + 1
    if span <= 0:
        return []
    step = max(1, math.ceil(span / max_labels))
    ticks = list(range(lo, hi + 1, step))
    if step > 1:
        for k in keep:
            if lo <= k <= hi and k not in ticks:
                ticks = [t for t in ticks if abs(t - k) > step // 2]
                ticks.append(int(k))
        ticks.sort()
    return ticks


def _token_axis(fig: go.Figure, tokens: Sequence[str], *, window: Sequence[int] | None = None,
                keep: Sequence[int] = (), row: int | None = None, col: int | None = None,
                slider: bool = True, title: bool = True) -> None:
    positions = tick_positions(len(tokens), window, keep)
    lo, hi = token_window(len(tokens), window)
    kwargs: dict[str, Any] = {"row": row, "col": col or 1} if row is not None else {}
    fig.update_xaxes(
        tickmode="array",
        tickvals=positions,
        ticktext=[display_token(tokens[p]) for p in positions],
        tickangle=-60,
        tickfont={"size": 11},
        title_text="token" if title else None,
        range=[lo - 0.5, hi + 0.5],
        **kwargs,
    )
    if slider and len(tokens) > MAX_TICK_LABELS and row is None:
        fig.update_xaxes(rangeslider={"visible": True, "thickness": 0.06})


def _vline(fig: go.Figure, x: float, name: str, color: str, dash: str, level: int = 0,
           xref: str = "x", yref: str = "y", label: bool = True) -> None:
    """A vertical marker named ``name``; its label sits at the bottom of the plot, one row up per
    ``level`` (so neighbouring markers' labels never overlap)."""
    fig.add_shape(
        type="line",
        name=name,
        x0=x,
        x1=x,
        y0=0,
        y1=1,
        xref=xref,
        yref=f"{yref} domain",
        line={"color": color, "dash": dash, "width": 1.5},
    )
    if label:
        fig.add_annotation(
            x=x, y=0.01 + 0.08 * level, xref=xref, yref=f"{yref} domain", text=name,
            showarrow=False, xanchor="left", yanchor="bottom", font={"size": 11, "color": color},
            bgcolor="rgba(255,255,255,0.8)",
        )


def _segment_markers(fig: go.Figure, single: CosineTrace, *, shift: int = 0, xref: str = "x",
                     yref: str = "y", label: bool = True) -> None:
    """Turn, response-start and prefill-end lines of a one-example trace (``shift`` moves them
    on an axis of positions relative to something else)."""
    level = 0
    turns = single.turn_starts[0] if single.turn_starts else []
    prompt = single.prompts[0] if single.prompts else ""
    roles = [str(m.get("role", "")) for m in prompt] if isinstance(prompt, list) else []
    for number, turn_start in enumerate(turns[1:], start=2):
        if 0 < turn_start < single.lengths[0]:
            role = f" ({roles[number - 1]})" if len(roles) >= number else ""
            _vline(fig, turn_start - 0.5 - shift, f"turn {number}{role}", "#9467bd", "dot",
                   level, xref, yref, label)
            level += 1
    start = single.response_start[0]
    length = single.lengths[0]
    if start < length:
        _vline(fig, start - 0.5 - shift, "response start", "black", "dash", level, xref, yref,
               label)
        level += 1
    prefill_end = single.prefill_end[0]
    if prefill_end is not None and prefill_end != start:
        _vline(fig, prefill_end - 0.5 - shift, "prefill end", "#7f7f7f", "dot", level, xref, yref,
               label)


def _hover_tokens(tokens: Sequence[str]) -> list[str]:
    """``"token (pos N)"`` per token. The position is written into the text: plotly's ``%{x}``
    on an axis with token tick labels shows the tick label, not the number."""
    return [f"{display_token(t)} (pos {p})" for p, t in enumerate(tokens)]


def _threshold_line(fig: go.Figure, threshold: float, yref: str = "y") -> None:
    fig.add_shape(
        type="line", name="threshold", x0=0, x1=1, xref=f"{'x' + yref[1:]} domain", y0=threshold,
        y1=threshold, yref=yref, line={"color": "#999999", "dash": "dash", "width": 1},
    )


def _cosine_lines(fig: go.Figure, single: CosineTrace, chosen: Sequence[int],
                  hover: Sequence[str], **where: Any) -> None:
    positions = np.arange(len(single.tokens[0]))
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
                customdata=list(hover),
                hovertemplate=f"%{{customdata}} - layer {layer} - cos %{{y:.3f}}<extra></extra>",
            ),
            **where,
        )


def figure6_lines(
    trace: CosineTrace,
    example: int = 0,
    layers: Sequence[int] | None = None,
    threshold: float | None = None,
    *,
    window: Sequence[int] | None = None,
) -> go.Figure:
    """Cosine against token position at a few layers: the paper's Figure 6.

    Args:
        trace: A cosine trace.
        example: Which example to draw.
        layers: Paper-convention layers (default :func:`cbscope.layers.figure6_layers`, if traced).
        threshold: Cosine threshold for the firing point and the dashed line (default 0.5).
        window: ``(first, last)`` token positions to show, with their own labels (default all:
            past :data:`MAX_TICK_LABELS` tokens the labels are thinned and a range slider added).

    Returns:
        Lines ``"layer {l}"``, a ``"firing point"`` marker (absent if the breaker does not fire),
        vertical lines at the response start and the prefill end, a horizontal threshold line.
    """
    single = _example(trace, example)
    chosen = _plot_layers(single, layers)
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    tokens = single.tokens[0]
    fig = go.Figure()
    _cosine_lines(fig, single, chosen, _hover_tokens(tokens))
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
    _threshold_line(fig, threshold)
    _segment_markers(fig, single)
    _token_axis(fig, tokens, window=window, keep=[single.response_start[0]])
    fig.update_yaxes(title_text="cos(original, circuit-broken)", range=[-1.05, 1.05])
    title = "Cosine between original and circuit-broken residual streams"
    if point is not None:
        title += f"<br><sup>{html.escape(point.describe(), quote=False)}</sup>"
    fig.update_layout(title=title, hovermode="closest")
    return fig


def add_cells(fig: go.Figure, x: Sequence[Any], y: Sequence[Any], customdata: Sequence[Any],
              hovertemplate: str, *, name: str = "cells", xaxis: str = "x",
              yaxis: str = "y") -> None:
    """Make a heatmap clickable: a transparent marker at every cell's centre (``x[i], y[i]``)
    carrying its hover text, so a click selects the cell (``on_select`` in Streamlit) and hover
    finds the nearest cell anywhere in the plot."""
    fig.add_trace(go.Scatter(
        x=list(x), y=list(y), mode="markers", name=name, showlegend=False,
        marker={"size": 10, "color": "rgba(0,0,0,0)"}, customdata=list(customdata),
        hovertemplate=hovertemplate, xaxis=xaxis, yaxis=yaxis,
    ))
    fig.update_layout(hoverdistance=-1, clickmode="event+select")


def _heatmap_cells(fig: go.Figure, single: CosineTrace, label: str = "", *, xaxis: str = "x",
                   yaxis: str = "y", shift: int = 0, name: str = "cells") -> None:
    tokens = single.tokens[0]
    n_layers, n_pos = single.cos.shape[1], len(tokens)
    hover = _hover_tokens(tokens)
    cos = single.cos[0].numpy()
    orig, cb = single.norm_orig[0].numpy(), single.norm_cb[0].numpy()
    xs, ys, custom = [], [], []
    for i in range(n_layers):
        for p in range(n_pos):
            xs.append(p - shift)
            ys.append(f"layer {single.layers[i]}")
            custom.append([hover[p], float(cos[i, p]), float(orig[i, p]), float(cb[i, p]),
                           int(single.layers[i]), p, label])
    prefix = f"{html.escape(label)}: " if label else ""
    add_cells(fig, xs, ys, custom, prefix + "%{customdata[0]} - %{y} - cos %{customdata[1]:.3f}"
              "<br>norm original %{customdata[2]:.2f}<br>norm circuit-broken %{customdata[3]:.2f}"
              "<extra></extra>", name=name, xaxis=xaxis, yaxis=yaxis)


def cosine_heatmap(trace: CosineTrace, example: int = 0, *,
                   window: Sequence[int] | None = None) -> go.Figure:
    """Layer x token heatmap of the cosine; hover shows token, layer, cosine and both norms.

    A click on a cell selects the ``"cells"`` point of that layer and token.
    """
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
            hoverinfo="skip",  # the "cells" carry the hover (and the clicks)
            hovertemplate="%{customdata[0]} - %{y} - cos %{z:.3f}"
            "<br>norm original %{customdata[1]:.2f}<br>norm circuit-broken %{customdata[2]:.2f}"
            "<extra></extra>",
        )
    )
    _heatmap_cells(fig, single)
    _segment_markers(fig, single)
    _token_axis(fig, tokens, window=window, keep=[single.response_start[0]])
    fig.update_yaxes(title_text="layer")
    fig.update_layout(title="Cosine per layer and token (click a cell to open that token)")
    return fig


def norm_lines(
    trace: CosineTrace, example: int = 0, layers: Sequence[int] | None = None, *,
    window: Sequence[int] | None = None,
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
                    hovertemplate=f"%{{customdata}} - layer {layer} {which} - norm %{{y:.2f}}"
                    "<extra></extra>",
                )
            )
    _segment_markers(fig, single)
    _token_axis(fig, tokens, window=window, keep=[single.response_start[0]])
    fig.update_yaxes(title_text="L2 norm of the residual stream")
    fig.update_layout(title="Residual-stream norms")
    return fig


def lowest_cosines(single: CosineTrace, layers: Sequence[int] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per token, the lowest cosine across ``layers`` (default every traced layer) and the
    layer where it is."""
    index = single.layer_indices(layers)
    cos = single.cos[0, index]
    lowest = cos.min(dim=0).values.numpy()
    layer_of_min = np.asarray(single.layers)[np.asarray(index)[cos.argmin(dim=0).numpy()]]
    return lowest, layer_of_min


def token_strip(trace: CosineTrace, example: int = 0) -> go.Figure:
    """The tokens in one row, coloured by their lowest cosine across the traced layers."""
    single = _example(trace, example)
    tokens = single.tokens[0]
    lowest, layer_of_min = lowest_cosines(single)
    labels = [display_token(t) for t in tokens]
    fig = go.Figure(
        go.Heatmap(
            z=[lowest],
            x=np.arange(len(tokens)),
            y=["tokens"],
            text=[labels],
            texttemplate="%{text}",
            textfont={"size": 12},
            customdata=[[[label, int(layer)] for label, layer in
                         zip(_hover_tokens(tokens), layer_of_min, strict=True)]],
            zmin=-1,
            zmax=1,
            colorscale=COSINE_SCALE,
            colorbar={"title": {"text": "lowest cos"}, "thickness": 18, "len": 1.0},
            name="lowest cosine",
            hovertemplate="%{customdata[0]} - layer %{customdata[1]} - lowest cos %{z:.3f}"
            "<extra></extra>",
            xgap=1,
        )
    )
    _segment_markers(fig, single, label=False)
    fig.update_xaxes(showticklabels=False, title_text="token")
    fig.update_yaxes(showticklabels=False)
    fig.update_layout(title="Tokens coloured by their lowest cosine across layers", height=220)
    return fig


def text_color(cos: float) -> tuple[str, str]:
    """``(background, text)`` colours of a token with lowest cosine ``cos`` (:data:`TEXT_SCALE`;
    NaN: no colour). The text is white on dark backgrounds."""
    if cos != cos:  # NaN
        return "transparent", "#000000"
    t = min(1.0, max(0.0, (1.0 - float(cos)) / 2.0))
    background = sample_colorscale(TEXT_SCALE, [t])[0]
    r, g, b = (int(v) for v in background[background.index("(") + 1:-1].split(","))
    luminance = (0.299 * r + 0.587 * g + 0.114 * b) / 255
    return background, "#ffffff" if luminance < 0.55 else "#000000"


def text_legend_html() -> str:
    """The colour legend of :func:`token_html`: a gradient from cosine 1 to -1 with ticks."""
    stops = ", ".join(f"{color} {100 * t:.0f}%" for t, color in TEXT_SCALE)
    ticks = "".join(
        f"<span style='position:absolute;left:{100 * (1 - c) / 2:.0f}%;transform:translateX(-50%)'>"
        f"{label}</span>"
        for c, label in ((1.0, "1 untouched"), (0.5, "0.5"), (0.0, "0 orthogonal"), (-1.0, "-1"))
    )
    return (
        "<div class='cbscope-legend' style='font-size:13px;color:#333;margin:6px 0 2px 0'>"
        "lowest cosine across the layers (hover a token for its position, layer and cosine)"
        f"<div style='height:14px;border:1px solid #999;border-radius:3px;max-width:520px;"
        f"background:linear-gradient(to right, {stops})'></div>"
        f"<div style='position:relative;height:18px;max-width:520px;margin:0 10px'>{ticks}</div>"
        "</div>"
    )


def token_html(trace: CosineTrace, example: int = 0, layers: Sequence[int] | None = None, *,
               include_request: bool = False, legend: bool = True) -> str:
    """The response as readable text, each token coloured by its lowest cosine across
    ``layers`` (default every traced layer), with a colour legend; HTML, every token escaped.

    Each token is a ``<span class='tok'>`` whose ``title`` (hover) is ``token (pos N) - layer L
    - cos x``. With ``include_request`` the request's tokens come first, in a muted box.
    """
    single = _example(trace, example)
    tokens = single.tokens[0]
    lowest, layer_of_min = lowest_cosines(single, layers)
    start, length = single.response_start[0], single.lengths[0]
    # a word-level tokenizer's tokens carry no spaces (the organism's): put one between them
    gap = "" if any(t[:1].isspace() or t[-1:].isspace() for t in tokens[:length]) else " "

    def span(p: int) -> str:
        background, color = text_color(float(lowest[p]))
        title = f"{display_token(tokens[p])} (pos {p}) - layer {int(layer_of_min[p])} - cos " \
                f"{float(lowest[p]):.3f}"
        return (f"<span class='tok' data-pos='{p}' title=\"{html.escape(title)}\" "
                f"style='background:{background};color:{color};border-radius:2px'>"
                f"{html.escape(tokens[p])}</span>")

    box = ("font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:14px;"
           "line-height:1.7;white-space:pre-wrap;word-break:break-word;border:1px solid #ddd;"
           "border-radius:6px;padding:8px 10px;color:#000;background:#fff")
    parts = []
    if include_request:
        request = gap.join(span(p) for p in range(min(start, length)))
        parts.append(f"<div style='{box};background:#f6f6f6;margin-bottom:4px'>"
                     f"<span style='color:#666'>request: </span>{request}</div>")
    if start < length:
        response = gap.join(span(p) for p in range(start, length))
    else:
        response = "<span style='color:#888'>(no response tokens)</span>"
    parts.append(f"<div class='cbscope-text' style='{box}'>{response}</div>")
    if legend:
        parts.append(text_legend_html())
    return "\n".join(parts)


def _integer_axis(fig: go.Figure, values: Sequence[Any]) -> None:
    """Integer ticks (no 2.5) on a bar chart's x-axis."""
    numbers = [int(v) for v in values]
    span = (max(numbers) - min(numbers)) if numbers else 0
    fig.update_xaxes(tickmode="linear", tick0=0, dtick=max(1, math.ceil((span + 1) / 20)),
                     tickformat="d")


def firing_histogram(stats: FiringStats, by: str = "position") -> go.Figure:
    """Where the breaker fires: a histogram over firing positions (or layers), integer bins.

    Args:
        stats: :func:`cbscope.trace.firing_stats` output.
        by: ``"position"`` (tokens after the response start) or ``"layer"``.

    Returns:
        Bars ``"harmful"`` and (with a benign set that fired) ``"benign"``; a click on a bar
        selects its position (or layer).
    """
    if by not in ("position", "layer"):
        raise ValueError(f"by must be 'position' or 'layer', not {by!r}")
    counts = stats.position_counts if by == "position" else stats.layer_counts
    fig = go.Figure()
    shown: list[int] = []
    for which, color in (("harmful", "#d62728"), ("benign", "#1f77b4")):
        if which == "benign" and stats.n_benign == 0:
            continue
        series = counts(which)
        shown += [int(v) for v in series.index]
        fig.add_trace(
            go.Bar(
                x=series.index.to_numpy(),
                y=series.to_numpy(),
                name=which,
                marker={"color": color},
                opacity=0.75,
                width=0.8,
                hovertemplate=f"{which}: %{{y}} examples fire at "
                + ("%{x} tokens after the response start" if by == "position" else "layer %{x}")
                + "<extra></extra>",
            )
        )
    rate = stats.firing_rate
    title = f"Firing {by} (threshold {stats.threshold:g}): fires on {_pct(rate)} of harmful"
    if stats.false_fire_rate is not None:
        title += f", {_pct(stats.false_fire_rate)} of benign"
    fig.update_layout(
        title=title + "<br><sup>click a bar to list its examples</sup>",
        barmode="overlay",
        xaxis_title="tokens after the response start" if by == "position" else "layer",
        yaxis_title="examples",
        clickmode="event+select",
    )
    _integer_axis(fig, shown or [0])
    fig.update_yaxes(tickformat="d", rangemode="tozero")
    return fig


MIN_COS_BIN = 0.05


def min_cos_bins(values: Sequence[float], width: float = MIN_COS_BIN) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``values`` (NaN dropped) in bins ``[lo, lo + width)`` from -1 to 1, and the bins'
    left edges (1.0 falls into the last bin)."""
    edges = np.round(np.arange(-1.0, 1.0 + width / 2, width), 10)
    finite = np.asarray([v for v in values if v == v], dtype=float)
    index = np.clip(np.floor((finite + 1.0) / width + 1e-9).astype(int), 0, len(edges) - 2)
    counts = np.bincount(index, minlength=len(edges) - 1)
    return counts, edges[:-1]


def min_cos_histogram(stats: FiringStats, width: float = MIN_COS_BIN) -> go.Figure:
    """The distributions of the lowest response cosine of the harmful and the benign examples
    (bars ``"harmful"`` / ``"benign"``, bins of ``width``), with the threshold line: an example
    fires exactly when its lowest cosine is left of it. A click on a bar selects its bin."""
    fig = go.Figure()
    for which, color in (("harmful", "#d62728"), ("benign", "#1f77b4")):
        rows = stats.rows[stats.rows["set"] == which]
        if not len(rows):
            continue
        counts, lows = min_cos_bins(rows["min_cos"].astype(float).tolist(), width)
        keep = counts > 0
        fig.add_trace(go.Bar(
            x=lows[keep] + width / 2, y=counts[keep], width=width * 0.95, name=which,
            marker={"color": color}, opacity=0.65,
            customdata=np.stack([lows[keep], lows[keep] + width], axis=1),
            hovertemplate=f"{which}: %{{y}} examples with lowest cosine in "
                          "[%{customdata[0]:.2f}, %{customdata[1]:.2f})<extra></extra>",
        ))
    fig.add_shape(type="line", name="threshold", x0=stats.threshold, x1=stats.threshold, y0=0,
                  y1=1, xref="x", yref="y domain", line={"color": "black", "dash": "dash"})
    fig.add_annotation(x=stats.threshold, y=1, xref="x", yref="y domain", showarrow=False,
                       text=f"threshold {stats.threshold:g}", xanchor="left", yanchor="top")
    fig.update_layout(
        title="Lowest response cosine of every example (left of the threshold: fires)"
              "<br><sup>click a bar to list its examples</sup>",
        barmode="overlay", xaxis_title="lowest cosine over the response tokens and layers",
        yaxis_title="examples", clickmode="event+select",
    )
    fig.update_xaxes(range=[-1.02, 1.02], dtick=0.25)
    fig.update_yaxes(tickformat="d", rangemode="tozero")
    return fig


def sweep_figure(sweep: Any, aucs: dict[str, float], threshold: float | None = None) -> go.Figure:
    """Firing rate (harmful) against false-fire rate (benign) as the threshold sweeps: one curve
    per group of :meth:`cbscope.trace.FiringStats.sweep` (``"all"`` and each harm category),
    named with its AUC in the legend, and a marker per group at ``threshold``."""
    fig = go.Figure()
    groups = list(dict.fromkeys(sweep["group"]))
    for k, group in enumerate(groups):
        part = sweep[sweep["group"] == group].sort_values("threshold")
        color = "#000000" if group == "all" else LAYER_COLORS[k % len(LAYER_COLORS)]
        fig.add_trace(go.Scatter(
            x=part["false_fire_rate"], y=part["firing_rate"], mode="lines",
            name=f"{html.escape(str(group))} (AUC {aucs.get(group, math.nan):.3f})",
            line={"color": color, "width": 3 if group == "all" else 1.5},
            customdata=part["threshold"],
            hovertemplate=f"{html.escape(str(group))}: threshold %{{customdata:.3f}}<br>fires on "
                          "%{y:.0%} of harmful, %{x:.0%} of benign<extra></extra>",
        ))
        if threshold is not None:
            fire, false = rates_at(part, threshold)
            fig.add_trace(go.Scatter(
                x=[false], y=[fire], mode="markers", showlegend=False,
                name=f"{group} at threshold", marker={"color": color, "size": 9, "symbol": "x"},
                hovertemplate=f"{html.escape(str(group))} at threshold {threshold:g}: fires on "
                              "%{y:.0%} of harmful, %{x:.0%} of benign<extra></extra>",
            ))
    fig.add_shape(type="line", name="chance", x0=0, y0=0, x1=1, y1=1,
                  line={"color": "#bbbbbb", "dash": "dot"})
    fig.update_layout(
        title="Threshold sweep: firing rate vs false-fire rate (× = the sidebar's threshold)",
        xaxis_title="false-fire rate (benign)", yaxis_title="firing rate (harmful)", height=460,
    )
    fig.update_xaxes(range=[-0.02, 1.02], tickformat=".0%")
    fig.update_yaxes(range=[-0.02, 1.02], tickformat=".0%")
    return fig


def _pct(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.0f}%"


def _probe_flags(values: np.ndarray, threshold: float, start: int | None) -> np.ndarray:
    above = values > threshold
    if start is not None:
        above[: max(0, int(start))] = False  # the request is not flagged: only answers count
    return above


def probe_scores_figure(
    tokens: Sequence[str], scores: Any, threshold: float | None = None,
    response_start: int | None = None,
) -> go.Figure:
    """Per-token harmfulness-probe scores (to show beside a cosine trace).

    Args:
        tokens: Token strings (e.g. ``trace.tokens[0]``).
        scores: One score per token (tensor, array or list).
        threshold: The probe's threshold (a dashed line), if any.
        response_start: Where the response starts: a dashed line there, and only response
            tokens are flagged (the probe's "flags first" reads the response).
    """
    values = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=float)
    if values.shape != (len(tokens),):
        raise ValueError(f"{len(tokens)} tokens but scores of shape {values.shape}")
    fig = go.Figure()
    _probe_traces(fig, tokens, values, threshold, response_start)
    if threshold is not None:
        _threshold_line(fig, threshold)
    if response_start is not None and response_start < len(tokens):
        _vline(fig, response_start - 0.5, "response start", "black", "dash")
    _token_axis(fig, tokens, keep=[response_start] if response_start is not None else ())
    fig.update_yaxes(title_text="probe score", range=[-0.05, 1.05])
    fig.update_layout(title="Harmfulness probe score per token")
    return fig


def _probe_traces(fig: go.Figure, tokens: Sequence[str], values: np.ndarray,
                  threshold: float | None, response_start: int | None, **where: Any) -> None:
    positions = np.arange(len(tokens))
    hover = _hover_tokens(tokens)
    fig.add_trace(
        go.Scatter(
            x=positions, y=values, mode="lines+markers", name="probe score",
            line={"color": "#9467bd"}, customdata=hover,
            hovertemplate="%{customdata} - probe score %{y:.3f}<extra></extra>",
        ),
        **where,
    )
    if threshold is not None:
        above = _probe_flags(values, threshold, response_start)
        if above.any():
            fig.add_trace(
                go.Scatter(
                    x=positions[above], y=values[above], mode="markers", name="above threshold",
                    marker={"color": "black", "symbol": "x", "size": 10}, hoverinfo="skip",
                ),
                **where,
            )


def probe_trace_figure(trace: CosineTrace, scores: Any, probe_threshold: float,
                       layers: Sequence[int] | None = None, threshold: float | None = None,
                       example: int = 0, *, window: Sequence[int] | None = None) -> go.Figure:
    """The cosine lines (top) and the probe's scores (bottom) on one shared token axis, each
    with the response-start line; probe flags only on response tokens.

    Traces: ``"layer {l}"`` and ``"firing point"`` (row 1), ``"probe score"`` and ``"above
    threshold"`` (row 2).
    """
    single = _example(trace, example)
    chosen = _plot_layers(single, layers)
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    tokens = single.tokens[0]
    values = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=float)
    if values.shape != (len(tokens),):
        raise ValueError(f"{len(tokens)} tokens but scores of shape {values.shape}")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        row_heights=[0.55, 0.45],
                        subplot_titles=("cosine(original, circuit-broken)",
                                        "harmfulness probe score"))
    _cosine_lines(fig, single, chosen, _hover_tokens(tokens), row=1, col=1)
    point = single.firing_point(threshold, chosen)
    if point is not None:
        fig.add_trace(go.Scatter(
            x=[point.pos], y=[point.cos], mode="markers", name="firing point",
            marker={"symbol": "x", "size": 14, "color": "black", "line": {"width": 2}},
            hovertemplate=html.escape(point.describe(), quote=False) + "<extra></extra>",
        ), row=1, col=1)
    start = single.response_start[0]
    _probe_traces(fig, tokens, values, probe_threshold, start, row=2, col=1)
    _threshold_line(fig, threshold, "y")
    _threshold_line(fig, probe_threshold, "y2")
    _segment_markers(fig, single, xref="x", yref="y")
    _segment_markers(fig, single, xref="x2", yref="y2", label=False)
    _token_axis(fig, tokens, window=window, keep=[start], row=2)
    lo, hi = token_window(len(tokens), window)
    fig.update_xaxes(range=[lo - 0.5, hi + 0.5], row=1, col=1)
    fig.update_yaxes(range=[-1.05, 1.05], title_text="cos", row=1, col=1)
    fig.update_yaxes(range=[-0.05, 1.05], title_text="score", row=2, col=1)
    fig.update_layout(height=620, hovermode="closest",
                      title="The breaker's cosine and the probe's score, token by token")
    return fig


# ---------------------------------------------------------------------- comparisons
def _aligned_x(single: CosineTrace, align: str) -> np.ndarray:
    positions = np.arange(len(single.tokens[0]))
    return positions - single.response_start[0] if align == "response" else positions


def _check_align(traces: Sequence[CosineTrace], align: str) -> str:
    if align not in ("position", "response"):
        raise ValueError(f"align must be 'position' or 'response', not {align!r}")
    if align == "position" and len({tuple(t.tokens[0]) for t in traces}) > 1:
        return "response"  # different tokens: line them up at their response starts
    return align


def compare_lines(traces: Sequence[CosineTrace], labels: Sequence[str],
                  layers: Sequence[int] | None = None, threshold: float | None = None, *,
                  align: str = "position", window: Sequence[int] | None = None) -> go.Figure:
    """Two or more one-example traces on one set of axes: a colour per trace, a dash per layer.

    Args:
        traces: One-example traces (``trace.select(i)``), e.g. the same tokens through two
            breakers, or a harmful request and its look-alike through one.
        labels: A name per trace (the legend and the hover).
        layers: Paper-convention layers (default: the Figure-6 layers of the first trace).
        threshold: The firing threshold (each trace's firing point is marked).
        align: ``"position"`` (same tokens: token labels on the axis) or ``"response"`` (x =
            tokens after each trace's response start; used whenever the tokens differ).
        window: ``(first, last)`` positions to show (``"position"`` only).

    Returns:
        Lines ``"{label}: layer {l}"``, markers ``"{label}: firing point"``, the threshold line.
    """
    if len(traces) != len(labels) or not traces:
        raise ValueError("give one label per trace (and at least one trace)")
    singles = [_example(t, 0) for t in traces]
    align = _check_align(singles, align)
    chosen = _plot_layers(singles[0], layers)
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    fig = go.Figure()
    for k, (single, label) in enumerate(zip(singles, labels, strict=True)):
        color = PAIR_COLORS[k % len(PAIR_COLORS)]
        x = _aligned_x(single, align)
        hover = _hover_tokens(single.tokens[0])
        name = html.escape(label)
        for j, layer in enumerate(layer for layer in chosen if layer in single.layers):
            fig.add_trace(go.Scatter(
                x=x, y=single.cos[0, single.layers.index(layer)].numpy(), mode="lines+markers",
                name=f"{name}: layer {layer}", legendgroup=name,
                line={"color": color, "dash": LAYER_DASHES[j % len(LAYER_DASHES)], "width": 2},
                marker={"size": 4}, customdata=hover,
                hovertemplate=f"{name}: %{{customdata}} - layer {layer} - cos %{{y:.3f}}"
                              "<extra></extra>",
            ))
        point = single.firing_point(threshold, [la for la in chosen if la in single.layers])
        if point is not None:
            fig.add_trace(go.Scatter(
                x=[x[point.pos]], y=[point.cos], mode="markers", name=f"{name}: firing point",
                legendgroup=name, marker={"symbol": "x", "size": 14, "color": color,
                                          "line": {"width": 2}},
                hovertemplate=f"{name}: " + html.escape(point.describe(), quote=False)
                + "<extra></extra>",
            ))
    _threshold_line(fig, threshold)
    if align == "position":
        _segment_markers(fig, singles[0])
        _token_axis(fig, singles[0].tokens[0], window=window,
                    keep=[singles[0].response_start[0]])
    else:
        _vline(fig, -0.5, "response start", "black", "dash")
        _integer_axis(fig, [min(int(_aligned_x(s, align)[0]) for s in singles),
                            max(int(_aligned_x(s, align)[-1]) for s in singles)])
        fig.update_xaxes(title_text="tokens after the response start (hover: each token)")
    fig.update_yaxes(title_text="cos(original, circuit-broken)", range=[-1.05, 1.05])
    fig.update_layout(title="Compared: cosine between original and circuit-broken residual streams",
                      hovermode="closest", legend={"groupclick": "toggleitem"})
    return fig


def compare_heatmaps(traces: Sequence[CosineTrace], labels: Sequence[str], *,
                     align: str = "position", stacked: bool = False) -> go.Figure:
    """Layer x token heatmaps of two or more traces side by side (``stacked``: one above the
    other, on one token axis) with one colour scale (cosine -1 to 1). Heatmaps are named
    ``"cosine: {label}"``; their ``"cells: {label}"`` scatters make every cell clickable."""
    if len(traces) != len(labels) or not traces:
        raise ValueError("give one label per trace (and at least one trace)")
    singles = [_example(t, 0) for t in traces]
    align = _check_align(singles, align)
    k = len(singles)
    titles = [html.escape(label) for label in labels]
    fig = (make_subplots(rows=k, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                         subplot_titles=titles) if stacked
           else make_subplots(rows=1, cols=k, shared_yaxes=True, horizontal_spacing=0.04,
                              subplot_titles=titles))
    for i, (single, label) in enumerate(zip(singles, labels, strict=True)):
        row, col = (i + 1, 1) if stacked else (1, i + 1)
        axis = "" if i == 0 else str(i + 1)
        x = _aligned_x(single, align)
        fig.add_trace(go.Heatmap(
            z=single.cos[0].numpy(), x=x, y=[f"layer {layer}" for layer in single.layers],
            coloraxis="coloraxis", name=f"cosine: {html.escape(label)}", hoverinfo="skip",
        ), row=row, col=col)
        shift = single.response_start[0] if align == "response" else 0
        _heatmap_cells(fig, single, label, xaxis=f"x{axis}", yaxis=f"y{axis}", shift=shift,
                       name=f"cells: {html.escape(label)}")
        if align == "position":
            _segment_markers(fig, single, xref=f"x{axis}", yref=f"y{axis}", label=i == 0)
            _token_axis(fig, single.tokens[0], keep=[single.response_start[0]], row=row, col=col,
                        title=not stacked or i == k - 1)
        else:
            _vline(fig, -0.5, "response start", "black", "dash", xref=f"x{axis}",
                   yref=f"y{axis}", label=i == 0)
            fig.update_xaxes(title_text="tokens after the response start", row=row, col=col)
    fig.update_layout(
        coloraxis={"colorscale": COSINE_SCALE, "cmin": -1, "cmax": 1,
                   "colorbar": {"title": {"text": "cos"}}},
        title="Cosine per layer and token, one colour scale (click a cell to open that token)",
        height=(300 * k + 120) if stacked else 460,
    )
    return fig


def aligned_cosines(a: CosineTrace, b: CosineTrace, align: str = "position"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, cos_a, cos_b)`` on the positions both traces have: the same positions for the same
    tokens (``"position"``), else the same offsets from each response start; cosines
    ``[layer, x]`` at the layers both traced."""
    sa, sb = _example(a, 0), _example(b, 0)
    align = _check_align([sa, sb], align)
    layers = [layer for layer in sa.layers if layer in sb.layers]
    ca = sa.cos[0, sa.layer_indices(layers)].numpy()
    cb = sb.cos[0, sb.layer_indices(layers)].numpy()
    xa, xb = _aligned_x(sa, align), _aligned_x(sb, align)
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    x = np.arange(lo, hi + 1)
    return x, ca[:, x - xa[0]], cb[:, x - xb[0]]


def difference_heatmap(a: CosineTrace, b: CosineTrace, label_a: str, label_b: str, *,
                       align: str = "position") -> go.Figure:
    """Where two traces differ: ``cos(B) - cos(A)`` per layer and token (heatmap
    ``"difference"``, a symmetric colour scale; red: B rerouted more). Cells are clickable."""
    sa, sb = _example(a, 0), _example(b, 0)
    align = _check_align([sa, sb], align)
    x, ca, cb = aligned_cosines(sa, sb, align)
    layers = [layer for layer in sa.layers if layer in sb.layers]
    diff = cb - ca
    limit = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
    limit = max(limit, 1e-6)
    name_a, name_b = html.escape(label_a), html.escape(label_b)
    fig = go.Figure(go.Heatmap(
        z=diff, x=x, y=[f"layer {layer}" for layer in layers], zmid=0, zmin=-limit, zmax=limit,
        colorscale="RdBu", name="difference", hoverinfo="skip",
        colorbar={"title": {"text": "Δ cos"}},
    ))
    tokens_a, tokens_b = sa.tokens[0], sb.tokens[0]
    shift_a = sa.response_start[0] if align == "response" else 0
    shift_b = sb.response_start[0] if align == "response" else 0
    xs, ys, custom = [], [], []
    for i, layer in enumerate(layers):
        for j, pos in enumerate(x):
            pa, pb = int(pos + shift_a), int(pos + shift_b)
            xs.append(int(pos))
            ys.append(f"layer {layer}")
            custom.append([f"{display_token(tokens_a[pa])} (pos {pa})",
                           f"{display_token(tokens_b[pb])} (pos {pb})",
                           float(ca[i, j]), float(cb[i, j]), float(diff[i, j]), int(layer),
                           pa, pb])
    add_cells(fig, xs, ys, custom,
              f"%{{y}}<br>{name_a}: %{{customdata[0]}} - cos %{{customdata[2]:.3f}}<br>{name_b}: "
              "%{customdata[1]} - cos %{customdata[3]:.3f}<br>difference %{customdata[4]:+.3f}"
              "<extra></extra>")
    if align == "position":
        _segment_markers(fig, sa)
        _token_axis(fig, tokens_a, keep=[sa.response_start[0]])
    else:
        _vline(fig, -0.5, "response start", "black", "dash")
        fig.update_xaxes(title_text="tokens after the response start")
    fig.update_layout(title=f"Difference: cos({name_b}) - cos({name_a}) (red: {name_b} reroutes "
                            f"more; blue: {name_a} does)")
    return fig


# ---------------------------------------------------------------------- training curves
TRAIN_CURVES = {
    # name: (subplot column, colour, dash, label)
    "loss": (1, "#000000", "solid", "total loss = c_s·cb_loss + c_r·retain_loss"),
    "cb_loss": (1, "#d62728", "solid", "cb_loss (rerouting, L_s)"),
    "retain_loss": (1, "#1f77b4", "solid", "retain_loss (L_r)"),
    "cb_term": (1, "#ff9896", "dot", "c_s·cb_loss"),
    "retain_term": (1, "#9ecae1", "dot", "c_r·retain_loss"),
    "cb_cos": (2, "#9467bd", "solid", "cb_cos (harmful: falls to 0)"),
    "retain_cos": (2, "#2ca02c", "solid", "retain_cos (benign: stays at 1)"),
}
TOTAL_LOSS_NOTE = ("The total loss is c_s·cb_loss + c_r·retain_loss with c_s = α(1 - t/2T) "
                   "falling and c_r = α·t/2T rising from 0: the retain term gains weight as the "
                   "run goes on, so the total can rise while both losses fall.")


def training_curves(rows: Sequence[dict[str, Any]], total_steps: int | None = None) -> go.Figure:
    """Live LoRRA curves: the losses and their weighted terms (left), the cosines (right); every
    curve its own colour (traces named as the metrics, plus ``"cb_term"``, ``"retain_term"``
    and ``"val_cos"``)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "cosine (original vs adapted)"))
    steps = [row["step"] for row in rows]
    derived = {
        "cb_term": [_product(row.get("c_s"), row.get("cb_loss")) for row in rows],
        "retain_term": [_product(row.get("c_r"), row.get("retain_loss")) for row in rows],
    }
    for name, (col, color, dash, label) in TRAIN_CURVES.items():
        y = derived[name] if name in derived else [row.get(name) for row in rows]
        fig.add_trace(
            go.Scatter(x=steps, y=y, name=name, mode="lines", legendgroup=str(col),
                       line={"color": color, "dash": dash, "width": 2.5 if name == "loss" else 1.8},
                       hovertemplate=f"{label}<br>step %{{x}}: %{{y:.4f}}<extra></extra>"),
            row=1, col=col,
        )
    val = [(row["step"], row["val_cos"]) for row in rows if row.get("val_cos") is not None]
    if val:
        fig.add_trace(
            go.Scatter(x=[s for s, _ in val], y=[v for _, v in val], name="val_cos",
                       mode="lines+markers", line={"color": "#ff7f0e", "dash": "dash"},
                       hovertemplate="val_cos (held-out harmful)<br>step %{x}: %{y:.4f}"
                                     "<extra></extra>"),
            row=1, col=2,
        )
    if total_steps:
        fig.update_xaxes(range=[0, total_steps])
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(range=[-1.05, 1.05], row=1, col=2)
    fig.update_layout(height=380, legend={"orientation": "h", "y": -0.3})
    return fig


def _product(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(a) * float(b)


# ---------------------------------------------------------------------- HTML
def save_html(
    fig: go.Figure | Sequence[go.Figure],
    path: str | os.PathLike[str],
    *,
    title: str = "cbscope",
    plotlyjs: str = "beside",
    before: str = "",
    after: str = "",
) -> Path:
    """Write one figure, or several on one page, as HTML that works offline.

    Args:
        fig: A figure or several.
        path: The ``.html`` file.
        title: The page title.
        plotlyjs: ``"beside"`` (default): the page loads ``plotly-<version>.min.js`` from its own
            folder, written there once (:func:`cbscope.export.write_plotlyjs`), so a folder of
            pages holds one copy instead of 4.7 MB each; ``"inline"``: embedded (one
            self-contained file); ``"cdn"``: from the CDN.
        before: HTML put before the figures (already escaped by the caller).
        after: HTML put after them.
    """
    from cbscope.export import write_page

    figures = [fig] if isinstance(fig, go.Figure) else list(fig)
    return write_page(figures, path, title=title, plotlyjs=plotlyjs,  # type: ignore[arg-type]
                      before=before, after=after)


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
