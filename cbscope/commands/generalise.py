"""``cbscope generalise``: the cross-category generalisation matrix of a circuit breaker."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from cbscope.commands import USER_ERRORS, fail, set_threads

logger = logging.getLogger(__name__)


def _categories(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    return names or None


def generalise(
    out: Path = typer.Option(..., "--out", help="Folder for matrix.json, matrix.html, rows/, "
                             "adapters/ (with --frontier: for frontier.html)."),
    model: str = typer.Option("organism", "--model", help="Organism spec or folder (categories), "
                              "or a real chat model (sources: smollm2-135m, a folder)."),
    preset: str | None = typer.Option(None, "--preset", help="Preset whose config and data every "
                                      "run uses (default: 'organism' for the organism, 'smollm2' "
                                      "for a real model)."),
    sources: str | None = typer.Option(None, "--sources", help="Real models: harmful sources, one "
                                       "run each (built-ins advbench, harmbench, xstest_unsafe or "
                                       "NAME=PATH; default: the three built-ins)."),
    limit: int = typer.Option(40, "--limit", help="Real models: held-out rows evaluated per "
                              "source."),
    mode: str = typer.Option("leave-one-out", "--mode", help="'leave-one-out' (train on every "
                             "other category or source) or 'single' (train on it alone)."),
    steps: int | None = typer.Option(None, "--steps", help="Optimiser steps per run (default: "
                                     "the preset's)."),
    target_layers: str | None = typer.Option(None, "--target-layers", help="Paper-convention "
                                             "target layers, e.g. '2,4' (default: the preset's)."),
    categories: str | None = typer.Option(None, "--categories", help="Comma-separated runs to "
                                          "make (default: every harm category)."),
    config: Path | None = typer.Option(None, "--config", help="A lorra_config.json instead of "
                                       "the preset's config (--steps etc. override it)."),
    data_options: str | None = typer.Option(None, "--data-options", help="JSON object of the "
                                            "preset's data options, e.g. '{\"n_novel\": 60}' "
                                            "(organism) or '{\"forms\": [\"question\"]}' (chat)."),
    frontier_dirs: str | None = typer.Option(None, "--frontier", help="Comma-separated matrix "
                                             "folders: plot their frontier into OUT/frontier.html "
                                             "instead of training."),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
    threads: int = typer.Option(1, "--threads", help="Torch threads (0: torch's default)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a breaker per harm category or source (leave-one-out or single), evaluate each on all.

    On the organism: the prefill and template ASR matrices (rows: trained-on run, columns:
    evaluated category; * marks held-out cells), each run's exact match against the base model
    and the mean held-out ASR. On a real model (or with --sources): the direct and prefill
    compliance matrices over harmful sources (* marks unseen sources), each run's benign cost
    (XSTest safe answered, false fires, KL) and the mean unseen compliance. With --frontier,
    plots held-out ASR against look-alike exact-match drop for organism matrix folders instead.
    """
    from cbscope.generalise import (
        GeneraliseError,
        frontier,
        generalisation_matrix,
        load_results,
    )
    from cbscope.layers import parse_layers
    from cbscope.lorra import ConfigError, LorraConfig, NonFiniteLossError, get_preset

    try:
        if threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: torch's default), not {threads}")
        set_threads(threads)
        if frontier_dirs:
            from cbscope.plots import save_html

            folders = [f.strip() for f in frontier_dirs.split(",") if f.strip()]
            results = load_results(folders)
            path = save_html(frontier(results), out / "frontier.html", title="cbscope frontier")
            for name, result in results:
                s = result.summary
                drop = 0.0 - (s["em_delta_vs_base"]["lookalike_em"]["mean"] or 0.0)
                typer.echo(
                    f"{name}: held-out ASR prefill {100 * s['mean_heldout_prefill_asr']:.1f}%, "
                    f"template {100 * s['mean_heldout_template_asr']:.1f}%; look-alike EM drop "
                    f"{100 * drop:.1f} points"
                )
            typer.echo(f"wrote {path}")
            return
        from cbscope.models import resolve_model

        resolved = resolve_model(model)
        by_source = bool(sources) or not (Path(resolved.path) / "world.json").is_file()
        preset = preset or ("smollm2" if by_source else "organism")
        if not by_source and preset != "organism":
            raise ConfigError(f"the cross-category matrix needs the organism preset, not {preset!r}")
        if by_source and preset == "organism":
            raise ConfigError("the cross-source matrix needs a chat-model preset such as 'smollm2'")
        cfg = LorraConfig.load(config) if config else get_preset(preset).config
        if steps is not None:
            cfg.steps = steps
        if target_layers:
            cfg.target_layers = parse_layers(target_layers)
        cfg.validate()
        options = json.loads(data_options) if data_options else {}
        if not isinstance(options, dict):
            raise ConfigError("--data-options must be a JSON object")
        if by_source:
            from cbscope.crosssource import source_matrix

            matrix = source_matrix(
                model, sources=[p for p in (sources or "").split(",") if p.strip()] or None,
                mode=mode, config=cfg, out_dir=out, data_options=options, limit=limit,
                device=device, show_progress=progress,
            )
            typer.echo(matrix.table())
            typer.echo(f"{len(matrix.runs)} runs in {matrix.seconds:.0f} s; wrote "
                       f"{out / 'matrix.json'}, {out / 'matrix.html'}, {out / 'rows'}/ and "
                       f"{out / 'adapters'}/")
            return
        result = generalisation_matrix(
            model,
            mode=mode,
            config=cfg,
            out_dir=out,
            categories=_categories(categories),
            data_options=options,
            device=device,
            show_progress=progress,
        )
    except json.JSONDecodeError as err:
        raise fail(ValueError(f"--data-options is not valid JSON: {err.msg}")) from err
    except (*USER_ERRORS, GeneraliseError, ConfigError, NonFiniteLossError) as err:
        raise fail(err) from err
    typer.echo(result.table())
    typer.echo(f"{len(result.runs)} runs in {result.seconds:.0f} s; wrote {out / 'matrix.json'}, "
               f"{out / 'matrix.html'}, {out / 'rows'}/ and {out / 'adapters'}/")


def register(app: typer.Typer) -> None:
    """Add the ``generalise`` command."""
    app.command("generalise")(generalise)
