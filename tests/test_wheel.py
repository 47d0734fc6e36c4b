"""The wheel installs and serves: built from the sources, installed without the repository.

How it stays fast and offline: the wheel is built with ``--no-build-isolation`` (the running
environment's setuptools, a dev dependency) from a copy of the sources (so no ``build/`` is left
in the checkout), and installed with ``pip --no-deps --no-index`` into a fresh ``venv`` made
``--without-pip``. That venv sees the heavy dependencies (torch, transformers, Streamlit) through
one ``.pth`` line naming the running environment's ``site-packages``. A plain path line adds
the folder to ``sys.path`` but runs none of the ``.pth`` files inside it, so the editable
install of the checkout (a ``.pth`` hook there) stays off, and the wheel's own ``cbscope``, in
the venv's ``site-packages``, comes first on the path. Every command then runs from an empty
folder with no ``PYTHONPATH``, and the test checks that ``cbscope`` and ``cbscope.app`` come
from the venv.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "cbscope", "app")
SERVER_START_S = 90

pytestmark = pytest.mark.slow


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources."""
    pytest.importorskip("setuptools", reason="the wheel is built with the dev extra's setuptools")
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(dist), str(source)],
         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (built,) = dist.glob("cbscope-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed and the dependencies visible (see the docstring)."""
    folder = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(folder)])
    python = folder / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "-q", str(wheel)],
         env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=folder).stdout.strip())
    dependencies = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_cbscope_test_dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    return folder


def _clean_env(venv: Path, home: Path) -> dict[str, str]:
    """The environment of a user with the venv active: no PYTHONPATH, no repository."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "CBSCOPE_APP_FILE", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HOME=str(home),
               CBSCOPE_CACHE=str(home / "cache"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def test_wheel_ships_the_app_and_the_assets(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*ROOT.joinpath("app").rglob("*.py")]:
        assert f"cbscope/app/{path.relative_to(ROOT / 'app').as_posix()}" in names, path
    for path in ROOT.joinpath("cbscope").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            assert path.relative_to(ROOT).as_posix() in names, path
    assert not any(name.startswith("app/") for name in names)  # no top-level `app` package


def test_installed_package_is_the_wheel_not_the_checkout(venv: Path, tmp_path: Path) -> None:
    code = ("import cbscope, cbscope.app, cbscope.app.compute, cbscope.app.views.where; "
            "from cbscope.commands.app import app_file; "
            "print(cbscope.__file__); print(cbscope.app.__file__); print(app_file())")
    out = _run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path,
               env=_clean_env(venv, tmp_path)).stdout.split()
    assert all(Path(line).is_relative_to(venv) for line in out), out
    assert out[2].endswith("cbscope/app/cbscope_app.py")


def test_installed_demo_prints_the_behaviour_table(venv: Path, tmp_path: Path) -> None:
    result = _run([str(venv / "bin" / "cbscope"), "demo", "--no-app"], cwd=tmp_path,
                  env=_clean_env(venv, tmp_path))
    assert "model organism:" in result.stdout
    assert str(venv) in result.stdout  # the organism shipped inside the wheel
    assert not (tmp_path / "cache" / "organism").exists()  # nothing was built


def test_installed_app_script_runs(venv: Path, tmp_path: Path) -> None:
    """The installed script imports its views under ``cbscope.app`` and draws the page."""
    code = (
        "from streamlit.testing.v1 import AppTest\n"
        "from cbscope.commands.app import app_file\n"
        "at = AppTest.from_file(str(app_file()), default_timeout=300)\n"
        "at.query_params['view'] = 'where'\n"
        "at.query_params['gen'] = '0'\n"
        "at.run()\n"
        "assert not at.exception, [e.value for e in at.exception]\n"
        "print('errors:', [e.value for e in at.error])\n"
        "print('charts:', len(at.get('plotly_chart')))\n"
    )
    result = _run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path,
                  env=_clean_env(venv, tmp_path))
    assert "errors: []" in result.stdout, result.stdout
    assert "charts: 0" not in result.stdout, result.stdout  # the shipped organism's trace


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def served(venv: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``cbscope app`` from the venv, started in an empty folder; stopped on exit."""
    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("w") as handle:
        server = subprocess.Popen(
            [str(venv / "bin" / "cbscope"), "app", "--port", str(port), "--no-browser"],
            cwd=tmp_path, env=_clean_env(venv, tmp_path), stdout=handle,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            yield f"http://127.0.0.1:{port}", server, log
        finally:
            if server.poll() is None:
                os.killpg(server.pid, 15)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()


def test_installed_app_answers_its_health_endpoint(served) -> None:
    url, server, log = served
    deadline = time.monotonic() + SERVER_START_S
    status = None
    while time.monotonic() < deadline and status != 200:
        assert server.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                status = response.status
                body = response.read().decode()
        except OSError:
            time.sleep(0.3)
    assert status == 200, f"no answer in {SERVER_START_S} s:\n{log.read_text()[-3000:]}"
    assert body.strip() == "ok"
    with urllib.request.urlopen(url, timeout=10) as response:  # the page itself is served
        assert response.status == 200 and "<html" in response.read().decode().lower()
    printed = log.read_text()
    assert f"cbscope dashboard: {url}" in printed and "warning" not in printed
