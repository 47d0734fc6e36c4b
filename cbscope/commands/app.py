"""``cbscope app``: start the Streamlit dashboard (bound to 127.0.0.1 unless told otherwise).

The dashboard's script is ``app/cbscope_app.py``: at the top of a checkout (beside the
``cbscope`` package), and inside the package (``cbscope/app/``) where cbscope was installed
from its wheel. Set ``CBSCOPE_APP_FILE`` to run another copy.

The dashboard has no authentication and opens any model or adapter folder its URL names, so a
``--host`` other than a loopback address gets a warning, and the address printed is the one it
really serves on.
"""

from __future__ import annotations

import errno
import ipaddress
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

from cbscope.commands import USER_ERRORS, fail
from cbscope.errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)

APP_FILE_ENV = "CBSCOPE_APP_FILE"
MODEL_ENV = "CBSCOPE_APP_MODEL"
ADAPTER_ENV = "CBSCOPE_APP_ADAPTER"
DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"
APP_SCRIPT = "cbscope_app.py"


def app_file() -> Path:
    """The dashboard's Streamlit script.

    Raises:
        MissingFileError: If neither ``$CBSCOPE_APP_FILE``, ``cbscope/app/cbscope_app.py``
            (an installed wheel) nor ``app/cbscope_app.py`` beside the package (a checkout)
            exists.
    """
    env = os.environ.get(APP_FILE_ENV)
    package = Path(__file__).resolve().parents[1]
    candidates = (
        [Path(env).expanduser()]
        if env
        else [package / "app" / APP_SCRIPT, package.parent / "app" / APP_SCRIPT]
    )
    for path in candidates:
        if path.is_file():
            return path
    raise MissingFileError(
        f"the dashboard script is missing (looked for {', '.join(map(str, candidates))}): "
        f"reinstall cbscope, or set {APP_FILE_ENV} to the script"
    )


def streamlit_command(port: int, host: str = DEFAULT_HOST, script: Path | None = None) -> list[str]:
    """The ``streamlit run`` command line of the dashboard."""
    return [
        sys.executable, "-m", "streamlit", "run", str(script or app_file()),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
    ]


def host_addresses(host: str) -> list[str]:
    """The IP addresses ``host`` (an address or a name) stands for.

    Raises:
        ConfigError: If it is not an address and does not resolve.
    """
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise ConfigError(
            f"--host {host!r} is not an address of this machine ({err}): use 127.0.0.1, or an "
            "address to serve on"
        ) from err
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_loopback(host: str) -> bool:
    """True when every address ``host`` stands for is a loopback one (this machine only)."""
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in host_addresses(host))


def is_wildcard(host: str) -> bool:
    """True for the addresses that mean "every interface" (``0.0.0.0``, ``::``)."""
    return host.strip("[]") in ("0.0.0.0", "::", "")


def this_machine_address() -> str | None:
    """This machine's IPv4 address on its default route, found without sending anything (None
    without a network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1; connect() on UDP only picks a route
            address = str(sock.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("0.") else address


def serve_urls(host: str, port: int) -> list[str]:
    """The URLs the dashboard really answers on when bound to ``host``: its address (a loopback
    name: ``127.0.0.1``); for ``0.0.0.0`` this machine's network address, then loopback."""
    if is_wildcard(host):
        addresses = [a for a in (this_machine_address(),) if a] + ["127.0.0.1"]
    elif host == "localhost":
        addresses = ["127.0.0.1"]
    else:
        addresses = host_addresses(host)[:1]
    return [f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses]


def exposure_warning(host: str, port: int) -> str:
    """The warning for a non-loopback ``host``: what binding the dashboard there exposes."""
    where = "every network interface" if is_wildcard(host) else host
    return (
        f"warning: the dashboard serves {where} (port {port}) with no authentication, and anyone "
        "who can reach it can make it read any model or adapter folder on this server; use "
        f"--host {DEFAULT_HOST} unless that is what you want"
    )


def check_bindable(port: int, host: str = DEFAULT_HOST) -> None:
    """Check that the dashboard can listen on ``host:port`` (before Streamlit starts).

    Raises:
        ConfigError: If the port is out of range or ``host`` is not an address of this machine.
        OSError: If the port is in use.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: use a port between 1 and 65535")
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise OSError(f"port {port} on {host} is in use: choose another with --port") from err
            raise ConfigError(
                f"--host {host}: cannot listen there ({err.strerror}); use {DEFAULT_HOST}, "
                "0.0.0.0 or an address of this machine"
            ) from err


def port_free(port: int, host: str = DEFAULT_HOST) -> bool:
    """True when ``host:port`` can be bound."""
    try:
        check_bindable(port, host)
    except (ConfigError, OSError):
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


def headless_hint(port: int, host: str = DEFAULT_HOST) -> str:
    """How to reach the page from another machine when this one has no display."""
    user = os.environ.get("USER") or "you"
    here = socket.gethostname() or "this-machine"
    if is_loopback(host):
        return (f"no display here: on your own computer run  ssh -L {port}:localhost:{port} "
                f"{user}@{here}  and open http://localhost:{port}")
    return f"no display here: open http://{here}:{port} from your own computer"


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
        MissingFileError: If the dashboard script is missing.
        ConfigError: If ``host`` is not an address of this machine, or the port is out of range.
        OSError: If the port is taken.
    """
    command = streamlit_command(port, host)
    loopback = is_loopback(host)  # resolves the host: a ConfigError before anything starts
    check_bindable(port, host)
    env = dict(os.environ)
    if model:
        env[MODEL_ENV] = str(model)
    if adapter:
        env[ADAPTER_ENV] = str(adapter)
    if not loopback:
        logger.warning("serving the dashboard on non-loopback host %s", host)
        typer.secho(exposure_warning(host, port), fg=typer.colors.YELLOW, err=True)
    urls = serve_urls(host, port)
    url = urls[-1] if is_wildcard(host) else urls[0]  # the browser tab opens on this machine
    typer.secho(f"cbscope dashboard: {'  '.join(urls)}  (Ctrl+C to stop)",
                fg=typer.colors.GREEN, bold=True)
    if browser or (browser is None and has_display()):
        threading.Thread(target=_open_when_up, args=(url,), daemon=True).start()
    elif not has_display():
        typer.echo(headless_hint(port, host))
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
    host: str = typer.Option(
        DEFAULT_HOST,
        help="Address to bind (127.0.0.1: this machine only; any other warns: the app has no "
             "authentication).",
    ),
    model: str | None = typer.Option(None, help="Model spec to start with (default: organism)."),
    adapter: Path | None = typer.Option(None, help="Circuit-breaker adapter folder to start with."),
    browser: bool | None = typer.Option(
        None, "--browser/--no-browser", help="Open a browser tab (default: when there is a display)."
    ),
) -> None:
    """Start the Streamlit dashboard: where does the circuit breaker fire?"""
    try:
        code = launch(port=port, host=host, model=model, adapter=adapter, browser=browser)
    except (*USER_ERRORS, OSError) as err:
        raise fail(err) from err
    raise typer.Exit(code=code)


def register(cli: typer.Typer) -> None:
    """Add ``app``."""
    cli.command("app")(app)
