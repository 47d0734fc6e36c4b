"""``cbscope demo``: the README's main job on the built-in default (the model organism)."""

from __future__ import annotations

import json

import typer

from cbscope.commands import set_threads


def demo(threads: int = typer.Option(1, help="Torch threads.")) -> None:
    """Load (or build) the model organism and print its behaviour table."""
    from cbscope.models import organism_dir
    from cbscope.organism import format_behaviour_table

    set_threads(threads)
    folder = organism_dir()
    behaviour = json.loads((folder / "behaviour.json").read_text())
    typer.echo(f"model organism: {folder}")
    typer.echo(format_behaviour_table(behaviour))


def register(app: typer.Typer) -> None:
    """Add ``demo``."""
    app.command("demo")(demo)
