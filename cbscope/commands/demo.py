"""``cbscope demo``: the README's main job on the built-in default (the model organism).

It loads the model organism and its circuit breaker (the shipped ones; where the package was
installed without them, the organism is built once into the cache, since ``cbscope demo`` is
the command that asks for it, and the breaker trained once into
``cache_dir()/breakers/organism``), prints the behaviour of the base organism (no breaker:
its high attack success is the unprotected model's, by design) beside the breaker's (measured
once and cached), and opens the dashboard on "Where does it fire?" with them. ``--no-app`` only
prints the tables.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cbscope.commands import USER_ERRORS, fail, set_threads

if TYPE_CHECKING:
    from cbscope.organism import World

logger = logging.getLogger(__name__)

ORGANISM_BREAKER_NAME = "organism"


def shipped_organism_breaker() -> Path:
    """The organism's breaker shipped in the package (``cbscope/assets/organism-breaker``)."""
    return Path(__file__).resolve().parents[1] / "assets" / "organism-breaker"


def is_adapter(path: Path) -> bool:
    """True when ``path`` is a peft adapter folder."""
    from cbscope.pair import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def organism_breaker(*, train_if_missing: bool = True, show_progress: bool = True) -> Path:
    """The organism's breaker: shipped, else in the cache, else trained once into the cache.

    Raises:
        FileNotFoundError: When there is none and ``train_if_missing`` is False.
    """
    from cbscope.models import cache_dir

    shipped = shipped_organism_breaker()
    if is_adapter(shipped):
        return shipped
    cached = cache_dir() / "breakers" / ORGANISM_BREAKER_NAME
    if is_adapter(cached):
        return cached
    if not train_if_missing:
        raise FileNotFoundError(f"no organism breaker at {shipped} or {cached}")
    from cbscope.lorra import get_preset, train_circuit_breaker

    preset = get_preset("organism")
    typer.echo(f"training the organism's circuit breaker into {cached} (about a minute, once)")
    result = train_circuit_breaker(
        preset.model, preset.config, preset.build_data(_organism_world()), out_dir=cached,
        show_progress=show_progress,
    )
    final = result.final
    typer.echo(f"breaker trained: cb_cos {final.get('cb_cos', float('nan')):.3f}, "
               f"retain_cos {final.get('retain_cos', float('nan')):.3f}")
    return cached


def _organism_world() -> World:
    from cbscope.models import organism_dir
    from cbscope.organism import World

    return World.from_json(organism_dir() / "world.json")


def demo_organism() -> Path:
    """The organism :func:`cbscope.models.organism_dir` finds; built once into the cache when
    there is none (resolving the ``organism`` spec itself never builds)."""
    from cbscope.errors import ModelSpecError
    from cbscope.models import cache_dir, organism_dir

    try:
        return organism_dir()
    except ModelSpecError:
        from cbscope.io import replace_folder
        from cbscope.organism.build import build_organism

        cached = cache_dir() / "organism"
        typer.echo(f"building the model organism into {cached} (a few minutes, once)")
        staging = cached.with_name(cached.name + ".building")  # a killed build leaves no organism
        return replace_folder(build_organism(staging, show_progress=True), cached)


def breaker_behaviour(folder: Path, breaker: Path) -> dict:
    """The organism's behaviour with ``breaker`` on (:func:`cbscope.organism.evaluate_behaviour`,
    as ``behaviour.json`` holds the base model's), measured once per breaker and cached."""
    import hashlib

    from cbscope.io import atomic_write_text
    from cbscope.models import cache_dir
    from cbscope.pair import ADAPTER_WEIGHTS

    weights = breaker / ADAPTER_WEIGHTS
    key = hashlib.sha256(
        f"{folder.resolve()}|{breaker.resolve()}|{weights.stat().st_mtime_ns}|"
        f"{weights.stat().st_size}".encode()).hexdigest()[:16]
    cached = cache_dir() / "demo" / f"breaker-behaviour-{key}.json"
    if cached.is_file():
        try:
            return json.loads(cached.read_text())
        except json.JSONDecodeError:
            logger.warning("unreadable cached behaviour %s: measuring again", cached)
    from cbscope.organism import World, evaluate_behaviour
    from cbscope.pair import load_pair

    typer.echo("measuring the breaker's behaviour on the organism (about 15 s on one CPU thread, "
               "once)")
    pair = load_pair(str(folder), breaker)
    world = World.from_json(folder / "world.json")
    result = evaluate_behaviour(pair.generator, pair.tokenizer, world, batch_size=64,
                                multiturn=True)
    result.pop("rows", None)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cached, json.dumps(result, indent=1) + "\n")
    return result


