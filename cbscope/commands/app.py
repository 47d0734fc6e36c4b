"""``cbscope app``: start the Streamlit dashboard (bound to 127.0.0.1 unless told otherwise).

The dashboard's script is ``app/cbscope_app.py`` at the top of the repository (beside the
``cbscope`` package; the README installs the package editable, so it is always there). Set
``CBSCOPE_APP_FILE`` to run another copy.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from pathlib import Path

import typer

from cbscope.commands import fail

logger = logging.getLogger(__name__)

APP_FILE_ENV = "CBSCOPE_APP_FILE"
MODEL_ENV = "CBSCOPE_APP_MODEL"
ADAPTER_ENV = "CBSCOPE_APP_ADAPTER"
DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"


def app_file() -> Path:
    """The dashboard's Streamlit script.

    Raises:
        FileNotFoundError: If neither ``$CBSCOPE_APP_FILE`` nor ``app/cbscope_app.py`` beside the
            package exists (a non-editable install without the repository).
    """
    env = os.environ.get(APP_FILE_ENV)
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "app" / "cbscope_app.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"the dashboard script {path} is missing: run cbscope from a checkout of the "
            f"repository installed with `pip install -e .`, or set {APP_FILE_ENV}"
        )
    return path


def streamlit_command(port: int, host: str = DEFAULT_HOST, script: Path | None = None) -> list[str]:
    """The ``streamlit run`` command line of the dashboard."""
    return [
        sys.executable, "-m", "streamlit", "run", str(script or app_file()),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]


def port_free(port: int, host: str = DEFAULT_HOST) -> bool:
    """True when ``host:port`` can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def has_display() -> bool:
    """Whether a browser window could open here."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open_when_up(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/_stcore/health", timeout=2):
                webbrowser.open(url)
                return
        except OSError:
            time.sleep(0.5)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def launch(
    *,
    port: int = DEFAULT_PORT,
    host: str = DEFAULT_HOST,
    model: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    browser: bool | None = None,
) -> int:
    """Run the dashboard until it is stopped (Ctrl+C); returns Streamlit's exit code.

    Args:
        port: TCP port.
        host: Address to bind (127.0.0.1: this machine only).
        model: Model spec the dashboard starts with (default: the organism).
        adapter: Adapter folder it starts with (default: the first breaker found for the model).
        browser: Open a browser tab (None: when a display is available).

    Raises:
        FileNotFoundError: If the dashboard script is missing.
        OSError: If the port is taken.
    """
    command = streamlit_command(port, host)
    if not port_free(port, host):
        raise OSError(f"port {port} on {host} is in use: choose another with --port")
    env = dict(os.environ)
    if model:
        env[MODEL_ENV] = str(model)
    if adapter:
        env[ADAPTER_ENV] = str(adapter)
    shown_host = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
    url = f"http://{shown_host}:{port}"
    typer.secho(f"cbscope dashboard: {url}  (Ctrl+C to stop)", fg=typer.colors.GREEN, bold=True)
    if browser or (browser is None and has_display()):
        threading.Thread(target=_open_when_up, args=(url,), daemon=True).start()
    process = subprocess.Popen(command, env=env)
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops Streamlit too
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def app(
    port: int = typer.Option(DEFAULT_PORT, help="Port to serve on."),
    host: str = typer.Option(DEFAULT_HOST, help="Address to bind (127.0.0.1: this machine only)."),
    model: str | None = typer.Option(None, help="Model spec to start with (default: organism)."),
    adapter: Path | None = typer.Option(None, help="Circuit-breaker adapter folder to start with."),
    browser: bool | None = typer.Option(
        None, "--browser/--no-browser", help="Open a browser tab (default: when there is a display)."
    ),
) -> None:
    """Start the Streamlit dashboard: where does the circuit breaker fire?"""
    try:
        code = launch(port=port, host=host, model=model, adapter=adapter, browser=browser)
    except (FileNotFoundError, OSError) as err:
        raise fail(err) from err
    raise typer.Exit(code=code)


def register(cli: typer.Typer) -> None:
    """Add ``app``."""
    cli.command("app")(app)
