"""``cbscope eval``: attack a model and its circuit breaker, write report.json / .md / .html."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

from cbscope.commands import USER_ERRORS, fail, set_threads

logger = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise typer.BadParameter("give at least one value")
    return values


def eval_command(
    model: str = typer.Option(
        "organism", "--model", help="Model spec: organism, smollm2-135m, gemma3-270m, a folder."
    ),
    adapter: Path | None = typer.Option(
        None, "--adapter", help="Circuit-breaker adapter folder (without it: base model only)."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for report.json, report.md, report.html."),
    attacks: str = typer.Option(
        "direct,prefill,template,multiturn,multiturn_prefill,soft_prompt,repe,finetune",
        "--attacks",
        help="Comma-separated attacks (or 'all').",
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
    soft_prompt_steps: int = typer.Option(500, "--soft-prompt-steps", help="Soft-prompt steps."),
    soft_prompt_tokens: int = typer.Option(20, "--soft-prompt-tokens", help="Soft-prompt vectors."),
    soft_prompt_step_size: float = typer.Option(
        0.05, "--soft-prompt-step-size", help="Signed-gradient step, relative to the embedding RMS."
    ),
    soft_prompt_init: str | None = typer.Option(
        None, "--soft-prompt-init", help="Initialise the soft prompt from this string."
    ),
    soft_prompt_target: str = typer.Option(
        "first_step",
        "--soft-prompt-target",
        help="Organism target: 'first_step' (prefix + first step), 'answer' or 'prefix'.",
    ),
    repe_coeff: float = typer.Option(-1.0, "--repe-coeff", help="RepE steering coefficient."),
    repe_layers: str | None = typer.Option(
        None,
        "--repe-layers",
        help="RepE layers, paper convention, e.g. '2,4' (default: target layers).",
    ),
    repe_positions: str = typer.Option(
        "prompt", "--repe-positions", help="Steer 'prompt' positions only or 'all' positions."
    ),
    repe_direction: str = typer.Option(
        "harmful_harmless",
        "--repe-direction",
        help="RepE direction: 'harmful_harmless' or 'refusal_compliance'.",
    ),
    finetune_lrs: str = typer.Option(
        "3e-4,1e-3,3e-3", "--finetune-lrs", help="Fine-tuning learning rates."
    ),
    finetune_steps: int = typer.Option(
        40, "--finetune-steps", help="Fine-tuning steps per learning rate."
    ),
    finetune_eval_every: int = typer.Option(
        5, "--finetune-eval-every", help="Evaluate every N steps."
    ),
    finetune_examples: int = typer.Option(
        16, "--finetune-examples", help="Harmful training examples."
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
    from cbscope.attacks import FinetuneAttackConfig, RepeConfig, SoftPromptConfig
    from cbscope.evaluate import EvalConfig, evaluate_pair, parse_attacks
    from cbscope.layers import parse_layers
    from cbscope.pair import load_pair

    set_threads(threads)
    started = time.perf_counter()
    try:
        config = EvalConfig(
            attacks=parse_attacks(attacks),
            limit=limit,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            soft_prompt=SoftPromptConfig(
                n_tokens=soft_prompt_tokens,
                steps=soft_prompt_steps,
                step_size=soft_prompt_step_size,
                init=soft_prompt_init,
            ),
            soft_prompt_limit=soft_prompt_limit,
            soft_prompt_target=soft_prompt_target,
            repe=RepeConfig(
                layers=parse_layers(repe_layers), coeff=repe_coeff, positions=repe_positions
            ),
            repe_direction=repe_direction,
            finetune=FinetuneAttackConfig(
                lrs=_floats(finetune_lrs),
                steps=finetune_steps,
                eval_every=finetune_eval_every,
                n_examples=finetune_examples,
            ),
            heldout_categories=[c.strip() for c in heldout_categories.split(",") if c.strip()]
            if heldout_categories
            else None,
            firing=not no_firing,
            sources=[p for p in sources.split(",") if p.strip()] if sources else None,
            source_rows=source_rows,
            modes=[m.strip() for m in modes.split(",") if m.strip()],
        ).validate()
        pair = load_pair(model, adapter, device=device)
        report = evaluate_pair(
            pair, config=config, harmful_path=harmful, xstest_path=xstest, show_progress=progress
        )
    except (*USER_ERRORS, ValueError) as err:
        raise fail(err) from err
    files = report.save(out)
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
    app.command("eval")(eval_command)
