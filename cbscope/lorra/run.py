"""One training run: :class:`RunConfig` holds all of it, :class:`Runner` runs it.

    from cbscope.run import RunConfig, Runner
    result = Runner(RunConfig(model="organism", preset="organism", out="runs/rr")).run()

The runner is the only orchestrator of a training run. ``cbscope train``, the app's Train
view, the generalisation matrices, ``benchmarks/organism_seeds.py`` and
:func:`cbscope.lorra.train_circuit_breaker` all use it. (SAELens's
``SAETrainingRunner(cfg).run()`` is the model.) The command line's options come from the fields
of :class:`RunConfig` and :class:`~cbscope.lorra.config.LorraConfig`, with the help text taken
from their docstrings (:func:`field_docs`).

What a run does with its output folder ``out`` (see :mod:`cbscope.lorra.outputs`):

* It checks everything it can before any work: the config (types, ranges, NaN and infinite
  numbers), the files, the flags, and what ``out`` holds. A problem is a one-line
  :class:`~cbscope.errors.CbscopeError`, and no file has changed.
* It refuses an ``out`` that holds anything but a cbscope run, and names what it found. It
  refuses a finished run too. ``overwrite=True`` (``--overwrite``) replaces either.
* It trains in the staging folder ``OUT.partial`` and swaps it in for ``out`` only when the
  run has finished. A run that fails or is killed leaves ``out`` byte-identical.
* ``resume=True`` continues an interrupted run from the newest usable checkpoint (a corrupt one
  falls back to the one before it) and may lower the learning rate. On a finished run it is a
  :class:`~cbscope.errors.ResumeError` that changes nothing. When there is nothing to resume,
  it is a ``ResumeError`` too, unless ``restart=True`` (``--restart``) allows starting again from
  step 0. That start is logged as a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cbscope.errors import ConfigError, MissingFileError, ResumeError
from cbscope.lorra.checkpoint import CHECKPOINT_DIR, Checkpoint, check_compatible, find_resumable
from cbscope.lorra.config import LorraConfig, check_field_types
from cbscope.lorra.data import LorraData, as_examples, check_utf8, data_warnings
from cbscope.lorra.distributed import distributed_context
from cbscope.lorra.frozen import FrozenCache
from cbscope.lorra.loop import StepCallback, TrainResult, assemble_data, prepare_pair, train_loop
from cbscope.lorra.outputs import (
    ABSENT,
    EMPTY,
    FILE,
    FINISHED,
    FOREIGN,
    UNFINISHED,
    inspect_folder,
    publish,
    staging_dir,
)

logger = logging.getLogger(__name__)

#: Preset data options that have options of their own on the command line.
PRESET_FILE_OPTIONS = ("advbench", "alpaca", "xstest")


@dataclass
class RunConfig:
    """Everything about one training run: model, data, output folder, flags and the LoRRA config.

    Attributes:
        out: Output folder: the peft adapter, lorra_config.json, metrics.jsonl, train_info.json.
            It must be new, empty or a cbscope run (see overwrite). The run works in OUT.partial
            beside it and swaps that in only when the run has finished. None: train in memory.
        model: Model spec ('organism', 'smollm2-135m', 'gemma3-270m', a folder); default: the
            preset's.
        preset: 'organism', 'smollm2', 'gemma3', 'official' (the organism under the official
            recipe), 'llama3-8b-rr' or 'mistral-7b-rr' (the paper's runs, official data files
            via --data-options): data and config of a ready-made run.
        cb: Circuit-breaker set: JSONL prompt/response, or a CSV of prompts the base model
            answers.
        retain: Retain set: JSONL prompt/response (optional 'source': benign, refusal or
            lookalike) or a CSV.
        val: Held-out circuit-breaker set for val_cos (default: split off the circuit-breaker
            set).
        config: A lorra_config.json (or a run folder) to start from; the LoRRA options override it.
        data_options: Preset data options as a JSON object, e.g. '{"noise_words": 4}' (organism).
        holdout_category: organism preset: the harm category kept out of training.
        advbench: smollm2/gemma3 presets: AdvBench harmful_behaviors.csv.
        alpaca: smollm2/gemma3 presets: alpaca harmless_train.json.
        xstest: smollm2/gemma3 presets: xstest_prompts.csv.
        resume: Continue the interrupted run of this output folder from its newest usable
            checkpoint (a lower lr is allowed). A finished run, or nothing to resume, is an error
            that changes nothing.
        overwrite: Replace what the output folder holds (a finished run, an unfinished one, or
            other files) once the new run has finished; until then it stays as it was.
        restart: Start again from step 0: discard an interrupted run's checkpoints; with
            resume, start from step 0 when no checkpoint can be used.
        merge: Also write a merged HF model to OUT/merged.
        dry_run: Check the data, print the plan and a memory estimate, and stop: no weights are
            loaded and nothing is written (cbscope.lorra.dryrun).
        device: Torch device ('cuda' under accelerate launch: each process's own GPU).
        threads: Torch threads (0: torch's default; None: leave the current setting).
        progress: Show progress bars.
        lorra: The LoRRA config to start from (None: the config file's, else the preset's, else
            the paper's defaults).
        lorra_overrides: LorraConfig fields set on top of that (the command line's --steps,
            --lr ...); max_length without cb_max_length also resets cb_max_length.
    """

    out: Path | None = field(default=None, metadata={"cli": {"required": True}})
    model: str | None = None
    preset: str | None = None
    cb: Path | None = None
    retain: Path | None = None
    val: Path | None = None
    config: Path | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    holdout_category: str | None = None
    advbench: Path | None = None
    alpaca: Path | None = None
    xstest: Path | None = None
    resume: bool = False
    overwrite: bool = False
    restart: bool = False
    merge: bool = False
    dry_run: bool = False
    device: str = "cpu"
    threads: int | None = field(default=None, metadata={"cli": {"default": 1}})
    progress: bool = True
    lorra: LorraConfig | None = field(default=None, metadata={"cli": None})
    lorra_overrides: dict[str, Any] = field(default_factory=dict, metadata={"cli": None})

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        for name in ("out", "cb", "retain", "val", "config", "advbench", "alpaca", "xstest"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, Path(value))

    @property
    def dtype(self) -> str:
        """The model dtype: a field of the LoRRA config (resuming checks it)."""
        return self.lorra_config().dtype

    def preset_obj(self) -> Any:
        """The :class:`~cbscope.lorra.presets.Preset` named by :attr:`preset` (``None``: none)."""
        from cbscope.lorra.presets import get_preset

        return get_preset(self.preset) if self.preset else None

    def lorra_config(self) -> LorraConfig:
        """The run's validated LoRRA config: :attr:`lorra`, else the config file, else the
        preset's, else the defaults; then :attr:`lorra_overrides`."""
        preset = self.preset_obj()
        if self.lorra is not None and self.config is not None:
            raise ConfigError("give a LorraConfig or a config file (--config), not both")
        if self.lorra is not None:
            base = LorraConfig.from_dict(self.lorra.to_dict())
        elif self.config is not None:
            base = LorraConfig.load(self.config)
        else:
            base = preset.config if preset is not None else LorraConfig()
        known = {f.name for f in fields(LorraConfig)}
        unknown = sorted(set(self.lorra_overrides) - known)
        if unknown:
            raise ConfigError(f"unknown LorraConfig fields {unknown}")
        values = base.to_dict()
        values.update({k: v for k, v in self.lorra_overrides.items() if v is not None})
        if self.lorra_overrides.get("max_length") is not None and \
                self.lorra_overrides.get("cb_max_length") is None:
            values["cb_max_length"] = None
        return LorraConfig.from_dict(values)

    def validate(self, *, data_given: bool = False, model_given: bool = False) -> RunConfig:
        """Check the fields, the flags and the input files (not the output folder); returns
        ``self``.

        Args:
            data_given: The data come in memory (:class:`Runner`'s ``data`` or ``cb``), so the
                config must name none.
            model_given: A loaded model comes with the run, so the config need not name one.

        Raises:
            ConfigError: A bad value or a bad combination, named.
            MissingFileError: An input file that does not exist.
            DatasetError: An input file that is not UTF-8 or not valid JSONL (file and line).
        """
        check_field_types(self, skip=("lorra_overrides",))  # lorra_config() names those fields
        if not isinstance(self.lorra_overrides, dict):
            raise ConfigError("lorra_overrides must be a dict of LorraConfig fields")
        if self.threads is not None and self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0: torch's default), not {self.threads}")
        preset = self.preset_obj()
        if self.model is None and preset is None and not model_given:
            raise ConfigError("give --model or --preset")
        own_data = self.cb is None and self.retain is None and not data_given
        if data_given and not (self.cb is None and self.retain is None):
            raise ConfigError("give the data either in memory or as --cb/--retain files, not both")
        if not data_given and preset is None and (self.cb is None or self.retain is None):
            raise ConfigError("without --preset, give --cb and --retain")
        if not data_given and (self.cb is None) != (self.retain is None):
            raise ConfigError("give both --cb and --retain (or neither, with --preset)")
        preset_only = {"data_options": self.data_options, "holdout_category": self.holdout_category,
                       **{name: getattr(self, name) for name in PRESET_FILE_OPTIONS}}
        for name, value in preset_only.items():
            if value and (preset is None or not own_data):
                option = "--" + name.replace("_", "-")
                raise ConfigError(f"{option} applies to a preset's own data (give --preset, no --cb)")
        if preset is not None and self.data_options:
            preset.check_data_options(dict(self.data_options))
        if self.resume and self.out is None:
            raise ConfigError("resume needs an output folder (--out) to resume")
        for name in ("config", *PRESET_FILE_OPTIONS):
            path = getattr(self, name)
            if path is not None and not path.exists():
                raise MissingFileError(f"--{name} {path}: no such file")
        for name, what in (("cb", "circuit-breaker"), ("retain", "retain"), ("val", "validation")):
            path = getattr(self, name)
            if path is None:
                continue
            check_utf8(path)
            if path.suffix.lower() != ".csv":  # a CSV needs the model, which answers it
                as_examples(path, require_response=name != "retain", what=what)
        self.lorra_config()
        return self


# ---------------------------------------------------------------------- the output folder
@dataclass
class RunPlan:
    """What a run will do with its folders, decided before any work (:meth:`Runner.plan`).

    Attributes:
        lorra: The run's LoRRA config.
        out: The output folder (``None``: in memory).
        work: The staging folder ``OUT.partial``.
        resume_from: The checkpoint to resume (``None``: start at step 0).
        discard: Folders to delete before training starts (an interrupted run the flags discard).
        copy_from: An unfinished run folder to copy into ``work`` first (a run written into its
            output folder by an older cbscope).
        notes: Warnings to log when the run starts.
    """

    lorra: LorraConfig
    out: Path | None = None
    work: Path | None = None
    resume_from: Checkpoint | None = None
    discard: list[Path] = field(default_factory=list)
    copy_from: Path | None = None
    notes: list[str] = field(default_factory=list)


def _writable_parent(out: Path) -> None:
    """Raise a :class:`ConfigError` unless ``out``'s nearest existing ancestor is a writable
    folder (the staging folder is made beside ``out``)."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {parent} (permission denied)")
    if out.exists() and out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: the folder is not writable (permission denied)")


def _probe_writable(out: Path, folder: Path) -> None:
    """Make ``folder`` (the staging folder's parent) and a folder in it, then remove that:
    permissions say yes to root on a read-only or virtual filesystem, a real write does not."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".cbscope-probe-", dir=folder))
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write in {folder} ({err.strerror or err})") from err


def _guard_overwrite(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse to replace a folder that holds the current folder, the home folder or an input."""
    target = out.resolve()
    protected = {Path("/").resolve(), Path.home().resolve()}
    cwd = Path.cwd().resolve()
    if target in protected or target == cwd or target in cwd.parents:
        raise ConfigError(f"--overwrite would replace {out}, which holds the current folder (or is "
                          "/ or the home folder): choose a folder of its own for --out")
    for path in inputs:
        resolved = path.resolve()
        if resolved == target or target in resolved.parents:
            raise ConfigError(f"--overwrite would replace {out}, which holds the input {path}: "
                              "choose another --out")


def _checkpoint_summary(folder: Path) -> str:
    found = find_resumable(folder / CHECKPOINT_DIR)
    if found.checkpoint is not None:
        return f"newest usable checkpoint: step {found.checkpoint.step}"
    return "no usable checkpoint" + (f" ({found.describe_skipped()})" if found.skipped else "")


def plan_output(cfg: RunConfig, lorra: LorraConfig, inputs: Sequence[Path] = ()) -> RunPlan:
    """Decide what a run does with ``cfg.out`` and its staging folder; reads, never writes.

    Raises:
        ConfigError: ``out`` is a file or unwritable, holds other files or a finished or
            unfinished run the flags do not replace, or an interrupted run is in the way.
        ResumeError: ``resume`` on a finished run, with nothing usable to resume (without
            ``restart``), or with a checkpoint made with another config.
    """
    if cfg.out is None:
        return RunPlan(lorra)
    out, work = Path(cfg.out), staging_dir(cfg.out)
    here, staged = inspect_folder(out), inspect_folder(work)
    if here.kind == FILE:
        raise ConfigError(f"--out {out} is a file, not a folder: choose a folder for the run")
    _writable_parent(out)
    if staged.kind in (FILE, FOREIGN):
        what = "is a file" if staged.kind == FILE else f"holds {staged.describe_foreign()}"
        raise ConfigError(f"{work} (the staging folder of --out {out}) {what}, which is not a "
                          "cbscope run's: move it away")
    if cfg.overwrite:
        _guard_overwrite(out, inputs)
    elif here.kind == FOREIGN:
        raise ConfigError(
            f"--out {out} holds files that are not a cbscope run's: {here.describe_foreign()}; "
            "choose another folder, or pass --overwrite to replace it and everything in it"
        )
    elif here.kind == FINISHED:
        steps = here.summary.get("steps")
        done = f" ({steps} steps)" if steps is not None else ""
        if cfg.resume:
            raise ResumeError(
                f"--out {out} holds a finished run{done}: there is nothing to resume, and it is "
                "left as it is; pass --overwrite to train it again, or choose another --out"
            )
        raise ConfigError(f"--out {out} holds a finished run{done}: pass --overwrite to replace "
                          "it, or choose another --out")
    interrupted = staged.kind not in (ABSENT, EMPTY)
    legacy = here.kind == UNFINISHED  # an older cbscope trained inside --out itself
    plan = RunPlan(lorra, out, work)
    if not cfg.resume:
        if interrupted and not (cfg.restart or cfg.overwrite):
            raise ConfigError(
                f"an interrupted run of --out {out} is kept in {work} ({_checkpoint_summary(work)}): "
                "pass --resume to continue it, or --restart to discard it and start again"
            )
        if legacy and not (cfg.restart or cfg.overwrite):
            raise ConfigError(
                f"--out {out} holds an unfinished run ({_checkpoint_summary(out)}): pass --resume "
                "to continue it, or --overwrite to start again"
            )
        if interrupted:
            plan.discard.append(work)
        return plan
    skipped: list[str] = []
    sources = [(work, False)] if interrupted else []
    if legacy:
        sources.append((out, True))
    for folder, copy in sources:
        found = find_resumable(folder / CHECKPOINT_DIR)
        skipped += [f"{folder / CHECKPOINT_DIR / name}: {why}" for name, why in found.skipped]
        if found.checkpoint is None:
            continue
        allowed = check_compatible(found.checkpoint, lorra.to_dict())
        plan.notes += [f"checkpoint {s} skipped; resuming from step {found.checkpoint.step}"
                       for s in skipped]
        if "lr" in allowed:
            plan.notes.append(f"resuming with lr {allowed['lr']['now']:g}, lower than the "
                              f"checkpoint's {allowed['lr']['checkpoint']:g}")
        plan.resume_from = found.checkpoint
        if copy:
            plan.copy_from = out
            if interrupted:
                plan.discard.append(work)
        return plan
    where = ", ".join(str(f) for f, _ in sources) or f"{out} or {work}"
    reason = "; ".join(skipped) if skipped else "no checkpoint"
    if not cfg.restart:
        raise ResumeError(
            f"nothing to resume in {where}: {reason}. Nothing was changed; pass --restart to start "
            "again from step 0" + (" (the interrupted run is discarded)" if interrupted else "")
        )
    plan.notes.append(f"nothing to resume in {where} ({reason}): starting again from step 0 "
                      "(--restart)")
    if interrupted:
        plan.discard.append(work)
    return plan


def _check_layers(model: Any, lorra: LorraConfig) -> None:
    """Check the config's layers against a model folder's depth, when the model is a folder
    (other specs are resolved, and checked, when the model loads)."""
    import json

    depth = getattr(model, "n_layers", None)
    if depth is None and isinstance(model, (str, os.PathLike)):
        config = Path(model) / "config.json"
        if config.is_file():
            try:
                depth = json.loads(config.read_text(encoding="utf-8")).get("num_hidden_layers")
            except (OSError, ValueError):
                depth = None
    if isinstance(depth, int):
        lorra.resolved_target_layers(depth)
        lorra.resolved_lora_layers(depth)


# ---------------------------------------------------------------------- the runner
class Runner:
    """Runs a :class:`RunConfig`: checks, loads the model and data, trains, publishes.

    Args:
        cfg: The run.
        model: A loaded :class:`~cbscope.pair.ModelPair` (used as is if its adapter fits the
            config, else only its base model) or a resolved model, instead of ``cfg.model``.
        data: A whole :class:`~cbscope.lorra.data.LorraData`, instead of the preset's or the
            files'.
        cb: Circuit-breaker examples in memory (a list of examples or dicts), instead of
            ``cfg.cb``; ``retain`` and ``val`` likewise.
        retain: Retain examples in memory (``{source: examples}`` or a list).
        val: Validation examples in memory.
        on_step: Called after every step with its metrics.
        stop_after: Stop (with a checkpoint) after this many steps of this call.
        frozen_cache: A :class:`~cbscope.lorra.frozen.FrozenCache` to use and fill (runs that
            share one compute the frozen representations of their common examples once);
            ``None``: the run makes its own when ``cache_frozen`` is on.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        model: Any = None,
        data: LorraData | None = None,
        cb: Any = None,
        retain: Any = None,
        val: Any = None,
        on_step: StepCallback | None = None,
        stop_after: int | None = None,
        frozen_cache: FrozenCache | None = None,
    ) -> None:
        self.cfg = cfg
        self.frozen_cache = frozen_cache
        self.model = model
        self.data = data
        self.examples = (cb, retain, val)
        self.on_step = on_step
        self.stop_after = stop_after

    def plan(self) -> RunPlan:
        """Check the run and decide what it does with its folders; changes nothing on disk.

        Raises:
            CbscopeError: Any problem with the config, the inputs, the flags or ``out``.
        """
        cfg = self.cfg.validate(data_given=self.data is not None or self.examples[0] is not None,
                                model_given=self.model is not None)
        lorra = cfg.lorra_config()
        ctx = distributed_context()
        if ctx is not None and lorra.batch_size < ctx.world_size:
            raise ConfigError(
                f"batch_size {lorra.batch_size} is smaller than the number of processes "
                f"{ctx.world_size}: every process needs at least one row of each global batch"
            )
        _check_layers(self.model if self.model is not None else cfg.model, lorra)
        inputs = [p for p in (cfg.cb, cfg.retain, cfg.val, cfg.config, cfg.advbench, cfg.alpaca,
                              cfg.xstest) if p is not None]
        if isinstance(cfg.model, (str, os.PathLike)) and Path(cfg.model).exists():
            inputs.append(Path(cfg.model))
        return plan_output(cfg, lorra, inputs)

    def dry_run(self) -> Any:
        """Check the run without loading weights (:func:`cbscope.lorra.dryrun.dry_run`)."""
        from cbscope.lorra.dryrun import dry_run

        return dry_run(self)

    def _model_spec(self) -> Any:
        if self.model is not None:
            return self.model
        preset = self.cfg.preset_obj()
        return self.cfg.model or preset.model

    def _build_data(self, pair: Any, lorra: LorraConfig, show_progress: bool) -> LorraData:
        cfg = self.cfg
        cb, retain, val = self.examples
        if self.data is not None:
            return assemble_data(pair, lorra, self.data, None, show_progress=show_progress)
        if cb is not None or cfg.cb is not None:
            return assemble_data(pair, lorra, cb if cb is not None else cfg.cb,
                                 retain if retain is not None else cfg.retain,
                                 val if val is not None else cfg.val, show_progress=show_progress)
        preset = cfg.preset_obj()
        options = {"holdout_category": cfg.holdout_category, "show_progress": show_progress,
                   **{name: getattr(cfg, name) for name in PRESET_FILE_OPTIONS},
                   **dict(cfg.data_options)}
        data = preset.build_data(pair, **{k: v for k, v in options.items() if v is not None})
        return assemble_data(pair, lorra, data, None, show_progress=show_progress)

    def run(self) -> TrainResult:
        """Train, and publish the outputs into ``cfg.out`` when the run finishes.

        Returns:
            The :class:`~cbscope.lorra.loop.TrainResult` (``out_dir`` is ``cfg.out``;
            ``finished`` is False after ``stop_after``: the run then waits in ``work_dir``).

        Raises:
            CbscopeError: Bad input (before any work), a resume that cannot be done, or a loss
                that became NaN, infinite or exploded (:class:`NonFiniteLossError`).
        """
        if self.cfg.dry_run:
            raise ConfigError("dry_run is set: call Runner.dry_run() (it trains nothing)")
        plan = self.plan()
        cfg, lorra = self.cfg, plan.lorra
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        ctx = distributed_context()
        main = ctx is None or ctx.is_main
        show = cfg.progress and main
        if plan.work is not None and main:
            _probe_writable(plan.out, plan.work.parent)
        pair = prepare_pair(self._model_spec(), lorra, device=cfg.device)
        with ctx.main_first() if ctx is not None else contextlib.nullcontext():
            data = self._build_data(pair, lorra, show)  # rank 0 writes the generation cache
        warnings = [*plan.notes, *data_warnings(lorra, data)]
        for note in plan.notes:
            logger.warning(note)
        resume_from = plan.resume_from
        if plan.work is not None and main:
            for folder in plan.discard:
                shutil.rmtree(folder)
            if plan.copy_from is not None:
                shutil.copytree(plan.copy_from, plan.work)
        if ctx is not None:
            ctx.barrier()
        if plan.copy_from is not None and resume_from is not None:
            resume_from = find_resumable(plan.work / CHECKPOINT_DIR).checkpoint
        flags = " --overwrite" if cfg.overwrite else ""
        result = train_loop(pair, lorra, data, work_dir=plan.work, resume_from=resume_from,
                            on_step=self.on_step, stop_after=self.stop_after, show_progress=show,
                            advice_flags=flags, frozen_cache=self.frozen_cache)
        if warnings:
            result.info["warnings"] = warnings
        result.out_dir = plan.out
        if plan.out is not None and result.finished and main:
            publish(result, plan.work, plan.out, merge=cfg.merge)
        if ctx is not None:
            ctx.barrier()  # the adapter is on disk before any process returns
        return result


# ---------------------------------------------------------------------- field docs
def field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of a dataclass's Google-style docstring
    (continuation lines joined; double backquotes dropped)."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return docs
    indent = None
    current = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        match = re.match(r"\s*(\w+):\s*(.*)", line)
        if width == indent and match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current is not None:
            docs[current] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in docs.items()}


def cli_fields(cls: type) -> list[tuple[Any, dict[str, Any]]]:
    """The fields of ``cls`` that are command-line options, with their ``cli`` metadata."""
    out = []
    for f in fields(cls):
        meta = f.metadata.get("cli", {})
        if meta is None:
            continue
        out.append((f, dict(meta)))
    return out


def run_config_from_options(values: dict[str, Any], parsers: dict[str, Callable[[str], Any]] | None = None) -> RunConfig:
    """A :class:`RunConfig` from command-line values: its own fields, and LorraConfig fields as
    :attr:`RunConfig.lorra_overrides` (``None``: not given). String values of structured fields
    are parsed by ``parsers`` (by field name)."""
    parsers = parsers or {}
    run_names = {f.name for f in fields(RunConfig)}
    run_values: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, str) and name in parsers:
            value = parsers[name](value)
        if value is None:
            continue  # not given: the field's default (or the base config's value)
        if name in run_names:
            run_values[name] = value
        else:
            overrides[name] = value
    return RunConfig(**run_values, lorra_overrides=overrides)
