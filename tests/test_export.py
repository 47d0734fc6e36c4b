"""Tests of cbscope.export: PNG and SVG through kaleido (offline, the system's Chromium), HTML
pages that share one plotly.js."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import pytest

from cbscope import export
from cbscope.errors import ConfigError, ExportError


def _figure() -> go.Figure:
    fig = go.Figure(go.Scatter(x=[0, 1, 2], y=[1.0, 0.2, -0.3], name="layer 10"))
    fig.update_layout(title="cosine", width=640, height=360)
    return fig


needs_browser = pytest.mark.skipif(export.browser_path() is None,
                                   reason="no Chrome/Chromium for kaleido on this machine")


@needs_browser
def test_png_svg_and_html_are_written(tmp_path: Path) -> None:
    fig = _figure()
    png = export.save_figure(fig, tmp_path / "fig.png")
    svg = export.save_figure(fig, tmp_path / "fig.svg")
    page = export.save_figure(fig, tmp_path / "fig.html")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (640 * 2, 360 * 2)  # the figure's size at scale 2
    text = svg.read_text()
    assert text.startswith("<svg") and "cosine" in text
    # HTML refers to the one plotly.js beside it: small, and the script is there once
    html = page.read_text()
    assert len(page.read_bytes()) < 100_000
    assert f'src="{export.plotlyjs_name()}"' in html
    shared = tmp_path / export.plotlyjs_name()
    assert shared.stat().st_size > 1_000_000
    export.save_figure(fig, tmp_path / "again.html")
    assert len(list(tmp_path.glob("plotly-*.min.js"))) == 1


def test_html_bytes_are_self_contained_for_a_download() -> None:
    data = export.figure_bytes(_figure(), "html")
    assert b"<script src=" not in data and len(data) > 1_000_000


def test_a_missing_browser_is_a_one_line_named_error(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv(export.BROWSER_ENV, str(tmp_path / "no-chrome"))
    assert export.browser_path() is None
    with pytest.raises(ExportError, match="Chrome or Chromium") as info:
        export.figure_bytes(_figure(), "png")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "fig.png").exists()
    assert export.image_export_problem() == str(info.value)


def test_unknown_formats_and_modes_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown figure format"):
        export.save_figure(_figure(), tmp_path / "fig.jpg")
    with pytest.raises(ConfigError, match="plotlyjs must be one of"):
        export.plotlyjs_tag("embed", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs the folder"):
        export.plotlyjs_tag("beside", None)
    assert "cdn.plot.ly" in export.plotlyjs_tag("cdn", None)
