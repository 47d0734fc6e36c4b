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
            heatmap = page.locator('[data-testid="stPlotlyChart"]').nth(2)  # lines, strip, heatmap
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
