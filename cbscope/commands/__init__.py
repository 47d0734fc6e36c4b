"""CLI command groups; each module exposes ``register(app)``."""

from __future__ import annotations

import torch
import typer

from cbscope.errors import USER_ERRORS

__all__ = ["USER_ERRORS", "fail", "set_threads"]


def fail(err: Exception) -> typer.Exit:
    """Print a user error (no traceback) and return the exit to raise."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def set_threads(threads: int | None) -> None:
    """Apply a ``--threads`` option (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)
