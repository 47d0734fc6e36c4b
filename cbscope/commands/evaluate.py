"""``cbscope eval``: attack a model and its circuit breaker, write report.json / .md / .html.

Attacks come from the registry (:mod:`cbscope.attacks.registry`): ``--attacks`` names them, and
``--attack-options`` sets any attack's options as JSON (``--help`` lists every attack's options,
read from its options dataclass). The older per-attack flags (``--soft-prompt-steps`` ...) still
work; they fill the same options. Every input is checked before the model is loaded: the
``--out`` folder, the attack names and options, the modes, the sources.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from cbscope.commands import USER_ERRORS, fail, set_threads

logger = logging.getLogger(__name__)

DEFAULT_ATTACKS = "direct,prefill,template,multiturn,multiturn_prefill,soft_prompt,repe,finetune"


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise typer.BadParameter("give at least one value")
    return values


def attack_options_help() -> str:
    """Every registered attack and its options (name, type, default, meaning), for ``--help``."""
    from cbscope.attacks import registered_attacks

    lines = [
        "Attacks and their --attack-options (a JSON object, e.g. "
        '\'{"soft_prompt": {"steps": 100, "init": "sure"}, "repe": {"coeff": -2}}\'; '
        "--max-new-tokens and --batch-size are shared by all):"
    ]
    for attack in registered_attacks().values():
        lines += [f"- {line}" if not line.startswith(" ") else f"    {line.strip()}"
                  for line in attack.describe()]
    text = "\n".join(lines)
    try:
        from rich.markup import escape
    except ImportError:  # plain click help
        return text
    return escape(text)


class EvalCommand(TyperCommand):
    """``cbscope eval``, whose help ends with the registry's attack options (built on demand, so
    the CLI does not import the attacks to start)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """Add the attack options (of every attack registered now) to the epilog, then format."""
        self.epilog = attack_options_help()
        super().format_help(ctx, formatter)


