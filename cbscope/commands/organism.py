"""``cbscope organism build|eval``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cbscope.commands import USER_ERRORS, fail, set_threads

organism_app = typer.Typer(help="Build and evaluate the model organism.", no_args_is_help=True)


@organism_app.command("build")
def build(
    out: Path = typer.Option(..., help="Folder to write the organism into."),
    seed: int = typer.Option(0, help="Seed: the build is deterministic for a seed."),
    size: str = typer.Option("full", help="World size: 'full' or 'tiny' (tests)."),
    threads: int = typer.Option(1, help="Torch threads."),
) -> None:
    """Train the model organism from scratch and print its behaviour table."""
    from cbscope.organism import build_organism, format_behaviour_table

    set_threads(threads)
    folder = build_organism(out, seed=seed, size=size, show_progress=True)
    behaviour = json.loads((Path(folder) / "behaviour.json").read_text())
    typer.echo(format_behaviour_table(behaviour))
    typer.echo(f"organism written to {folder}")


@organism_app.command("eval")
def evaluate(
    model: str = typer.Option("organism", help="Organism folder (or 'organism')."),
    adapter: Path | None = typer.Option(None, help="Circuit-breaker adapter folder."),
    out: Path | None = typer.Option(None, help="Write the behaviour JSON here."),
    threads: int = typer.Option(1, help="Torch threads."),
) -> None:
    """Print the behaviour table of the organism, with or without a circuit breaker."""
    from cbscope.organism import World, evaluate_behaviour, format_behaviour_table
    from cbscope.pair import load_pair

    set_threads(threads)
    try:
        pair = load_pair(model, adapter)
        world_file = pair.resolved.path / "world.json"
        if not world_file.is_file():
            raise FileNotFoundError(f"{world_file}: the model is not an organism (no world.json)")
        world = World.from_json(world_file)
    except USER_ERRORS as err:
        raise fail(err) from err
    result = evaluate_behaviour(pair.generator, pair.tokenizer, world, show_progress=True)
    typer.echo(format_behaviour_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in result.items() if k != "rows"}
        out.write_text(json.dumps(summary, indent=2))
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the ``organism`` group."""
    app.add_typer(organism_app, name="organism")
