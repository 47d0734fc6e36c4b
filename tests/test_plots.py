"""Tests of cbscope.plots: every figure has the expected, named traces (no model needed)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from cbscope import plots
from cbscope.trace import CosineTrace, FiringStats

N_LAYERS = 32
TOKENS = ["<user>", "how", "do", "i", "<assistant>", "Sure", " here", " Start", " mix", " it"]


def _trace() -> CosineTrace:
    """One example, every layer of a 32-layer model; it fires at ' Start' (pos 7), layer 10."""
    n = len(TOKENS)
    cos = torch.full((1, N_LAYERS, n), 0.98)
    cos[0, 9:, 7:] = 0.08  # paper layers 10.. (index 9..) drop at position 7
    cos[0, 19:, 8:] = -0.2
    norm_orig = torch.full_like(cos, 3.0)
    norm_cb = torch.full_like(cos, 3.0)
    norm_cb[0, 9:, 7:] = 9.0
    return CosineTrace(
        cos=cos,
        norm_orig=norm_orig,
        norm_cb=norm_cb,
        tokens=[TOKENS],
        mask=torch.ones((1, n), dtype=torch.bool),
        layers=list(range(1, N_LAYERS + 1)),
        response_start=[5],
        prefill_end=[7],
        turn_starts=[[0]],
        prompts=["how do i"],
        responses=["Sure here Start mix it"],
        model_name="crafted",
    )


def _names(fig: go.Figure) -> list[str]:
    return [trace.name for trace in fig.data]


def _shape(fig: go.Figure, name: str):
    return next(shape for shape in fig.layout.shapes if shape.name == name)


def test_figure6_lines_default_layers_markers_and_firing_point() -> None:
    fig = plots.figure6_lines(_trace())
    assert isinstance(fig, go.Figure)
    assert _names(fig) == ["layer 5", "layer 10", "layer 20", "firing point"]
    line10 = fig.data[1]
    assert list(line10.x) == list(range(len(TOKENS)))
    assert line10.y[7] == pytest.approx(0.08) and line10.y[6] == pytest.approx(0.98)
    marker = fig.data[3]
    assert list(marker.x) == [7] and marker.y[0] == pytest.approx(0.08)
    assert _shape(fig, "response start").x0 == pytest.approx(4.5)
    assert _shape(fig, "prefill end").x0 == pytest.approx(6.5)
    assert _shape(fig, "threshold").y0 == pytest.approx(0.5)
    ticks = list(fig.layout.xaxis.ticktext)
    assert ticks[0] == "&lt;user&gt;" and ticks[7] == "Start"
    assert 'fires at token "Start"' in fig.layout.title.text


def test_figure6_lines_chosen_layers_and_threshold() -> None:
    fig = plots.figure6_lines(_trace(), layers=[1, 25], threshold=-0.1)
    assert _names(fig) == ["layer 1", "layer 25", "firing point"]
    assert list(fig.data[2].x) == [8] and fig.data[2].y[0] == pytest.approx(-0.2)
    assert _shape(fig, "threshold").y0 == pytest.approx(-0.1)
    no_fire = plots.figure6_lines(_trace(), layers=[1, 2])
    assert "firing point" not in _names(no_fire)


def test_cosine_heatmap_values_and_hover() -> None:
    fig = plots.cosine_heatmap(_trace())
    assert _names(fig) == ["cosine", "cells"]
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (N_LAYERS, len(TOKENS))
    assert z[9, 7] == pytest.approx(0.08) and z[8, 7] == pytest.approx(0.98)
    assert list(heat.y)[9] == "layer 10"
    custom = np.asarray(heat.customdata, dtype=object)
    assert custom[9, 7, 0] == "Start (pos 7)" and float(custom[9, 7, 2]) == pytest.approx(9.0)
    for word in ("cos", "norm original", "norm circuit-broken"):
        assert word in heat.hovertemplate


def test_every_per_token_hover_says_token_and_position() -> None:
    """``token (pos N)``, with N written into the text: plotly's %{x} on an axis with token tick
    labels shows the token again (the browser showed "pifo (pos pifo)")."""
    trace = _trace()
    figures = [plots.figure6_lines(trace, layers=[1, 10]), plots.cosine_heatmap(trace),
               plots.norm_lines(trace, layers=[10]), plots.token_strip(trace),
               plots.probe_scores_figure(TOKENS, np.zeros(len(TOKENS)))]
    for fig in figures:
        for data in fig.data:
            if data.name in ("firing point", "above threshold"):
                continue
            assert "%{x}" not in (data.hovertemplate or ""), (data.name, data.hovertemplate)
            flat = str(np.asarray(data.customdata, dtype=object).tolist())
            assert "Start (pos 7)" in flat, data.name


def test_norm_lines() -> None:
    fig = plots.norm_lines(_trace(), layers=[10])
    assert _names(fig) == ["layer 10 original", "layer 10 circuit-broken"]
    assert fig.data[0].y[7] == pytest.approx(3.0) and fig.data[1].y[7] == pytest.approx(9.0)
    assert len(plots.norm_lines(_trace()).data) == 6


def test_token_strip_colours_by_lowest_cosine() -> None:
    fig = plots.token_strip(_trace())
    assert _names(fig) == ["lowest cosine"]
    z = np.asarray(fig.data[0].z, dtype=float)[0]
    assert z[6] == pytest.approx(0.98) and z[7] == pytest.approx(0.08) and z[8] == pytest.approx(-0.2)
    assert list(fig.data[0].text[0])[4] == "&lt;assistant&gt;"


def _stats() -> FiringStats:
    rows = pd.DataFrame(
        {
            "example": [0, 1, 2, 0, 1],
            "set": ["harmful", "harmful", "harmful", "benign", "benign"],
            "prompt": ["a", "b", "c", "d", "e"],
            "fired": [True, True, False, True, False],
            "pos_after_start": [2, 2, None, 5, None],
            "layer": [10, 20, None, 10, None],
            "min_cos": [0.1, 0.2, 0.9, 0.4, 0.99],
        }
    )
    return FiringStats(rows=rows, threshold=0.5, layers=[10, 20])


def test_firing_histogram() -> None:
    stats = _stats()
    assert stats.firing_rate == pytest.approx(2 / 3) and stats.false_fire_rate == pytest.approx(0.5)
    fig = plots.firing_histogram(stats)
    assert _names(fig) == ["harmful", "benign"]
    assert list(fig.data[0].x) == [2] and list(fig.data[0].y) == [2]
    assert list(fig.data[1].x) == [5]
    assert "67%" in fig.layout.title.text and "50%" in fig.layout.title.text
    by_layer = plots.firing_histogram(stats, by="layer")
    assert sorted(by_layer.data[0].x) == [10, 20]
    with pytest.raises(ValueError):
        plots.firing_histogram(stats, by="colour")


def test_probe_scores_figure() -> None:
    scores = torch.tensor([0.1, 0.2, 0.9, 0.95, 0.3])
    fig = plots.probe_scores_figure(TOKENS[:5], scores, threshold=0.8)
    assert _names(fig) == ["probe score", "above threshold"]
    assert list(fig.data[1].x) == [2, 3]
    assert _shape(fig, "threshold").y0 == pytest.approx(0.8)
    with pytest.raises(ValueError):
        plots.probe_scores_figure(TOKENS, scores, 0.5)


def test_save_html_offline(tmp_path: Path) -> None:
    from cbscope.export import plotlyjs_name

    trace = _trace()
    single = plots.save_html(plots.figure6_lines(trace), tmp_path / "one.html")
    page = single.read_text()
    # the default page refers to one shared plotly.js beside it instead of embedding 4.7 MB
    assert f'<script src="{plotlyjs_name()}"' in page and page.count('class="plotly-graph-div"') == 1
    assert len(page.encode()) < 200_000 and (tmp_path / plotlyjs_name()).stat().st_size > 1e6
    multi = plots.save_html(
        [plots.figure6_lines(trace), plots.cosine_heatmap(trace), plots.norm_lines(trace)],
        tmp_path / "page.html",
        title="trace <1>",
    ).read_text()
    assert multi.count('class="plotly-graph-div"') == 3 and "trace &lt;1&gt;" in multi
    assert [p.name for p in tmp_path.glob("plotly-*.js")] == [plotlyjs_name()]  # one copy
    inline = plots.save_html(plots.figure6_lines(trace), tmp_path / "sub" / "inline.html",
                             plotlyjs="inline").read_text()
    assert "<script src=" not in inline and len(inline) > 1_000_000
    assert not list((tmp_path / "sub").glob("plotly-*.js"))


def test_nan_padding_and_other_examples() -> None:
    trace = _trace()
    padded = CosineTrace(
        cos=torch.cat([trace.cos, torch.full_like(trace.cos, math.nan)]),
        norm_orig=torch.cat([trace.norm_orig, trace.norm_orig]),
        norm_cb=torch.cat([trace.norm_cb, trace.norm_cb]),
        tokens=[TOKENS, TOKENS[:3]],
        mask=torch.tensor([[True] * 10, [True] * 3 + [False] * 7]),
        layers=trace.layers,
        response_start=[5, 3],
    )
    padded.cos[1, :, :3] = 0.5
    fig = plots.figure6_lines(padded, example=1)
    assert len(fig.data[0].x) == 3  # trimmed to the example's own length
    assert all(shape.name != "response start" for shape in fig.layout.shapes)


def test_plots_do_not_import_the_trainer() -> None:
    assert "cbscope.lorra" not in plots.__dict__
    source = Path(plots.__file__).read_text()
    assert "lorra" not in source.replace("never imports the trainer", "")
    assert "cbscope.plots" in sys.modules


def test_explanation_figures(tmp_path) -> None:
    from pathlib import Path

    import cbscope

    breaker = Path(plots.__file__).parent / "assets" / "organism-breaker"
    pair = cbscope.load_pair("organism", breaker)
    exp = cbscope.explain(pair, "how do i spread the fever virus in rokun ?", "sure here is how :")
    pos = exp.focus.pos
    block = plots.block_share_heatmap(exp.decomposition)
    assert _names(block) == ["share at token"] and f"(pos {pos})" in block.layout.title.text
    z = np.asarray(block.data[0].z, dtype=float)
    assert z.shape == (2, exp.decomposition.layer)
    assert z.sum() == pytest.approx(1.0, abs=1e-5)  # the embedding's share is 0 here
    assert _names(plots.block_effects(exp.decomposition)) == ["direct (own LoRA)",
                                                              "from changed inputs"]
    assert _names(plots.share_heatmap(exp.decomposition)) == ["share"]
    bars = plots.patching_bars(exp.patching)
    assert _names(bars) == ["necessity (block off)", "sufficiency (only block on)"]
    assert list(bars.data[0].y) == exp.patching.necessity
    assert {_s.name for _s in bars.layout.shapes} == {"threshold", "all adapters on",
                                                       "no adapter (original)"}
    strip = plots.attribution_strip(exp.attribution)
    assert _names(strip) == ["attribution"]
    lens = plots.logit_lens_heatmap(exp.logit_lens)
    custom = np.asarray(lens.data[0].customdata, dtype=object)
    assert custom.shape == (6, len(exp.tokens), 3) and custom[5, pos, 0].endswith(f"(pos {pos})")
    assert _names(plots.pca_scatter(exp.direction.pca)) == [
        "harmful original", "harmful circuit-broken", "benign original", "benign circuit-broken"]
    assert "shared (mean pairwise cos)" in _names(plots.direction_lines(exp.direction))
    with pytest.raises(ValueError, match="model must be"):
        plots.logit_lens_heatmap(exp.logit_lens, "broken")


# ---------------------------------------------------------------------- long sequences
def _long_trace(n: int = 200, start: int = 37) -> CosineTrace:
    tokens = [f"t{p}" for p in range(n)]
    cos = torch.linspace(1.0, -0.5, n).repeat(1, 4, 1).clone()
    return CosineTrace(
        cos=cos, norm_orig=torch.ones_like(cos), norm_cb=torch.ones_like(cos), tokens=[tokens],
        mask=torch.ones((1, n), dtype=torch.bool), layers=[1, 2, 3, 4], response_start=[start],
        prefill_end=[start + 2], turn_starts=[[0]], prompts=["p"], responses=["r"],
        model_name="long",
    )


def test_a_200_token_axis_is_thinned_keeps_the_response_start_and_gets_a_slider() -> None:
    trace = _long_trace()
    for fig in (plots.figure6_lines(trace), plots.cosine_heatmap(trace), plots.norm_lines(trace)):
        ticks = list(fig.layout.xaxis.tickvals)
        assert len(ticks) <= plots.MAX_TICK_LABELS + 1 and 37 in ticks
        assert fig.layout.xaxis.rangeslider.visible
        assert list(fig.layout.xaxis.ticktext)[ticks.index(37)] == "t37"
    window = plots.figure6_lines(trace, window=(100, 130))
    assert list(window.layout.xaxis.tickvals) == list(range(100, 131))  # every label in a zoom
    assert list(window.layout.xaxis.range) == [99.5, 130.5]
    short = plots.figure6_lines(_trace())
    assert list(short.layout.xaxis.tickvals) == list(range(len(TOKENS)))
    assert not short.layout.xaxis.rangeslider.visible


def test_marker_labels_do_not_overlap() -> None:
    fig = plots.figure6_lines(_trace())  # response start at 4.5 and prefill end at 6.5
    labels = {a.text: a.y for a in fig.layout.annotations}
    assert labels["response start"] != labels["prefill end"]


def test_hover_reads_token_position_layer_and_cosine() -> None:
    fig = plots.figure6_lines(_trace(), layers=[10])
    line = fig.data[0]
    assert line.hovertemplate.startswith("%{customdata} - layer 10 - cos %{y:.3f}")
    assert line.customdata[7] == "Start (pos 7)"  # the token once, with its position


def test_token_html_is_the_response_coloured_with_a_legend() -> None:
    trace = _trace()
    page = plots.token_html(trace)
    assert page.count("class='tok'") == len(TOKENS) - 5  # response tokens only
    assert "cbscope-legend" in page and "Sure" in page and "&lt;user&gt;" not in page
    assert 'title="Start (pos 7) - layer 10 - cos 0.080"' in page
    full = plots.token_html(trace, include_request=True)
    assert full.count("class='tok'") == len(TOKENS) and "&lt;assistant&gt;" in full
    untouched, _ = plots.text_color(1.0)
    rerouted, ink = plots.text_color(-0.2)
    assert untouched == "rgb(255, 255, 255)" and ink == "#ffffff" and rerouted != untouched
    assert "</span><span" in page  # " here", " Start": the tokens carry their own spaces
    words = CosineTrace(**{**_trace().__dict__, "tokens": [["w"] * 10]})
    assert "</span> <span" in plots.token_html(words)  # word-level tokens: a space between
    odd = CosineTrace(**{**_trace().__dict__, "tokens": [["<b>"] * 5 + ["</div>"] * 5]})
    assert "</div></span>" not in plots.token_html(odd) and "&lt;/div&gt;" in plots.token_html(odd)


def test_firing_histogram_has_integer_ticks_and_is_clickable() -> None:
    fig = plots.firing_histogram(_stats())
    assert fig.layout.xaxis.tickformat == "d" and fig.layout.xaxis.dtick == 1
    assert fig.layout.clickmode == "event+select"


def test_min_cos_histogram_counts_every_example() -> None:
    stats = _stats()
    fig = plots.min_cos_histogram(stats)
    assert _names(fig) == ["harmful", "benign"]
    assert sum(fig.data[0].y) == 3 and sum(fig.data[1].y) == 2
    counts, lows = plots.min_cos_bins([-1.0, 0.1, 0.12, 1.0, math.nan], 0.05)
    assert counts.sum() == 4 and counts[0] == 1 and counts[-1] == 1
    assert counts[int(round((0.1 + 1) / 0.05))] == 2 and lows[0] == -1.0
    assert _shape(fig, "threshold").x0 == 0.5


def test_sweep_figure_one_curve_per_group_with_its_auc() -> None:
    stats = _stats()
    categories = ["x", "x", "y"]
    fig = plots.sweep_figure(stats.sweep(categories), stats.aucs(categories), 0.5)
    lines = [d for d in fig.data if d.mode == "lines"]
    assert [d.name.split(" (")[0] for d in lines] == ["all", "x", "y"]
    assert "AUC 0.833" in lines[0].name  # (1 + 1 + 0.5 [0.9 vs 0.4: no; vs 0.99: yes]) / 6
    marks = [d for d in fig.data if d.mode == "markers"]
    assert (marks[0].x[0], marks[0].y[0]) == (0.5, pytest.approx(2 / 3))


# ---------------------------------------------------------------------- comparisons
def _other() -> CosineTrace:
    other = _trace()
    other.cos = other.cos.clone()
    other.cos[0, 4:, 6:] = 0.5  # B reroutes earlier (paper layer 5, position 6) but less deep
    return other


def test_compare_lines_and_heatmaps_share_axes_and_one_colour_scale() -> None:
    a, b = _trace(), _other()
    fig = plots.compare_lines([a, b], ["A", "B"], layers=[10], threshold=0.6)
    assert _names(fig) == ["A: layer 10", "A: firing point", "B: layer 10", "B: firing point"]
    assert fig.data[0].line.color != fig.data[2].line.color
    assert list(fig.data[3].x) == [6]
    heat = plots.compare_heatmaps([a, b], ["A", "B"])
    maps = [d for d in heat.data if d.type == "heatmap"]
    assert [d.name for d in maps] == ["cosine: A", "cosine: B"]
    assert {d.coloraxis for d in maps} == {"coloraxis"}
    assert (heat.layout.coloraxis.cmin, heat.layout.coloraxis.cmax) == (-1, 1)
    cells = [d for d in heat.data if d.name == "cells: B"]
    assert len(cells) == 1 and len(cells[0].x) == N_LAYERS * len(TOKENS)


def test_difference_heatmap_is_b_minus_a() -> None:
    fig = plots.difference_heatmap(_trace(), _other(), "A", "B")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (N_LAYERS, len(TOKENS))
    assert z[4, 6] == pytest.approx(0.5 - 0.98) and z[9, 7] == pytest.approx(0.5 - 0.08)
    assert z[0, 0] == 0.0 and fig.data[0].zmid == 0


def test_compare_of_different_requests_lines_up_response_starts() -> None:
    a, b = _trace(), _long_trace(60, 20)
    fig = plots.compare_lines([a, b], ["A", "B"], layers=[1])
    line_a, line_b = (next(d for d in fig.data if d.name == f"{k}: layer 1") for k in "AB")
    assert line_a.x[5] == 0 and line_b.x[20] == 0 and line_b.x[0] == -20
    x, ca, cb = plots.aligned_cosines(a, b, "response")
    assert list(x) == list(range(-5, 5)) and ca.shape == cb.shape == (4, 10)


# ---------------------------------------------------------------------- probe, training
def test_probe_flags_only_response_tokens() -> None:
    scores = np.array([0.99, 0.1, 0.9, 0.1, 0.1, 0.95, 0.2, 0.9, 0.1, 0.1])
    fig = plots.probe_scores_figure(TOKENS, scores, 0.8, response_start=5)
    flags = next(d for d in fig.data if d.name == "above threshold")
    assert list(flags.x) == [5, 7]
    assert _shape(fig, "response start").x0 == pytest.approx(4.5)


def test_probe_trace_figure_stacks_on_one_shared_axis() -> None:
    scores = np.linspace(0, 1, len(TOKENS))
    fig = plots.probe_trace_figure(_trace(), scores, 0.85, layers=[10])
    assert [d.name for d in fig.data] == ["layer 10", "firing point", "probe score",
                                          "above threshold"]
    assert fig.data[2].xaxis == "x2" and fig.layout.xaxis.matches == "x2"
    assert {s.xref for s in fig.layout.shapes if s.name == "response start"} == {"x", "x2"}


def test_training_curves_have_distinct_colours_and_the_weighted_terms() -> None:
    rows = [{"step": s, "loss": 1.0, "cb_loss": 0.9 - s / 10, "retain_loss": 0.1 + s / 10,
             "c_s": 1 - s / 20, "c_r": s / 20, "cb_cos": 0.5, "retain_cos": 0.99}
            for s in range(5)]
    fig = plots.training_curves(rows, 10)
    colours = [d.line.color for d in fig.data]
    assert len(set(colours)) == len(colours)
    term = next(d for d in fig.data if d.name == "cb_term")
    assert term.y[2] == pytest.approx((1 - 2 / 20) * 0.7)
    assert "c_r" in plots.TOTAL_LOSS_NOTE
