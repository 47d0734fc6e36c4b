"""``cbscope train``: train a circuit breaker (LoRRA) from a preset or data files.

The options are generated from the fields of :class:`cbscope.run.RunConfig` (the run) and of
:class:`cbscope.lorra.config.LorraConfig` (every knob of the recipe, each overriding the
preset's or the ``--config`` file's value). Their help text comes from the fields' docstrings,
so a new field is a new option.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

import typer

from cbscope.commands import USER_ERRORS, fail

logger = logging.getLogger(__name__)

RUN_PANEL = "Run"
LORRA_PANEL = "LoRRA config (each overrides the preset's or --config's value)"


def _json_object(name: str) -> Callable[[str], dict[str, Any]]:
    def parse(text: str) -> dict[str, Any]:
        from cbscope.errors import ConfigError

        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--{name.replace('_', '-')} is not valid JSON: {err}") from err
        if not isinstance(value, dict):
            raise ConfigError(f"--{name.replace('_', '-')} must be a JSON object")
        return value

    return parse


def _ints(text: str) -> list[int] | None:
    from cbscope.layers import parse_layers

    return parse_layers(text)


def _words(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _mask_or_object(text: str) -> str | dict[str, Any]:
    return _json_object("retain_token_mask")(text) if text.strip().startswith("{") else text


def _scalar(hint: Any) -> Any:
    """``int``/``float``/``str``/``bool``/``Path`` of a field type (``X | None`` -> ``X``), or
    ``None`` for structured types (lists, dicts, unions of other types)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if len(args) == 1 and args[0] in (int, float, str, bool, Path):
        return args[0]
    return None


def _parser(name: str, hint: Any) -> Callable[[str], Any] | None:
    """How the text of a structured option becomes its value."""
    text = str(hint)
    if "dict" in text and "str |" in text:
        return _mask_or_object
    if "dict" in text:
        return _json_object(name)
    if "list[int]" in text:
        return _ints
    if "list[str]" in text:
        return _words
    return None


def _options() -> tuple[list[inspect.Parameter], dict[str, Callable[[str], Any]]]:
    """The command's parameters, one per field of RunConfig and of LorraConfig, and the
    parsers of the structured ones."""
    from cbscope.lorra.config import LorraConfig
    from cbscope.run import RunConfig, cli_fields, field_docs

    params: list[inspect.Parameter] = []
    parsers: dict[str, Callable[[str], Any]] = {}
    for cls, panel in ((RunConfig, RUN_PANEL), (LorraConfig, LORRA_PANEL)):
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f, meta in cli_fields(cls):
            params.append(_option(f, meta, hints[f.name], docs.get(f.name, ""), panel,
                                  run=cls is RunConfig, parsers=parsers))
    return params, parsers


def _option(f: Field, meta: dict[str, Any], hint: Any, doc: str, panel: str, *, run: bool,
            parsers: dict[str, Callable[[str], Any]]) -> inspect.Parameter:
    flag = "--" + f.name.replace("_", "-")
    scalar = _scalar(hint)
    if scalar is None:
        parser = _parser(f.name, hint)
        if parser is None:
            raise TypeError(f"no command-line form for {f.name}: {hint}")
        parsers[f.name] = parser
        annotation: Any = str | None
        names = [flag]
    elif scalar is bool:
        annotation = bool | None
        names = [f"{flag}/--no-{flag[2:]}"]
    else:
        annotation = scalar | None
        names = [flag]
    if meta.get("required"):
        default: Any = ...
        annotation = scalar
    elif "default" in meta:
        default = meta["default"]
    elif run and f.default is not MISSING and not isinstance(f.default, (dict, list)):
        default = f.default  # the run's own flags show their real defaults
    else:
        default = None  # a LoRRA field left out keeps the preset's / --config's value
    option = typer.Option(default, *names, help=doc, rich_help_panel=panel, show_default=default
                          not in (None, ...))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=annotation)


def train(**values: Any) -> None:
    """Train a circuit breaker with LoRRA (Representation Rerouting) and save it as a peft adapter.

    The run works in OUT.partial and replaces OUT only when it finishes: an existing finished
    run or other files in OUT need --overwrite, an interrupted run --resume (or --restart).
    Multi-GPU / multi-process: ``accelerate launch --num_processes N -m cbscope train ...
    --device cuda`` (``--cpu`` for CPU processes); each process trains on 1/N of every batch.
    """
    from cbscope.lorra.distributed import distributed_context
    from cbscope.run import Runner, run_config_from_options

    started = time.perf_counter()
    try:
        cfg = run_config_from_options(values, PARSERS)
        if cfg.dry_run:
            report = Runner(cfg).dry_run()
            typer.echo(report.text())
            typer.echo(json.dumps(report.to_dict()))
            return
        result = Runner(cfg).run()
    except USER_ERRORS as err:
        raise fail(err) from err
    ctx = distributed_context()
    if ctx is not None and not ctx.is_main:
        return
    final = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.final.items()}
    typer.echo(json.dumps(final))
    held = result.info.get("holdout_category")
    if held:
        typer.echo(f"held-out harm category: {held} (trained on {result.info.get('trained_categories')})")
    for warning in result.info.get("warnings", []):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    start = f" from step {result.resumed_from}" if result.resumed_from else ""
    typer.echo(
        f"trained {result.steps_done} steps{start} in {time.perf_counter() - started:.1f}s "
        f"(training {result.seconds:.1f}s); adapter in {cfg.out}"
    )


PARAMETERS, PARSERS = _options()
train.__signature__ = inspect.Signature(PARAMETERS)  # type: ignore[attr-defined]
train.__annotations__ = {p.name: p.annotation for p in PARAMETERS}


def register(app: typer.Typer) -> None:
    """Add the ``train`` command."""
    app.command("train")(train)