def behaviour_tables(base: dict, breaker: dict | None) -> str:
    """The base organism's behaviour and the breaker's, side by side, saying whose is whose."""
    from cbscope.organism.evaluate import HARM_METRICS, METRICS, MULTITURN_METRICS

    lines = ["Behaviour of the model organism, in % (exact judges):",
             "  base   = the organism WITHOUT a circuit breaker: it complies with harmful "
             "requests by design,",
             "           so its high attack success (prefill_asr, template_asr) is the problem "
             "the breaker solves;",
             "  breaker = the same model WITH its circuit breaker on."]
    header = f"{'metric':<22}{'base':>9}" + (f"{'breaker':>9}" if breaker else "") + f"{'n':>6}"
    lines += ["", header]
    for metric in (*METRICS, *MULTITURN_METRICS):
        if metric not in base:
            continue
        row = f"{metric:<22}{100 * base[metric]:>8.1f}%"
        if breaker:
            value = breaker.get(metric)
            row += f"{100 * value:>8.1f}%" if value is not None else f"{'n/a':>9}"
        lines.append(row + f"{base.get('n', {}).get(metric, ''):>6}")
    by_base, by_cb = base.get("by_category") or {}, (breaker or {}).get("by_category") or {}
    if by_base:
        lines += ["", f"{'category':<12}" + "".join(
            f"{m + (' base/breaker' if breaker else ''):>30}" for m in HARM_METRICS)]
        for category, rates in by_base.items():
            cells = []
            for m in HARM_METRICS:
                text = f"{100 * rates.get(m, float('nan')):.1f}%"
                if breaker:
                    text += f" / {100 * by_cb.get(category, {}).get(m, float('nan')):.1f}%"
                cells.append(f"{text:>30}")
            lines.append(f"{category:<12}" + "".join(cells))
    return "\n".join(lines)


def demo(
    no_app: bool = typer.Option(False, "--no-app", help="Only print the behaviour tables."),
    port: int = typer.Option(8501, help="Port of the dashboard."),
    host: str = typer.Option("127.0.0.1", help="Address the dashboard binds (this machine only)."),
    browser: bool | None = typer.Option(
        None, "--browser/--no-browser", help="Open a browser tab (default: when there is a display)."
    ),
    threads: int = typer.Option(1, help="Torch threads."),
) -> None:
    """Load (or build) the model organism and its breaker, print the behaviour of both, then
    open the dashboard on them."""
    set_threads(threads)
    try:
        folder = demo_organism()
        behaviour = json.loads((folder / "behaviour.json").read_text())
        typer.echo(f"model organism: {folder}")
        breaker = organism_breaker()
        typer.echo(f"circuit breaker: {breaker}")
        typer.echo(behaviour_tables(behaviour, breaker_behaviour(folder, breaker)))
    except USER_ERRORS as err:
        raise fail(err) from err
    if no_app:
        return
    from cbscope.commands.app import launch

    try:
        code = launch(port=port, host=host, model="organism", adapter=breaker, browser=browser)
    except (*USER_ERRORS, OSError) as err:
        raise fail(err) from err
    raise typer.Exit(code=code)


def register(app: typer.Typer) -> None:
    """Add ``demo``."""
    app.command("demo")(demo)
