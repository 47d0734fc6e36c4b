"""Figures to files: PNG and SVG through plotly's kaleido, HTML with one shared plotly.js.

PNG and SVG are drawn by ``kaleido`` (1.x), which drives a headless Chrome or Chromium. It never
downloads one here: :func:`browser_path` finds the browser (``$BROWSER_PATH``, which kaleido's
``choreographer`` honours too, else ``chromium``/``google-chrome`` on the ``PATH``, e.g. Debian's
``/usr/bin/chromium``) and hands it to kaleido, so export works offline.

HTML pages do not embed plotly.js (4.7 MB) each: they load ``plotly-<version>.min.js`` from the
folder they are written to (:func:`write_plotlyjs` puts it there once), so a folder of reports
holds one copy. ``plotlyjs="inline"`` embeds it instead (one self-contained file) and
``plotlyjs="cdn"`` loads it from the CDN.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cbscope.errors import ConfigError, ExportError

if TYPE_CHECKING:
    import plotly.graph_objects as go

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("png", "svg")
FORMATS = (*IMAGE_FORMATS, "html")
PlotlyJs = Literal["beside", "inline", "cdn"]
PLOTLYJS_MODES = ("beside", "inline", "cdn")
BROWSER_ENV = "BROWSER_PATH"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
#: Pixel size of an exported image when the figure sets none (scale 2 for print).
DEFAULT_WIDTH = 1100
DEFAULT_HEIGHT = 500
DEFAULT_SCALE = 2.0


def browser_path() -> str | None:
    """The Chrome/Chromium kaleido will drive: ``$BROWSER_PATH``, else the first of
    :data:`BROWSER_NAMES` on the ``PATH`` (None: none installed)."""
    env = os.environ.get(BROWSER_ENV)
    if env:
        return env if Path(env).is_file() else None
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _check_kaleido() -> None:
    try:
        import kaleido  # noqa: F401
    except ImportError as err:
        raise ExportError("PNG and SVG export needs kaleido: pip install 'kaleido>=1'") from err
    path = browser_path()
    if path is None:
        raise ExportError(
            "PNG and SVG export needs Chrome or Chromium for kaleido and found none: install it "
            f"(Debian/Ubuntu: apt-get install chromium) or set {BROWSER_ENV}=/path/to/chrome"
        )
    os.environ[BROWSER_ENV] = path  # kaleido's choreographer reads it: no download, no search


def image_export_problem() -> str:
    """Why PNG/SVG export cannot work here, in one sentence ('' when it can)."""
    try:
        _check_kaleido()
    except ExportError as err:
        return str(err)
    return ""


def figure_bytes(fig: go.Figure, fmt: str, *, width: int | None = None,
                 height: int | None = None, scale: float = DEFAULT_SCALE) -> bytes:
    """One figure as PNG or SVG bytes (kaleido), or as a self-contained HTML page.

    Args:
        fig: The figure.
        fmt: ``"png"``, ``"svg"`` or ``"html"`` (HTML: plotly.js inline, since the bytes travel
            alone, e.g. as a download).
        width: Image width in pixels (default: the figure's, else :data:`DEFAULT_WIDTH`).
        height: Image height (default: the figure's, else :data:`DEFAULT_HEIGHT`).
        scale: Pixel density of a PNG (2: sharp in print).

    Raises:
        ConfigError: An unknown format.
        ExportError: kaleido or a browser is missing, or the browser failed.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown figure format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "html":
        return fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")
    _check_kaleido()
    width = width or fig.layout.width or DEFAULT_WIDTH
    height = height or fig.layout.height or DEFAULT_HEIGHT
    try:
        return fig.to_image(format=fmt, width=width, height=height, scale=scale)
    except Exception as err:  # kaleido raises its own errors (browser start, timeouts)
        raise ExportError(f"kaleido could not draw the figure as {fmt.upper()} ({err}); "
                          f"check that {browser_path()} starts headless") from err


def save_figure(fig: go.Figure, path: str | os.PathLike[str], *,
                plotlyjs: PlotlyJs = "beside") -> Path:
    """Write a figure to ``path``: ``.png``, ``.svg`` or ``.html`` (by the suffix).

    An HTML file loads plotly.js from beside it (see :func:`write_plotlyjs`) unless
    ``plotlyjs`` says otherwise.

    Raises:
        ConfigError: An unknown suffix.
        ExportError: See :func:`figure_bytes`.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt == "html":
        return write_page([fig], path, plotlyjs=plotlyjs)
    data = figure_bytes(fig, fmt)
    from cbscope.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def plotlyjs_name() -> str:
    """File name of the shared plotly.js: ``plotly-<version>.min.js`` (versioned, so folders
    written by two plotly versions keep both)."""
    from plotly.offline import get_plotlyjs_version

    return f"plotly-{get_plotlyjs_version()}.min.js"


def write_plotlyjs(folder: str | os.PathLike[str]) -> Path:
    """Put plotly.js into ``folder`` once (left alone when it is already there); its path."""
    from plotly.offline import get_plotlyjs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / plotlyjs_name()
    if not path.is_file() or path.stat().st_size == 0:
        from cbscope.io import atomic_write_text

        atomic_write_text(path, get_plotlyjs())
    return path


def plotlyjs_tag(mode: PlotlyJs, folder: str | os.PathLike[str] | None) -> str:
    """The ``<script>`` that loads plotly.js for a page written into ``folder``.

    ``"beside"`` writes the shared file there (:func:`write_plotlyjs`) and refers to it by its
    name; ``"inline"`` embeds it; ``"cdn"`` points at the CDN.

    Raises:
        ConfigError: An unknown mode, or ``"beside"`` without a folder.
    """
    if mode not in PLOTLYJS_MODES:
        raise ConfigError(f"plotlyjs must be one of {', '.join(PLOTLYJS_MODES)}, not {mode!r}")
    if mode == "inline":
        from plotly.offline import get_plotlyjs

        return f'<script type="text/javascript">{get_plotlyjs()}</script>'
    if mode == "cdn":
        from plotly.offline import get_plotlyjs_version

        return (f'<script src="https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js" '
                'charset="utf-8"></script>')
    if folder is None:
        raise ConfigError('plotlyjs="beside" needs the folder the page is written to')
    return f'<script src="{write_plotlyjs(folder).name}" charset="utf-8"></script>'


def write_page(figures: Sequence[go.Figure], path: str | os.PathLike[str], *,
               title: str = "cbscope", plotlyjs: PlotlyJs = "beside", before: str = "",
               after: str = "") -> Path:
    """Write figures as one HTML page (atomically); plotly.js as ``plotlyjs`` says
    (:func:`plotlyjs_tag`: by default one shared file beside the page)."""
    from cbscope.io import atomic_write_text

    if not figures:
        raise ValueError("no figures to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    script = plotlyjs_tag(plotlyjs, path.parent)
    page = figures_page(figures, title=title, plotlyjs_script=script, before=before, after=after)
    return atomic_write_text(path, page)


def figures_page(figures: Sequence[go.Figure], *, title: str, plotlyjs_script: str,
                 before: str = "", after: str = "") -> str:
    """An HTML page of figures (plotly.js loaded once by ``plotlyjs_script``), with optional
    HTML before and after them."""
    import html

    import plotly.io as pio

    parts = [pio.to_html(fig, include_plotlyjs=False, full_html=False, default_width="100%")
             for fig in figures]
    return (
        "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\" />"
        f"<title>{html.escape(title)}</title>\n{plotlyjs_script}\n</head>\n<body>\n{before}\n"
        + "\n".join(f"<div>{part}</div>" for part in parts)
        + f"\n{after}\n</body>\n</html>\n"
    )