def _load_attack_options(text: str | None) -> dict[str, Any]:
    """``--attack-options``: JSON text, or ``@FILE`` holding it."""
    from cbscope.errors import ConfigError

    if not text:
        return {}
    source = "--attack-options"
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--attack-options {path}: cannot read it ({err})") from err
        source = str(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must be a JSON object {{attack: {{option: value}}}}")
    return value


def _merge_options(flags: dict[str, dict[str, Any]], given: dict[str, Any]) -> dict[str, Any]:
    """The per-attack flags that were given, plus ``--attack-options``; a field set both ways to
    different values is an error."""
    from cbscope.errors import ConfigError

    merged: dict[str, Any] = {name: dict(values) for name, values in given.items()}
    for name, values in flags.items():
        for key, value in values.items():
            if value is None:
                continue
            target = merged.setdefault(name, {})
            if not isinstance(target, dict):
                continue  # reported by EvalConfig.with_options
            if key in target and target[key] != value:
                raise ConfigError(
                    f"{name}.{key} is set twice: {value!r} by its flag and {target[key]!r} by "
                    "--attack-options"
                )
            target[key] = value
    return merged


def eval_command(
    model: str = typer.Option(
        "organism", "--model", help="Model spec: organism, smollm2-135m, gemma3-270m, a folder."
    ),
    adapter: Path | None = typer.Option(
        None, "--adapter", help="Circuit-breaker adapter folder (without it: base model only)."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for report.json, report.md, report.html."),
    attacks: str = typer.Option(
        DEFAULT_ATTACKS, "--attacks", help="Comma-separated attacks (or 'all'); see below."
    ),
    attack_options: str | None = typer.Option(
        None,
        "--attack-options",
        help="JSON object {attack: {option: value}} (or @FILE): every attack's options, listed "
        "below.",
    ),
    limit: int | None = typer.Option(
        None,
        "--limit",
        help="At most N prompts per attack / benign set (default: all for the "
        "organism, 50 for real models).",
    ),
    soft_prompt_limit: int | None = typer.Option(
        None,
        "--soft-prompt-limit",
        help="Prompts for the soft-prompt attack (default: one per "
        "harmful topic for the organism, 4 for real models).",
    ),
    soft_prompt_steps: int | None = typer.Option(
        None, "--soft-prompt-steps", help="Soft-prompt steps (soft_prompt.steps, default 500)."
    ),
    soft_prompt_tokens: int | None = typer.Option(
        None, "--soft-prompt-tokens", help="Soft-prompt vectors (soft_prompt.n_tokens, default 20)."
    ),
    soft_prompt_step_size: float | None = typer.Option(
        None,
        "--soft-prompt-step-size",
        help="Signed-gradient step, relative to the embedding RMS (soft_prompt.step_size, "
        "default 0.05).",
    ),
    soft_prompt_init: str | None = typer.Option(
        None, "--soft-prompt-init", help="Initialise the soft prompt from this string."
    ),
    soft_prompt_target: str = typer.Option(
        "first_step",
        "--soft-prompt-target",
        help="Organism target: 'first_step' (prefix + first step), 'answer' or 'prefix'.",
    ),
    repe_coeff: float | None = typer.Option(
        None, "--repe-coeff", help="RepE steering coefficient (repe.coeff, default -1)."
    ),
    repe_layers: str | None = typer.Option(
        None,
        "--repe-layers",
        help="RepE layers, paper convention, e.g. '2,4' (default: target layers).",
    ),
    repe_positions: str | None = typer.Option(
        None,
        "--repe-positions",
        help="Steer 'prompt' positions only or 'all' positions (repe.positions, default prompt).",
    ),
    repe_direction: str = typer.Option(
        "harmful_harmless",
        "--repe-direction",
        help="RepE direction: 'harmful_harmless' or 'refusal_compliance'.",
    ),
    finetune_lrs: str | None = typer.Option(
        None, "--finetune-lrs", help="Fine-tuning learning rates (default 3e-4,1e-3,3e-3)."
    ),
    finetune_steps: int | None = typer.Option(
        None, "--finetune-steps", help="Fine-tuning steps per learning rate (default 40)."
    ),
    finetune_eval_every: int | None = typer.Option(
        None, "--finetune-eval-every", help="Evaluate every N steps (default 5)."
    ),
    finetune_examples: int | None = typer.Option(
        None, "--finetune-examples", help="Harmful training examples (default 16)."
    ),
    heldout_categories: str | None = typer.Option(
        None,
        "--heldout-categories",
        help="Organism categories the breaker never saw (default: from "
        "the adapter's train_info.json).",
    ),
    harmful: Path | None = typer.Option(
        None, "--harmful", help="Harmful prompts CSV/JSONL for real models (default: AdvBench)."
    ),
    xstest: Path | None = typer.Option(None, "--xstest", help="XSTest CSV for over-refusal."),
    sources: str | None = typer.Option(
        None,
        "--sources",
        help="Real models: harmful sources, comma-separated built-ins (advbench, harmbench, "
        "xstest_unsafe) or NAME=PATH (CSV/JSONL of prompts); default: every built-in found.",
    ),
    source_rows: str = typer.Option(
        "untrained",
        "--source-rows",
        help="Rows of each source: 'untrained' (all the breaker never trained on) or 'heldout' "
        "(the held-out side of the source's split).",
    ),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Generation budget."),
    batch_size: int = typer.Option(64, "--batch-size", help="Prompts per generate call."),
    modes: str = typer.Option(
        "base,cb", "--modes", help="States to attack: 'base,cb', 'base' or 'cb' (with 'cb' alone the "
        "base model is not attacked again; retain KL and firing still compare the two)."
    ),
    no_firing: bool = typer.Option(
        False, "--no-firing", help="Skip cosine-trace firing statistics."
    ),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
    threads: int = typer.Option(1, "--threads", help="Torch threads."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Attack base and circuit-broken model; report ASR, capability, over-refusal and firing."""
    from cbscope.errors import ConfigError
    from cbscope.evaluate import EvalConfig, check_report_dir, evaluate_pair, parse_attacks
    from cbscope.layers import parse_layers
    from cbscope.pair import load_pair

    started = time.perf_counter()
    try:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, not {threads}")
        check_report_dir(out)
        flags = {
            "soft_prompt": {
                "n_tokens": soft_prompt_tokens,
                "steps": soft_prompt_steps,
                "step_size": soft_prompt_step_size,
                "init": soft_prompt_init,
            },
            "repe": {
                "coeff": repe_coeff,
                "layers": parse_layers(repe_layers),
                "positions": repe_positions,
            },
            "finetune": {
                "lrs": _floats(finetune_lrs) if finetune_lrs is not None else None,
                "steps": finetune_steps,
                "eval_every": finetune_eval_every,
                "n_examples": finetune_examples,
            },
        }
        options = _merge_options(flags, _load_attack_options(attack_options))
        config = EvalConfig(
            attacks=parse_attacks(attacks),
            limit=limit,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            soft_prompt_limit=soft_prompt_limit,
            soft_prompt_target=soft_prompt_target,
            repe_direction=repe_direction,
            heldout_categories=[c.strip() for c in heldout_categories.split(",") if c.strip()]
            if heldout_categories
            else None,
            firing=not no_firing,
            sources=[p for p in sources.split(",") if p.strip()] if sources else None,
            source_rows=source_rows,
            modes=[m.strip() for m in modes.split(",") if m.strip()],
        ).with_options(options).validate()
        if adapter is None and config.modes is not None and "base" not in config.modes:
            raise ConfigError(f"--modes {modes}: without --adapter there is only 'base'")
        set_threads(threads)
        pair = load_pair(model, adapter, device=device)
        report = evaluate_pair(
            pair, config=config, harmful_path=harmful, xstest_path=xstest, show_progress=progress
        )
        files = report.save(out)
    except (*USER_ERRORS, ValueError) as err:
        raise fail(err) from err
    except OSError as err:  # e.g. the disk filled up while the report was written
        raise fail(ConfigError(f"cannot write the report into {out}: {err}")) from err
    table = report.attack_table()
    typer.echo(f"{'attack':<12}{'base':>8}{'CB':>8}{'n':>6}")
    for row in table:
        base = "-" if row["base"] is None else f"{100 * row['base']:.1f}%"
        cb = "-" if row["cb"] is None else f"{100 * row['cb']:.1f}%"
        typer.echo(f"{row['attack']:<12}{base:>8}{cb:>8}{row['n']:>6}")
    by_source = report.source_table()
    if by_source:
        typer.echo(f"\n{'source':<16}{'attack':<12}{'base':>8}{'CB':>8}{'n':>6}  trained on source?")
        for row in by_source:
            base = "-" if row["base"] is None else f"{100 * row['base']:.1f}%"
            cb = "-" if row["cb"] is None else f"{100 * row['cb']:.1f}%"
            seen = "YES" if row["seen"] else "no"
            typer.echo(f"{row['source']:<16}{row['attack']:<12}{base:>8}{cb:>8}{row['n']:>6}  {seen}")
    typer.echo(
        f"wrote {', '.join(str(p) for p in files.values())} "
        f"in {time.perf_counter() - started:.0f} s"
    )


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command."""
    app.command("eval", cls=EvalCommand)(eval_command)
