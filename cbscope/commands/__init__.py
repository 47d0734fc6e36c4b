"""CLI command groups; each module exposes ``register(app)``."""

from __future__ import annotations

import torch
import typer

from cbscope.data import DatasetError, PromptError
from cbscope.layers import LayerError
from cbscope.models import ModelSpecError
from cbscope.pair import AdapterMismatchError

USER_ERRORS = (ModelSpecError, AdapterMismatchError, DatasetError, PromptError, LayerError, FileNotFoundError)


def fail(err: Exception) -> typer.Exit:
    """Print a user error (no traceback) and return the exit to raise."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def set_threads(threads: int | None) -> None:
    """Apply a ``--threads`` option (None keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)
