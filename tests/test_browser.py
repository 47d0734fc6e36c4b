"""The dashboard in a real browser: ``cbscope app`` in a subprocess, driven by playwright.

Uses Debian's chromium (``/usr/bin/chromium``; no browser download). Skips only when chromium or
playwright is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SERVER_START_S = 60
PAGE_TIMEOUT_MS = 60_000

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Wait for Streamlit's health endpoint (fail early if the server died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the server did not answer within {timeout_s} s")


@pytest.fixture(scope="module")
def breaker(tiny_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA adapter on the tiny organism."""
    from peft import LoraConfig

    from cbscope.pair import load_pair

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    return load_pair(tiny_organism, lora_config=config).save_adapter(
        tmp_path_factory.mktemp("browser_breaker") / "adapter")


@contextlib.contextmanager
def running_app(tiny_organism: Path, breaker: Path, tmp_path: Path) -> Iterator[str]:
    """``cbscope app`` on a free port, stopped (its process group) on exit; yields the URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CBSCOPE_APP_MODEL": str(tiny_organism),
           "CBSCOPE_APP_ADAPTER": str(breaker), "CBSCOPE_CACHE": str(tmp_path / "cache")}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "cbscope", "app", "--port", str(port), "--host", "127.0.0.1",
         "--no-browser"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_healthy(url, server, SERVER_START_S)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()


def wait_idle(page: Any) -> None:
    """Wait until Streamlit's status widget no longer says it is running."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " || !document.querySelector('[data-testid=\"stStatusWidget\"]').innerText"
        ".includes('Running')")


def hover_text(page: Any, chart: Any) -> str:
    """Move the mouse over the middle of a plotly chart's plot area; the hover label's text."""
    area = chart.locator(".nsewdrag").first
    area.scroll_into_view_if_needed()  # the mouse only reaches what is in the viewport
    box = area.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    label = chart.locator(".hoverlayer .hovertext")
    label.first.wait_for()
    return label.first.text_content() or ""  # an SVG node: no inner_text


def test_browser_prompt_to_figure(tiny_organism: Path, breaker: Path, tmp_path: Path) -> None:
    from cbscope.organism import World

    world = World.from_json(tiny_organism / "world.json")
    topic = world.select("benign")[0]
    prompt_text = world.render_request(topic, world.train_templates[-1])
    last_word = topic.name.split()[-1]
    started = time.monotonic()
    with running_app(tiny_organism, breaker, tmp_path) as url, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            shot = tmp_path / "where.png"
            page.goto(url + "/?view=where&gen=4&threshold=0.9")
            prompt = page.get_by_role("textbox", name="Prompt (the user's request)", exact=True)
            prompt.wait_for()
            prompt.fill(prompt_text)
            page.get_by_role("button", name="Trace", exact=True).click()
            page.wait_for_function(
                "text => [...document.querySelectorAll('.js-plotly-plot .xtick text')]"
                ".some(t => t.textContent === text)", arg=last_word)
            page.wait_for_selector('[data-testid="stPlotlyChart"] .js-plotly-plot')
            wait_idle(page)
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0
            assert "The breaker" in page.inner_text("body")
            assert page.locator('[data-testid="stPlotlyChart"]').count() >= 3
            assert "prompt=" + urllib.parse.quote_plus(prompt_text) in page.url
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert time.monotonic() - started < 90


def test_browser_why_view_from_where_in_one_click(tiny_organism: Path, breaker: Path,
                                                 tmp_path: Path) -> None:
    started = time.monotonic()
    with running_app(tiny_organism, breaker, tmp_path) as url, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(url + "/?view=where&gen=0&threshold=0.9")
            page.wait_for_selector('[data-testid="stPlotlyChart"] .js-plotly-plot')
            wait_idle(page)
            heatmap = page.locator('[data-testid="stPlotlyChart"]').nth(1)  # lines, heatmap, norms
            assert re.search(r"\(pos \d+\)", hover_text(page, heatmap))
            page.get_by_role("button", name="Why does it fire? →").click()
            page.get_by_text("Which blocks' adapters make it fire?").wait_for()
            page.wait_for_function(
                "() => document.querySelectorAll('[data-testid=\"stPlotlyChart\"]').length >= 6")
            wait_idle(page)
            page.screenshot(path=str(tmp_path / "why.png"), full_page=True)
            body = page.inner_text("body")
            for words in ("Attention or MLP?", "Which tokens trigger it?",
                          "Where does the representation go?", "minimal sufficient set"):
                assert words in body, words
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0
            assert "view=why" in page.url
            lens = page.locator('[data-testid="stPlotlyChart"]').filter(has_text="Logit lens")
            text = hover_text(page, lens.first)
            assert re.search(r"\(pos \d+\)", text) and "circuit-broken:" in text, text
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert time.monotonic() - started < 90


