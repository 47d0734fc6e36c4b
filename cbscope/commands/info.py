"""``cbscope info``: what a model spec resolves to and its layers."""

from __future__ import annotations

import typer

from cbscope.commands import USER_ERRORS, fail


def info(
    model: str = typer.Option("organism", help="Model spec."),
    adapter: str | None = typer.Option(None, help="Adapter folder."),
) -> None:
    """Resolve a model spec offline and print its shape and hook convention."""
    from cbscope.layers import default_target_layers, resid_hook_name
    from cbscope.pair import load_pair

    try:
        pair = load_pair(model, adapter)
    except USER_ERRORS as err:
        raise fail(err) from err
    targets = default_target_layers(pair.n_layers)
    typer.echo(f"model      {pair.resolved.name} ({pair.resolved.path})")
    typer.echo(f"blocks     {pair.n_layers}, d_model {pair.d_model}")
    typer.echo(f"adapter    {pair.adapter_path or 'none'}")
    hooks = ", ".join(f"{t} -> {resid_hook_name(t)}" for t in targets)
    typer.echo(f"targets    paper layers {targets} ({hooks})")


def register(app: typer.Typer) -> None:
    """Add ``info``."""
    app.command("info")(info)
