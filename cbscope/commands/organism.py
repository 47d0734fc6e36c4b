"""``cbscope organism build|eval``.

``build`` is the only place the organism is built (resolving the ``organism`` spec never builds
it). It writes into a staging folder beside ``--out`` and swaps it in only when the build has
finished, and it refuses an ``--out`` that holds anything but an organism unless given
``--overwrite``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from cbscope.commands import USER_ERRORS, fail, set_threads
from cbscope.errors import ConfigError

ORGANISM_FILES = ("config.json", "world.json")


def check_build_out(out: Path, *, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file, or a folder holding anything but an organism build
    (unless ``overwrite``); the message names what is there.

    Raises:
        ConfigError: If building there could destroy other work.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the organism")
    if not out.is_dir() or overwrite:
        return
    found = sorted(p.name for p in out.iterdir())
    if found and not all((out / name).is_file() for name in ORGANISM_FILES):
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(
            f"--out {out} holds {shown}, not a model organism: choose an empty or new folder, "
            "or pass --overwrite to replace it"
        )

organism_app = typer.Typer(help="Build and evaluate the model organism.", no_args_is_help=True)


@organism_app.command("build")
def build(
    out: Path = typer.Option(..., help="Folder to write the organism into."),
    seed: int = typer.Option(0, help="Seed: the build is deterministic for a seed."),
    size: str = typer.Option("full", help="World size: 'full' or 'tiny' (tests)."),
    threads: int = typer.Option(1, help="Torch threads."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an --out that holds something other than an organism."
    ),
) -> None:
    """Train the model organism from scratch and print its behaviour table."""
    from cbscope.io import replace_folder
    from cbscope.organism.build import build_organism
    from cbscope.organism.evaluate import format_behaviour_table
    from cbscope.organism.world import SIZES

    try:
        if size not in SIZES:
            raise ConfigError(f"--size {size!r}: use one of {', '.join(sorted(SIZES))}")
        check_build_out(out, overwrite=overwrite)
    except USER_ERRORS as err:
        raise fail(err) from err
    set_threads(threads)
    staging = out.with_name(out.name + ".building")  # a failed or killed build leaves --out as it was
    shutil.rmtree(staging, ignore_errors=True)
    folder = replace_folder(build_organism(staging, seed=seed, size=size, show_progress=True), out)
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
    from cbscope.io import atomic_write_text, check_output_file
    from cbscope.organism import World, evaluate_behaviour, format_behaviour_table
    from cbscope.pair import load_pair

    set_threads(threads)
    try:
        if out is not None:  # checked before the evaluation, so its result is never lost
            check_output_file(out)
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
        summary = {k: v for k, v in result.items() if k != "rows"}
        atomic_write_text(out, json.dumps(summary, indent=2))
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the ``organism`` group."""
    app.add_typer(organism_app, name="organism")