# ---------------------------------------------------------------------- every view
def assert_no_error(page: Any) -> None:
    """No exception and no error alert in the page."""
    assert page.locator('[data-testid="stException"]').count() == 0
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, [errors.nth(i).inner_text() for i in range(errors.count())]


def open_view(page: Any, url: str, query: str, shot: Path, *, charts: int = 1) -> None:
    """Load a view, wait for its charts and for Streamlit to be idle, screenshot it, and check
    that no error element appears."""
    page.goto(f"{url}/?{query}")
    if charts:
        page.wait_for_function(
            "n => document.querySelectorAll('[data-testid=\"stPlotlyChart\"] .js-plotly-plot')"
            ".length >= n", arg=charts)
    else:
        page.wait_for_selector('[data-testid="stMain"] h1, [data-testid="stMain"] h2')
    wait_idle(page)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    assert_no_error(page)


def click_plot_centre(page: Any, chart: Any, fx: float = 0.5, fy: float = 0.5) -> None:
    """Click a plotly chart's plot area at a fraction of its size (a heatmap cell there)."""
    area = chart.locator(".nsewdrag").first
    area.scroll_into_view_if_needed()
    box = area.bounding_box()
    page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
    chart.locator(".hoverlayer .hovertext").first.wait_for()
    page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)


