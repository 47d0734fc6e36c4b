"""CLI command groups; each module exposes ``register(app)``."""

from __future__ import annotations

import torch
import typer

from cbscope.errors import CbscopeError

#: What the CLI reports in one line (exit 2): every cbscope error, and a missing file.
USER_ERRORS = (CbscopeError, FileNotFoundError)


def fail(err: Exception) -> typer.Exit:
    """Print a user error (no traceback) and return the exit to raise."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def set_threads(threads: int | None) -> None:
    """Apply a ``--threads`` option (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)
