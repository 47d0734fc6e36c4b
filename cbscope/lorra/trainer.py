"""Train a circuit breaker from Python: :func:`train_circuit_breaker`.

The function keeps its signature and builds a :class:`cbscope.run.RunConfig` for the one
orchestrator, :class:`cbscope.run.Runner`. The loop itself is :mod:`cbscope.lorra.loop`, the
checkpoints are :mod:`cbscope.lorra.checkpoint`, the files of a run :mod:`cbscope.lorra.outputs`;
their public names are re-exported here, where they used to live.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from cbscope.errors import NonFiniteLossError, ResumeError
from cbscope.lorra.checkpoint import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    RESUME_IGNORES,
    latest_checkpoint,
    save_checkpoint,
)
from cbscope.lorra.config import LorraConfig
from cbscope.lorra.data import LorraData
from cbscope.lorra.loop import (
    StepCallback,
    StepSetup,
    TrainResult,
    _step_terms,
    _train_step,
    assemble_data,
    cb_term,
    loss_targets,
    mean_cosine_on,
    prepare_pair,
    train_loop,
)
from cbscope.lorra.outputs import INFO_FILE, METRICS_FILE, merge_adapter, save_outputs, staging_dir

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "INFO_FILE",
    "METRICS_FILE",
    "RESUME_IGNORES",
    "NonFiniteLossError",
    "ResumeError",
    "StepSetup",
    "TrainResult",
    "_step_terms",
    "_train_step",
    "assemble_data",
    "cb_term",
    "latest_checkpoint",
    "loss_targets",
    "mean_cosine_on",
    "merge_adapter",
    "prepare_pair",
    "save_checkpoint",
    "save_outputs",
    "staging_dir",
    "train_circuit_breaker",
    "train_loop",
]


def train_circuit_breaker(
    pair_or_spec: Any = "organism",
    config: LorraConfig | None = None,
    cb_data: Any = None,
    retain_data: Any = None,
    *,
    val_data: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    restart: bool = False,
    merge: bool = False,
    on_step: StepCallback | None = None,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
    frozen_cache: Any = None,
) -> TrainResult:
    """Train a circuit breaker (a LoRA adapter) with LoRRA.

    Args:
        pair_or_spec: A model spec (``"organism"``, ``"smollm2-135m"``, a folder), a resolved
            model, or a :class:`~cbscope.pair.ModelPair` (see :func:`prepare_pair`).
        config: The run's :class:`LorraConfig` (default: the paper's).
        cb_data: Circuit-breaker examples (list of :class:`ChatExample`/dicts, a JSONL file, a
            CSV of prompts the base model answers) or a whole :class:`LorraData`.
        retain_data: Retain examples: ``{source: examples}``, or a list/file split by each
            example's ``source`` field (ignored when ``cb_data`` is a :class:`LorraData`).
        val_data: Held-out circuit-breaker examples for ``val_cos`` (default: ``val_size``
            examples split off the circuit-breaker set).
        out_dir: Output folder: the peft adapter, ``lorra_config.json``, ``metrics.jsonl``,
            ``train_info.json``. The run works in ``OUT.partial`` beside it (its checkpoints
            live there) and swaps it in when it finishes. ``None``: train in memory only.
        resume: Continue the interrupted run of ``out_dir`` (see :class:`cbscope.run.RunConfig`).
        overwrite: Replace what ``out_dir`` holds once the run has finished.
        restart: Start again from step 0 (discarding an interrupted run's checkpoints); with
            ``resume``, when no checkpoint can be used.
        merge: Also write a merged HF model to ``out_dir/merged``.
        on_step: Called after every step with that step's metrics dict.
        stop_after: Stop (with a checkpoint) after this many steps *in this call*.
        device: Torch device when a spec is given (``cuda`` means this process's GPU under
            ``accelerate launch``).
        show_progress: tqdm bar (rank 0 only in a multi-process run).
        frozen_cache: A :class:`~cbscope.lorra.frozen.FrozenCache` shared with other runs
            (``config.cache_frozen``; ``None``: the run makes its own).

    Launched with ``accelerate launch --num_processes N`` (``WORLD_SIZE > 1``), every process
    trains on its contiguous ``1/N`` of each global batch (``config.batch_size`` circuit-breaker
    and as many retain rows, so ``batch_size >= N``), the LoRA gradients are summed over
    processes with each shard's loss normalised by the global token counts (the same gradient
    as one process on the whole batch, up to float summation order and padding width), and the
    schedule, data plan and AdamW steps are the global ones. Metrics are reduced over processes;
    rank 0 alone writes ``metrics.jsonl``, checkpoints (with every rank's RNG state) and the
    adapter. ``resume`` restores the same checkpoint on every rank. See
    :mod:`cbscope.lorra.distributed`.

    Raises:
        NonFiniteLossError: The loss became NaN/inf or exploded (the message names the last
            good checkpoint).
        ResumeError: Nothing to resume, a finished run, or a checkpoint made with another config
            or other data.
        ConfigError: A bad config value, or an ``out_dir`` that holds other files or a finished
            run (without ``overwrite``).
        DatasetError: Malformed data (file, line and field named).
    """
    from cbscope.lorra.run import RunConfig, Runner

    spec = isinstance(pair_or_spec, (str, os.PathLike))
    cfg = RunConfig(
        out=out_dir, model=str(pair_or_spec) if spec else None,
        lorra=config if config is not None else LorraConfig(), resume=resume,
        overwrite=overwrite, restart=restart, merge=merge, device=str(device),
        progress=show_progress,
    )
    model = None if spec else pair_or_spec
    if isinstance(cb_data, LorraData):
        runner = Runner(cfg, model=model, data=cb_data, on_step=on_step, stop_after=stop_after,
                        frozen_cache=frozen_cache)
    else:
        runner = Runner(cfg, model=model, cb=cb_data, retain=retain_data, val=val_data,
                        on_step=on_step, stop_after=stop_after, frozen_cache=frozen_cache)
    return runner.run()