@pytest.fixture(scope="module")
def breaker_b(tiny_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second random adapter: breaker B of the Compare view."""
    from peft import LoraConfig

    from cbscope.pair import load_pair

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    return load_pair(tiny_organism, lora_config=config).save_adapter(
        tmp_path_factory.mktemp("browser_breaker_b") / "adapter")


@pytest.fixture(scope="module")
def matrix_dir(tiny_organism: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A leave-one-out matrix of the tiny organism (2 steps per run)."""
    from cbscope.generalise import generalisation_matrix
    from cbscope.lorra.config import LorraConfig
    from cbscope.lorra.presets import ORGANISM_CONFIG

    config = LorraConfig.from_dict({**ORGANISM_CONFIG.to_dict(), "steps": 2,
                                    "target_layers": [2, 4]})
    out = tmp_path_factory.mktemp("browser_matrix") / "loo"
    generalisation_matrix(tiny_organism, config=config, out_dir=out,
                          data_options={"n_novel": 0}, show_progress=False)
    return out


def test_browser_every_view_screenshots_and_clicks(tiny_organism: Path, breaker: Path,
                                                   breaker_b: Path, matrix_dir: Path,
                                                   tmp_path: Path) -> None:
    """Each view in Chromium: a full-page screenshot and no error element; a click on a heatmap
    cell, a table row and a matrix cell opens its example."""
    quote = urllib.parse.quote_plus
    with running_app(tiny_organism, breaker, tmp_path) as url, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        # tall: Streamlit scrolls inside its main block, so a "full page" shot is the viewport
        page = browser.new_page(viewport={"width": 1400, "height": 3200})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            # where: a heatmap cell click opens that token
            open_view(page, url, "view=where&gen=4&threshold=0.9", tmp_path / "where.png",
                      charts=2)
            heatmap = page.locator('[data-testid="stPlotlyChart"]').filter(
                has_text="Cosine per layer and token")
            click_plot_centre(page, heatmap.first)
            page.get_by_text(re.compile(r"Why does the cosine move at this token \(pos \d+\)"))\
                .wait_for()
            wait_idle(page)
            assert re.search(r"Token .+ \(pos \d+\).*layer \d+", page.inner_text("body"))
            assert_no_error(page)

            # a long trace: thinned tick labels (the tiny organism's context is 128 tokens)
            prefill = " ".join(["sure here is how :"] * 22)
            open_view(page, url, f"view=where&gen=0&threshold=0.9&prefill={quote(prefill)}",
                      tmp_path / "where_long.png", charts=2)
            lines = page.locator('[data-testid="stPlotlyChart"]').first
            ticks = lines.locator(".xtick text").count()
            assert 0 < ticks <= 41, ticks

            # compare: two breakers, and a request with its look-alike
            open_view(page, url, f"view=compare&b2={quote(str(breaker_b))}&gen=0&threshold=0.9",
                      tmp_path / "compare.png", charts=3)
            assert "Where they differ" in page.inner_text("body")
            open_view(page, url, "view=compare&cmp=prompts&gen=0", tmp_path / "compare_look.png",
                      charts=3)

            # dataset: a click on a table row opens the example in "Where does it fire?"
            open_view(page, url, "view=dataset&threshold=0.9", tmp_path / "dataset.png",
                      charts=3)
            grid = page.locator('[data-testid="stDataFrame"]').last
            for _ in range(3):  # the grid may still move while the page settles: click again
                grid.scroll_into_view_if_needed()
                wait_idle(page)
                box = grid.bounding_box()
                page.mouse.click(box["x"] + 14, box["y"] + 35 + 17)  # the first row's selector
                try:
                    page.wait_for_url(re.compile(r"view=where"), timeout=20_000)
                    break
                except Exception:  # noqa: BLE001 - playwright's TimeoutError: try once more
                    continue
            page.wait_for_url(re.compile(r"view=where"), timeout=5_000)
            page.wait_for_selector('[data-testid="stPlotlyChart"] .js-plotly-plot')
            wait_idle(page)
            assert "gen=0" in page.url and "prefill=" in page.url
            assert_no_error(page)

            # probe, train, why
            open_view(page, url, "view=probe&gen=0&threshold=0.9", tmp_path / "probe.png")
            open_view(page, url, "view=train", tmp_path / "train.png", charts=0)
            open_view(page, url, "view=why&gen=0&threshold=0.9", tmp_path / "why.png", charts=3)

            # generalisation: the README's folder is a sentence; a cell click opens its examples
            readme = Path(__file__).resolve().parents[1] / "benchmarks/results/generalise/loo"
            open_view(page, url, f"view=generalisation&matrix={quote(str(readme))}",
                      tmp_path / "generalisation_readme.png")
            page.wait_for_function(  # the note comes after the matrix and its table
                "() => document.body.innerText.includes('has only')", timeout=60_000)
            open_view(page, url, f"view=generalisation&matrix={quote(str(matrix_dir))}",
                      tmp_path / "generalisation.png")
            matrix = page.locator('[data-testid="stPlotlyChart"]').first
            click_plot_centre(page, matrix, 0.75, 0.5)  # the prefill matrix's right column
            page.wait_for_function(  # the clicked cell's examples: "... on chem ..., prefilling"
                "() => [...document.querySelectorAll('[data-testid=\"stMarkdownContainer\"]')]"
                ".some(e => e.innerText.includes('on chem') && e.innerText.includes('with the breaker'))")
            wait_idle(page)
            assert_no_error(page)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_browser_a_200_token_trace_keeps_its_labels_readable(tmp_path: Path) -> None:
    """A 200-token Figure-6 plot, drawn by Chromium: at most MAX_TICK_LABELS + 1 tick labels,
    none overlapping its neighbour."""
    from cbscope import plots
    from cbscope.trace import CosineTrace

    n = 200
    tokens = [f"tok{p}" for p in range(n)]
    cos = torch.linspace(1.0, -0.5, n).repeat(1, 4, 1).clone()
    trace = CosineTrace(cos=cos, norm_orig=torch.ones_like(cos), norm_cb=torch.ones_like(cos),
                        tokens=[tokens], mask=torch.ones((1, n), dtype=torch.bool),
                        layers=[1, 2, 3, 4], response_start=[40], prefill_end=[45],
                        turn_starts=[[0]], prompts=["p"], responses=["r"], model_name="long")
    page_file = plots.save_html(plots.figure6_lines(trace, layers=[2, 4]), tmp_path / "long.html")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(page_file.as_uri())
            page.wait_for_selector(".js-plotly-plot .xtick text")
            page.screenshot(path=str(tmp_path / "long.png"), full_page=True)
            labels = page.locator(".xaxislayer-above .xtick text")
            count = labels.count()
            assert 0 < count <= plots.MAX_TICK_LABELS + 1, count
            boxes = [labels.nth(i).bounding_box() for i in range(count)]
            lefts = sorted(b["x"] for b in boxes)
            assert min(b - a for a, b in zip(lefts, lefts[1:], strict=False)) > 8  # no smear
        finally:
            browser.close()
