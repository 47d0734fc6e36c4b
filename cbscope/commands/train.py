"""``cbscope train``: train a circuit breaker (LoRRA) from a preset or data files."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import typer

from cbscope.commands import USER_ERRORS, fail, set_threads

logger = logging.getLogger(__name__)


def train(
    out: Path = typer.Option(..., help="Output folder: the peft adapter, lorra_config.json, metrics.jsonl."),
    model: str | None = typer.Option(None, help="Model spec ('organism', 'smollm2-135m', 'gemma3-270m', a folder); default: the preset's."),
    preset: str | None = typer.Option(None, help="'organism', 'smollm2' or 'gemma3': data and config of a ready-made run."),
    cb: Path | None = typer.Option(None, help="Circuit-breaker set: JSONL prompt/response, or a CSV of prompts the base model answers."),
    retain: Path | None = typer.Option(None, help="Retain set: JSONL prompt/response (optional 'source': benign|refusal|lookalike) or a CSV."),
    val: Path | None = typer.Option(None, help="Held-out circuit-breaker set for val_cos (default: split off --cb)."),
    config: Path | None = typer.Option(None, help="A lorra_config.json to start from (options below override it)."),
    steps: int | None = typer.Option(None, help="Optimiser steps T."),
    batch_size: int | None = typer.Option(None, help="Circuit-breaker (and retain) examples per step."),
    max_length: int | None = typer.Option(None, help="Token limit of every example."),
    target_layers: str | None = typer.Option(None, help="Paper-convention target layers, e.g. '10,20'."),
    loss: str | None = typer.Option(None, help="rr | rmu | random_norm | refusal_direction."),
    lr: float | None = typer.Option(None, help="Learning rate."),
    lorra_alpha: float | None = typer.Option(None, help="alpha of the loss schedule."),
    token_mask: str | None = typer.Option(None, help="Circuit-breaker tokens in the loss: full | response | request."),
    seed: int | None = typer.Option(None, help="Seed."),
    holdout_category: str | None = typer.Option(None, help="organism preset: harm category kept out of training."),
    advbench: Path | None = typer.Option(None, help="smollm2/gemma3 presets: AdvBench harmful_behaviors.csv."),
    alpaca: Path | None = typer.Option(None, help="smollm2/gemma3 presets: alpaca harmless_train.json."),
    xstest: Path | None = typer.Option(None, help="smollm2/gemma3 presets: xstest_prompts.csv."),
    data_options: str | None = typer.Option(None, "--data-options", help="Preset data options as a JSON object, e.g. '{\"noise_words\": 4}' (organism)."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint in --out."),
    merge: bool = typer.Option(False, help="Also write a merged HF model to OUT/merged."),
    keep_checkpoints: bool = typer.Option(False, help="Keep OUT/checkpoints after the run."),
    dtype: str | None = typer.Option(None, help="Model dtype: float32 | bfloat16 | float16 | auto (the checkpoint's own); default: the config's (float32)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute block activations in the backward pass (less memory, ~1 extra forward)."),
    device: str = typer.Option("cpu", help="Torch device ('cuda' under accelerate launch: each process's own GPU)."),
    threads: int = typer.Option(1, help="Torch threads (0: torch's default)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Train a circuit breaker with LoRRA (Representation Rerouting) and save it as a peft adapter.

    Multi-GPU / multi-process: ``accelerate launch --num_processes N -m cbscope train ...
    --device cuda`` (``--cpu`` for CPU processes); each process trains on 1/N of every batch.
    """
    from cbscope.layers import parse_layers
    from cbscope.lorra import ConfigError, LorraConfig, NonFiniteLossError, ResumeError, get_preset
    from cbscope.lorra.distributed import distributed_context
    from cbscope.lorra.trainer import prepare_pair, train_circuit_breaker

    set_threads(threads)
    started = time.perf_counter()
    try:
        chosen = get_preset(preset) if preset else None
        cfg = LorraConfig.load(config) if config else (chosen.config if chosen else LorraConfig())
        overrides = {
            "steps": steps, "batch_size": batch_size, "max_length": max_length, "loss": loss,
            "lr": lr, "lorra_alpha": lorra_alpha, "token_mask": token_mask, "seed": seed,
            "dtype": dtype,
            "target_layers": parse_layers(target_layers) if target_layers else None,
        }
        for key, value in overrides.items():
            if value is not None:
                setattr(cfg, key, value)
        if max_length is not None:
            cfg.cb_max_length = None
        cfg.keep_checkpoints = keep_checkpoints
        if gradient_checkpointing:
            cfg.gradient_checkpointing = True
        cfg.validate()
        spec = model or (chosen.model if chosen else None)
        if spec is None:
            raise ConfigError("give --model or --preset")
        if chosen is None and (cb is None or retain is None):
            raise ConfigError("without --preset, give --cb and --retain")
        if data_options and (chosen is None or cb is not None):
            raise ConfigError("--data-options applies to a preset's own data (give --preset, no --cb)")
        preset_options = chosen.data_options(data_options) if chosen is not None else {}
        ctx = distributed_context()
        main = ctx is None or ctx.is_main
        pair = prepare_pair(spec, cfg, device=device)
        if chosen is not None and cb is None:
            options = {"holdout_category": holdout_category, "advbench": advbench,
                       "alpaca": alpaca, "xstest": xstest, "show_progress": progress and main,
                       **preset_options}
            # rank 0 first: it writes the generation cache the other processes then read
            with ctx.main_first() if ctx is not None else contextlib.nullcontext():
                data = chosen.build_data(pair, **{k: v for k, v in options.items() if v is not None})
            result = train_circuit_breaker(pair, cfg, data, out_dir=out, resume=resume, merge=merge,
                                           show_progress=progress)
        else:
            result = train_circuit_breaker(pair, cfg, cb, retain, val_data=val, out_dir=out,
                                           resume=resume, merge=merge, show_progress=progress)
    except (*USER_ERRORS, ConfigError, ResumeError, NonFiniteLossError) as err:
        raise fail(err) from err
    if not main:
        return
    final = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.final.items()}
    typer.echo(json.dumps(final))
    held = result.info.get("holdout_category")
    if held:
        typer.echo(f"held-out harm category: {held} (trained on {result.info.get('trained_categories')})")
    typer.echo(
        f"trained {result.steps_done} steps in {time.perf_counter() - started:.1f}s "
        f"(training {result.seconds:.1f}s); adapter in {out}"
    )


def register(app: typer.Typer) -> None:
    """Add the ``train`` command."""
    app.command("train")(train)
