"""The LoRRA training loop: Representation Rerouting through TransformerLens hook points.

One step (see :mod:`cbscope.lorra.losses` for the formulas):

1. the step's circuit-breaker rows and retain rows are padded into **one** batch;
2. **one** frozen forward (adapters off, no grad) and **one** adapted forward read the residual
   stream at ``blocks.{l-1}.hook_resid_post`` (:meth:`ModelPair.resid_layers`); both stop after
   the highest layer needed, so the rest of the model and the unembedding never run (the official
   code runs four full forwards with ``output_hidden_states``);
3. the circuit-breaker rows at the target layers and the retain rows at the retain layers are
   taken from the per-layer tensors (:class:`_RowBlocks`);
4. ``loss = c_s * L_cb + c_r * L_retain``, AdamW on the LoRA parameters only.

Every ``log_every`` steps a line goes to ``metrics.jsonl`` (with ``val_cos``, the cosine on a
held-out circuit-breaker batch); every ``checkpoint_every`` steps a checkpoint is written
(:mod:`cbscope.lorra.checkpoint`). A run resumed from a checkpoint gives an adapter
bit-identical to an uninterrupted run on the CPU. A loss that is not finite, or has exploded,
stops the run before the optimiser step (:class:`NonFiniteLossError`); a checkpoint whose
weights gave that loss is marked bad, and the message names the last good one.

This module is the loop; :class:`cbscope.run.Runner` is the orchestrator around it (the output
folder, the model, the data, the published outputs).

Metrics of a step (``on_step`` gets every step, ``metrics.jsonl`` every ``log_every``):
``loss``, ``cb_loss``, ``retain_loss``, ``c_s``, ``c_r`` (times ``retain_weight``); ``cb_cos`` /
``retain_cos``: masked mean cosine (no ReLU) between frozen and adapted representations at the
target layers on the step's circuit-breaker / retain rows; ``val_cos``: the same on the held-out
circuit-breaker examples (adapters in eval mode); ``cb_norm_orig`` / ``cb_norm_cb``: mean token
norms of the circuit-breaker representations; ``step_seconds``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cbscope.data import DatasetError
from cbscope.errors import NonFiniteLossError, ResumeError
from cbscope.lorra import durability, losses, official, repbend
from cbscope.lorra.checkpoint import (
    BAD,
    CHECKPOINT_DIR,
    EXPLOSION_FACTOR,
    GOOD,
    UNCONFIRMED,
    Checkpoint,
    drop_after,
    loss_limit,
    newest_good,
    restore,
    save_checkpoint,
    set_status,
)
from cbscope.lorra.config import ConfigError, LorraConfig
from cbscope.lorra.data import (
    EncodedData,
    LorraData,
    as_examples,
    as_retain,
    make_plan,
    weights_digest,
)
from cbscope.lorra.distributed import (
    DistContext,
    distributed_context,
    resolve_device,
    shard_entry,
    shard_scale,
)
from cbscope.lorra.frozen import CB, RETAIN, FrozenBatch, FrozenCache, FrozenReps
from cbscope.lorra.outputs import METRICS_FILE, write_metrics

logger = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a run returns (:class:`cbscope.run.Runner`, :func:`train_circuit_breaker`).

    Attributes:
        pair: The trained pair (adapters on by default; ``pair.original()`` for the base).
        config: The run's config.
        metrics: One dict per step (``val_cos`` only on logging steps).
        out_dir: Output folder (``None`` for an in-memory run). It holds the run once the run
            has finished; until then the run lives in its staging folder ``work_dir``.
        steps_done: Steps completed (``config.steps`` unless stopped early).
        resumed_from: Step of the checkpoint resumed from (``None``: fresh run).
        seconds: Wall time of this call.
        info: Data sizes and other facts (also in ``train_info.json``; ``warnings`` lists what
            the run warned about).
        work_dir: The staging folder the run wrote into (``OUT.partial``; ``None`` in memory).
    """

    pair: Any
    config: LorraConfig
    metrics: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    steps_done: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    work_dir: Path | None = None

    @property
    def finished(self) -> bool:
        """True when every step ran (the adapter was saved when there is an ``out_dir``)."""
        return self.steps_done >= self.config.steps

    @property
    def final(self) -> dict[str, Any]:
        """The last logged metrics (with ``val_cos``), or the last step's."""
        logged = [m for m in self.metrics if m.get("val_cos") is not None]
        return (logged or self.metrics or [{}])[-1]


@dataclass(frozen=True)
class StepSetup:
    """What every step of a run shares: the layers it reads and the loss's fixed targets.

    Attributes:
        targets: Paper-convention target layers (the circuit-breaker term, ``cb_cos``,
            ``val_cos``).
        retain_layers: The retain term's layers.
        aux: Fixed targets of the ``rmu`` / ``random_norm`` / ``refusal_direction`` losses
            (:func:`loss_targets`; empty for ``rr``).
    """

    targets: list[int]
    retain_layers: list[int]
    aux: Mapping[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, config: LorraConfig, n_layers: int, aux: Mapping[str, Tensor] | None = None) -> StepSetup:
        """The setup of ``config`` on a model with ``n_layers`` blocks."""
        return cls(config.resolved_target_layers(n_layers), config.resolved_retain_layers(n_layers),
                   dict(aux or {}))

    @property
    def layers(self) -> list[int]:
        """Every layer both forwards read (targets and retain layers, sorted)."""
        return sorted(set(self.targets) | set(self.retain_layers))

    def positions(self, wanted: Sequence[int]) -> list[int]:
        """Where ``wanted`` layers sit in :attr:`layers`."""
        layers = self.layers
        return [layers.index(layer) for layer in wanted]


# ---------------------------------------------------------------------- model
def _lora_matches(pair: Any, config: LorraConfig) -> bool:
    if pair.peft_model is None or not any(p.requires_grad for p in pair.lora_parameters()):
        return False
    have = pair.peft_model.peft_config["default"]
    want = config.lora_config(pair.n_layers)
    return (
        have.r == want.r
        and have.lora_alpha == want.lora_alpha
        and set(have.target_modules or []) == set(want.target_modules or [])
        and list(have.layers_to_transform or []) == list(want.layers_to_transform or [])
    )


def prepare_pair(pair_or_spec: Any, config: LorraConfig, *, device: str | torch.device = "cpu") -> Any:
    """A pair with a fresh trainable LoRA adapter for ``config`` (LoRA ``B`` ~ N(0, std)).

    A :class:`~cbscope.pair.ModelPair` whose adapter is trainable and has the config's LoRA shape
    is used as is (training continues from its weights); any other pair only names the base model,
    which is loaded again (the given pair is left untouched). Under ``accelerate launch`` a
    ``cuda`` device means this process's GPU, and rank 0 resolves the spec first (building the
    organism into the cache if needed) while the others wait.
    """
    from transformers import AutoConfig

    from cbscope.models import resolve_model
    from cbscope.pair import ModelPair, load_pair

    if isinstance(pair_or_spec, ModelPair):
        if _lora_matches(pair_or_spec, config):
            if config.gradient_checkpointing:
                pair_or_spec.set_gradient_checkpointing(True)
            return pair_or_spec
        spec, device = pair_or_spec.resolved, pair_or_spec.device
    else:
        spec = pair_or_spec
    ctx = distributed_context()
    device = resolve_device(device, ctx)
    torch.manual_seed(config.seed)
    with _main_first(ctx):
        resolved = spec if not isinstance(spec, (str, os.PathLike)) else resolve_model(spec)
    n_layers = int(AutoConfig.from_pretrained(str(resolved.path)).num_hidden_layers)
    pair = load_pair(
        resolved,
        lora_config=config.lora_config(n_layers),
        device=device,
        dtype=config.dtype,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    pair.peft_model.eval()  # fresh LoRA dropout modules start in training mode
    if config.lora_b_init_std > 0:
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            for name, param in pair.model.named_parameters():
                if "lora_B" in name:
                    noise = torch.randn(param.shape, generator=generator) * config.lora_b_init_std
                    param.copy_(noise.to(param.dtype))
    return pair


def _main_first(ctx: DistContext | None) -> Any:
    """Rank 0 runs the block before the other processes (no-op in a single process)."""
    return ctx.main_first() if ctx is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------- data
def assemble_data(
    pair: Any,
    config: LorraConfig,
    cb_data: Any,
    retain_data: Any,
    val_data: Any = None,
    *,
    show_progress: bool = True,
) -> LorraData:
    """Load/generate the examples and split off a validation batch when none is given."""
    if isinstance(cb_data, LorraData):
        data = cb_data
    else:
        if cb_data is None or retain_data is None:
            raise DatasetError("give a circuit-breaker set and a retain set (or a preset)")
        cb = as_examples(cb_data, pair=pair, require_response=True, what="circuit-breaker",
                         show_progress=show_progress)
        retain = as_retain(retain_data, pair=pair, show_progress=show_progress)
        val = [] if val_data is None else as_examples(
            val_data, pair=pair, require_response=True, what="validation", show_progress=show_progress
        )
        data = LorraData(cb, retain, val)
    if not data.val and config.val_size > 0 and len(data.cb) > 2 * config.val_size:
        order = list(range(len(data.cb)))
        random.Random(f"lorra-val-{config.seed}").shuffle(order)
        held = set(order[: config.val_size])
        data = LorraData(
            [ex for i, ex in enumerate(data.cb) if i not in held],
            data.retain,
            [data.cb[i] for i in sorted(held)],
            {**data.info, "val": f"{config.val_size} examples held out of the circuit-breaker set"},
        )
    return data


# ---------------------------------------------------------------------- loss targets
def _frozen_reps(pair: Any, chunks: Sequence[tuple[Tensor, Tensor, Tensor]], layers: list[int]):
    with pair.original(), torch.no_grad():
        for ids, attention, mask in chunks:
            yield pair.resid(ids, attention, layers), mask


def loss_targets(pair: Any, config: LorraConfig, encoded: EncodedData, layers: list[int]) -> dict[str, Tensor]:
    """Fixed targets of the ``rmu`` / ``random_norm`` / ``refusal_direction`` losses."""
    if config.loss in ("rr", "repbend"):
        return {}
    generator = torch.Generator().manual_seed(config.seed + 1)
    if config.loss in ("rmu", "random_norm"):
        directions = torch.rand((len(layers), pair.d_model), generator=generator)
        targets = {"directions": directions / directions.norm(dim=-1, keepdim=True)}
        if config.loss == "rmu":
            if config.rmu_scale is not None:
                targets["scale"] = torch.full((len(layers),), float(config.rmu_scale))
            else:
                chunks = encoded.batches(encoded.cb[:64], config.token_mask)
                norms = [
                    torch.stack([losses.masked_mean(r[i : i + 1].norm(dim=-1), m) for i in range(len(layers))])
                    for r, m in _frozen_reps(pair, chunks, layers)
                ]
                targets["scale"] = torch.stack(norms).mean(0)
        return {k: v.to(pair.device) for k, v in targets.items()}
    refusals = encoded.retain.get("refusal") or []
    if not refusals:
        raise ConfigError("loss 'refusal_direction' needs refusal examples in the retain set")
    total = torch.zeros((len(layers), pair.d_model))
    count = 0.0
    for reps, mask in _frozen_reps(pair, encoded.batches(refusals, "response"), layers):
        weights = mask.to(reps.dtype).to(reps.device)
        total += (reps * weights[None, :, :, None]).sum(dim=(1, 2)).float().cpu()
        count += float(weights.sum())
    if count == 0:
        raise ConfigError("the refusal examples have no response tokens")
    return {"directions": (total / count).to(pair.device)}


def cb_term(config: LorraConfig, orig: Tensor, broken: Tensor, mask: Tensor, targets: Mapping[str, Tensor]) -> Tensor:
    """The circuit-breaker loss of the configured variant."""
    if config.loss == "rr":
        return losses.circuit_breaker_loss(orig, broken, mask)
    if config.loss == "rmu":
        return losses.rmu_loss(broken, targets["directions"], targets["scale"], mask)
    return losses.direction_loss(broken, targets["directions"], mask)


# ---------------------------------------------------------------------- resume
def _begin(
    work: Path,
    resume_from: Checkpoint | None,
    pair: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    ctx: DistContext | None = None,
) -> tuple[int, int | None]:
    """Prepare the staging folder ``work``; with ``resume_from``, restore that checkpoint.

    Returns ``(start step, step of a checkpoint whose weights are the current ones and await
    their confirmation)``. Nothing is written before the checkpoint is known to fit the data. In
    a multi-process run every rank reads the same checkpoint; only rank 0 changes files, after
    all have read (the folder must be on a filesystem every process sees).
    """
    main = ctx is None or ctx.is_main
    ckpt_dir, metrics_path = work / CHECKPOINT_DIR, work / METRICS_FILE
    if resume_from is None:
        if ctx is not None:
            ctx.barrier()
        if main:
            work.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            metrics_path.write_text("")
        return 0, None
    meta = resume_from.meta
    if meta.get("data_fingerprint") != state["data_fingerprint"]:
        raise ResumeError(
            f"the checkpoint {resume_from.json_path} was made with other data; resume with the "
            "same data, or start again with --restart"
        )
    tensors = resume_from.load_tensors()
    step = int(meta["step"])
    state["plan"] = meta["plan"]  # the saved data order
    state["reference_loss"] = meta.get("reference_loss")
    state["lr_overrides"] = list(meta.get("lr_overrides", []))
    saved_lr = meta.get("config", {}).get("lr")
    if saved_lr is not None and saved_lr != state["config"]["lr"]:
        state["lr_overrides"].append({"from_step": step, "lr": state["config"]["lr"],
                                      "was": saved_lr})
        logger.warning("resuming step %d with lr %g instead of the checkpoint's %g (an allowed "
                       "override, recorded in train_info.json)", step, state["config"]["lr"],
                       saved_lr)
    saved_world = int(meta.get("world_size", 1))
    current_world = ctx.world_size if ctx is not None else 1
    if saved_world != current_world:
        logger.warning(
            "the checkpoint was written by %d process(es), this run has %d: same data and "
            "schedule, but LoRA-dropout random streams differ from an uninterrupted run",
            saved_world,
            current_world,
        )
    restore(pair, optimizer, tensors, rank=ctx.rank if ctx is not None else None)
    if ctx is not None:
        ctx.barrier()
    if main:
        write_metrics(metrics_path, [], truncate_after=step)
        for name in drop_after(ckpt_dir, step):
            logger.warning("removed checkpoint %s, which the resumed run passed over", name)
    logger.info("resumed from step %d (%s)", step, ckpt_dir)
    return step, step if resume_from.status == UNCONFIRMED else None


def _advice(ckpt_dir: Path | None, config: LorraConfig, flags: str) -> str:
    """What to do after the loss guard stopped a run (flags that the command line accepts)."""
    lower = f"{config.lr / 10:g}"
    if ckpt_dir is None:
        return f"Lower the learning rate (lr is {config.lr:g}) or check the data."
    good = newest_good(ckpt_dir)
    if good is not None:
        return (f"The last good checkpoint is step {good.step}: resume from it with a lower "
                f"learning rate, e.g. add{flags} --resume --lr {lower} (lr is {config.lr:g}), "
                "or check the data.")
    return (f"No good checkpoint is left: start again with a lower learning rate, e.g. add"
            f"{flags} --restart --lr {lower} (lr is {config.lr:g}), or check the data.")


# ---------------------------------------------------------------------- the loop
def train_loop(
    pair: Any,
    config: LorraConfig,
    data: LorraData,
    *,
    work_dir: str | os.PathLike[str] | None = None,
    resume_from: Checkpoint | None = None,
    on_step: StepCallback | None = None,
    stop_after: int | None = None,
    show_progress: bool = True,
    advice_flags: str = "",
    frozen_cache: FrozenCache | None = None,
) -> TrainResult:
    """Train ``pair``'s LoRA adapter on ``data`` (the loop itself; :class:`cbscope.run.Runner`
    prepares the pair, the data and the folders, and publishes the outputs).

    Args:
        pair: A pair with a trainable adapter of ``config``'s shape (:func:`prepare_pair`).
        config: The run's validated config.
        data: The examples (:func:`assemble_data`: validation split done).
        work_dir: The run's staging folder (checkpoints, ``metrics.jsonl``); ``None``: in memory.
        resume_from: A checkpoint in ``work_dir/checkpoints`` to continue from.
        on_step: Called after every step with that step's metrics dict.
        stop_after: Stop (with a checkpoint) after this many steps *in this call*.
        show_progress: tqdm bar (rank 0 only in a multi-process run).
        advice_flags: Command-line flags the loss guard's advice repeats (e.g. ``" --overwrite"``).
        frozen_cache: The cache of frozen representations to use (and fill) when
            ``config.cache_frozen`` is on; ``None``: a new one (``config.cache_store``). Runs that
            share one reuse each other's entries (``cbscope generalise``).

    Raises:
        NonFiniteLossError: The loss was NaN, infinite or exploded; the step did not run. A
            checkpoint whose weights gave that loss is marked bad; the message names the last
            good one and the flags to resume from it.
        ResumeError: The checkpoint was made with other data.
    """
    started = time.perf_counter()
    work = Path(work_dir) if work_dir is not None else None
    ctx = distributed_context()
    main = ctx is None or ctx.is_main
    if ctx is not None and config.recipe == "official":
        raise ConfigError("recipe 'official' runs in one process (its retain denominator counts "
                          "the whole batch's padding); start it without accelerate launch")
    if ctx is not None and (config.loss == "repbend" or config.durability != "none"):
        raise ConfigError("loss 'repbend' and the durability terms run in one process (they "
                          "pair rows of the whole batch); start it without accelerate launch")
    targets = config.resolved_target_layers(pair.n_layers)
    retain_layers = config.resolved_retain_layers(pair.n_layers)
    encoded = EncodedData(data, pair.tokenizer, config)
    plan = make_plan(len(encoded.cb), encoded.sizes(), config)
    setup = StepSetup(targets, retain_layers, loss_targets(pair, config, encoded, targets))
    val_chunks = encoded.batches(encoded.val, config.token_mask)
    if ctx is not None:  # each process holds every world_size-th validation chunk
        val_chunks = val_chunks[ctx.rank :: ctx.world_size]
    val_orig = [reps for reps, _ in _frozen_reps(pair, val_chunks, targets)]

    info = {
        "model": pair.resolved.spec,
        "base_weights_sha256": weights_digest(pair.resolved.path) if main else None,
        "target_layers": targets,
        "retain_layers": retain_layers,
        "lora_blocks": config.resolved_lora_layers(pair.n_layers),
        "sizes": data.sizes(),
        "lora_parameters": sum(p.numel() for p in pair.lora_parameters()),
        # float summation order, hence the exact adapter, depends on the thread count
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        **data.info,
    }
    state: dict[str, Any] = {"config": config.to_dict(), "data_fingerprint": encoded.fingerprint(),
                             "plan": plan, "reference_loss": None, "lr_overrides": []}
    if ctx is not None:
        info["processes"] = state["world_size"] = ctx.world_size
    optimizer = torch.optim.AdamW(pair.lora_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult(pair, config, out_dir=work, info=info, work_dir=work)
    ckpt_dir = work / CHECKPOINT_DIR if work is not None else None
    metrics_path = work / METRICS_FILE if work is not None and main else None
    start, pending = _begin(work, resume_from, pair, optimizer, state, ctx) if work is not None else (0, None)
    result.resumed_from = start or None
    plan = state["plan"]
    if state["lr_overrides"]:
        info["lr_overrides"] = state["lr_overrides"]
    if ctx is not None:
        ctx.agree(start, "the step to start from (do all processes see the same --out?)")
        ctx.broadcast_params(pair.lora_parameters())  # as DDP does; they are equal already
    total = config.steps
    end = total if stop_after is None else min(total, start + stop_after)
    frozen_reps = _frozen_setup(pair, config, encoded, plan, setup, frozen_cache, ctx, info,
                                start, end, show_progress and main)
    if start == 0:
        # one dropout stream per process; rank 0 (and a single process) use the seed itself
        torch.manual_seed(config.seed + (ctx.rank if ctx is not None else 0))

    limit = loss_limit(state["reference_loss"])
    bar = tqdm(
        range(start, end),
        desc="LoRRA",
        disable=not (show_progress and main),
        initial=start,
        total=total,
    )
    for step in bar:
        tick = time.perf_counter()
        try:
            if ctx is None:
                batch = encoded.batch(plan[step])
                frozen = _frozen_batch(frozen_reps, encoded, plan[step], batch)
                row = _train_step(pair, config, batch, step, setup, optimizer, limit, frozen)
            else:
                try:
                    row = _sharded_optimiser_step(
                        pair, config, encoded, plan[step], step, setup, optimizer, ctx, limit,
                        frozen_reps,
                    )
                finally:
                    pair.set_training(False)  # after backward, as in _train_step
        except NonFiniteLossError as err:
            bar.close()
            if pending == step and ckpt_dir is not None and main:
                set_status(ckpt_dir, step, BAD, why=f"the next step's loss on its weights: {err}")
            if ctx is not None:
                ctx.barrier()
            raise NonFiniteLossError(f"{err} {_advice(ckpt_dir, config, advice_flags)}") from err
        if state["reference_loss"] is None:
            state["reference_loss"] = row["loss"]
            limit = loss_limit(row["loss"])
        if pending == step:
            if main:
                set_status(ckpt_dir, step, GOOD, confirmed_loss=row["loss"])
            pending = None
        done = step + 1
        if done % config.log_every == 0 or done == total:
            row["val_cos"] = _val_cos(pair, val_chunks, val_orig, targets, ctx)
        row["step_seconds"] = time.perf_counter() - tick
        result.metrics.append(row)
        result.steps_done = done
        bar.set_postfix(cb=f"{row['cb_cos']:.3f}", retain=f"{row['retain_cos']:.4f}")
        if metrics_path is not None and "val_cos" in row:
            write_metrics(metrics_path, [row])
        if ckpt_dir is not None and done < total and (
            (config.checkpoint_every and done % config.checkpoint_every == 0) or done == end
        ):
            extra = _rank_rng_states(ctx) if ctx is not None else None
            if main:
                path = save_checkpoint(ckpt_dir, done, pair, optimizer, state, extra,
                                       loss=row["loss"])
                if json.loads(path.read_text())["status"] == UNCONFIRMED:
                    pending = done
            else:
                pending = done
        if on_step is not None:
            on_step(dict(row))
    bar.close()
    pair.bridge.eval()
    pair.peft_model.eval()
    if frozen_reps is not None:
        info["frozen_cache"].update(computed=frozen_reps.computed)
    result.steps_done = max(result.steps_done, start)
    result.seconds = time.perf_counter() - started
    info["summary"] = {"steps": result.steps_done, "seconds": round(result.seconds, 2),
                       "resumed_from": result.resumed_from,
                       "final": {k: v for k, v in result.final.items() if isinstance(v, (int, float))}}
    return result


def _plan_rows(encoded: EncodedData, plan: Sequence[Mapping[str, Any]],
               ctx: DistContext | None) -> list[tuple[Any, str]]:
    """``(example, role)`` of every row the steps of ``plan`` give this process."""
    rows: list[tuple[Any, str]] = []
    for entry in plan:
        part = shard_entry(entry, ctx.rank, ctx.world_size) if ctx is not None else entry
        cb, retain = encoded.rows(part)
        rows += [(ex, CB) for ex in cb] + [(ex, RETAIN) for ex in retain]
    return rows


def _frozen_setup(
    pair: Any,
    config: LorraConfig,
    encoded: EncodedData,
    plan: Sequence[Mapping[str, Any]],
    setup: StepSetup,
    cache: FrozenCache | None,
    ctx: DistContext | None,
    info: dict[str, Any],
    start: int,
    end: int,
    show_progress: bool,
) -> FrozenReps | None:
    """The run's cache of frozen representations, or ``None`` (off, or over the budget).

    The estimate covers every row of the whole plan on this process (each process caches its
    own shard), so an interrupted and a resumed run decide alike; in a multi-process run all
    processes follow the largest estimate. ``upfront`` computes the entries of steps
    ``start .. end`` now (a progress bar), ``lazy`` at the first step that needs each.
    """
    if not config.cache_frozen:
        info["frozen_cache"] = {"used": False, "why": "cache_frozen is off"}
        return None
    if config.recipe == "official" or config.loss == "repbend":
        # these steps run their own frozen pass (fixed-length left padding; RepBend's pairs)
        why = ("the official recipe" if config.recipe == "official" else "loss repbend")
        info["frozen_cache"] = {"used": False, "why": f"{why} computes its own frozen pass"}
        return None
    tick = time.perf_counter()
    cache = cache if cache is not None else FrozenCache(config.cache_store)
    reps = FrozenReps(cache, pair, setup.targets, setup.retain_layers,
                      chunk_tokens=2 * config.batch_size * max(config.max_length,
                                                                config.cb_max_length or 0))
    entries = reps.unique(_plan_rows(encoded, plan, ctx))
    need = reps.nbytes(entries.values())
    held = 0 if cache.store_kind == "disk" else cache.nbytes - reps.nbytes(
        item for key, item in entries.items() if key in cache)  # other runs' entries
    total = need + held
    if ctx is not None:
        total = max(int(t) for t in ctx.all_gather(torch.tensor([total], dtype=torch.long)))
    budget = int(config.cache_budget_gb * 2**30)
    facts = {"store": cache.store_kind, "fill": config.cache_fill, "entries": len(entries),
             "bytes": need, "budget_gb": config.cache_budget_gb, "model_key": reps.model_key}
    if total > budget:
        why = (f"frozen-representation cache off: it would need {total / 2**30:.2f} GiB "
               f"({len(entries)} examples at {len(setup.targets)} target / "
               f"{len(setup.retain_layers)} retain layers, {reps.dtype}"
               f"{', with what the shared cache holds' if held else ''}), over the budget of "
               f"{config.cache_budget_gb:g} GiB; raise --cache-budget-gb to use it")
        logger.warning(why)
        info["frozen_cache"] = {**facts, "used": False, "why": why}
        return None
    reused = sum(1 for key in entries if key in cache)
    if config.cache_fill == "upfront":
        reps.fill(_plan_rows(encoded, plan[start:end], ctx), show_progress=show_progress)
    info["frozen_cache"] = {**facts, "used": True, "reused": reused,
                            "setup_seconds": round(time.perf_counter() - tick, 3)}
    logger.info("frozen-representation cache: %d examples, %.1f MiB (%s, %s fill; %d found)",
                len(entries), need / 2**20, cache.store_kind, config.cache_fill, reused)
    return reps


def _frozen_batch(reps: FrozenReps | None, encoded: EncodedData, entry: Mapping[str, Any],
                  batch: Any) -> FrozenBatch | None:
    """The cached frozen representations of one plan entry's batch (``None`` without a cache)."""
    if reps is None:
        return None
    cb, retain = encoded.rows(entry)
    return reps.batch(cb, retain, batch.input_ids.shape[1])


def _rank_rng_states(ctx: DistContext) -> dict[str, Tensor]:
    """Every process's RNG state (a collective: all ranks call it), keyed ``rng.torch.{rank}``."""
    states = {f"rng.torch.{r}": t for r, t in enumerate(ctx.all_gather(torch.get_rng_state()))}
    if torch.cuda.is_available():
        gathered = ctx.all_gather(torch.cuda.get_rng_state())
        states.update({f"rng.cuda.{r}": t for r, t in enumerate(gathered)})
    return states


def _guard(step: int, loss: float, cb_loss: float, retain_loss: float, limit: float) -> None:
    """Stop before the optimiser step when the loss is not finite or has exploded."""
    if not math.isfinite(loss):
        why = f"the loss is {loss}"
    elif loss > limit:
        why = (f"the loss is {loss:.4g}, above {limit:.4g} (the first step's loss, at least 1, "
               f"times {EXPLOSION_FACTOR:g}): the run diverged")
    else:
        return
    raise NonFiniteLossError(
        f"step {step + 1}: {why} (cb_loss {cb_loss:.4g}, retain_loss {retain_loss:.4g}); stopped "
        "before the optimiser step."
    )


def _train_step(
    pair: Any,
    config: LorraConfig,
    batch: Any,
    step: int,
    setup: StepSetup,
    optimizer: torch.optim.Optimizer,
    limit: float = math.inf,
    frozen: FrozenBatch | None = None,
) -> dict[str, Any]:
    """One optimiser step; returns its metrics (``frozen``: the step's cached frozen
    representations, see :func:`_step_terms`).

    Raises:
        NonFiniteLossError: The loss is not finite or above ``limit`` (the step does not run).
    """
    try:
        t = _step_terms(pair, config, batch, step, setup, frozen)
        cb_orig, cb_broken = t["cb_orig"], t["cb_broken"]
        cb_mask, retain_mask, c_s, c_r = t["cb_mask"], t["retain_mask"], t["c_s"], t["c_r"]
        cb_loss, retain_loss = t["cb_loss"], t["retain_loss"]
        loss = c_s * cb_loss + c_r * retain_loss
        extra = dict(t.get("extra", {}))
        if config.durability == "repnoise":
            extra["durability"] = durability.noise_loss(cb_orig, cb_broken, cb_mask)
            loss = loss + config.durability_weight * extra["durability"]
        _guard(step, loss.item(), cb_loss.item(), retain_loss.item(), limit)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.durability == "tar":
            extra["durability"] = torch.tensor(
                durability.tar_gradient(pair, config, batch, setup.targets, cb_orig.detach()))
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(pair.lora_parameters(), config.max_grad_norm)
        optimizer.step()
        return {
            "step": step + 1,
            "loss": loss.item(),
            "cb_loss": cb_loss.item(),
            "retain_loss": retain_loss.item(),
            "c_s": c_s,
            "c_r": c_r,
            "cb_cos": losses.mean_cosine(cb_orig, cb_broken, cb_mask),
            "retain_cos": losses.mean_cosine(*t["retain_at_targets"](), retain_mask),
            "cb_norm_orig": losses.mean_norm(cb_orig, cb_mask),
            "cb_norm_cb": losses.mean_norm(cb_broken, cb_mask),
            **{name: float(value.detach()) for name, value in extra.items()},
        }
    finally:
        pair.set_training(False)  # only after backward: checkpointed blocks recompute in training mode


class _RowBlocks(torch.autograd.Function):
    """``stack([reps[i][:n] for i in first]), stack([reps[i][n:] for i in rest])``.

    The circuit-breaker rows at the target layers and the retain rows at the retain layers, from
    one tensor per layer. Slicing a stacked ``layer batch pos d_model`` tensor instead costs, in
    the backward pass, a zero-filled full-size gradient per slice, their sum, and the stack's
    split (about 5% of a SmolLM2 step); here each layer's gradient is written once. The values
    and gradients are the same numbers.
    """

    @staticmethod
    def forward(ctx: Any, n: int, first: list[int], rest: list[int], *reps: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        ctx.n, ctx.first, ctx.rest, ctx.count = n, first, rest, len(reps)
        ctx.layout = {"size": reps[0].shape, "dtype": reps[0].dtype, "device": reps[0].device}
        return torch.stack([reps[i][:n] for i in first]), torch.stack([reps[i][n:] for i in rest])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_first: Tensor | None, grad_rest: Tensor | None) -> tuple[Any, ...]:
        n = ctx.n
        first = {layer: k for k, layer in enumerate(ctx.first)}
        rest = {layer: k for k, layer in enumerate(ctx.rest)}
        grads: list[Tensor | None] = []
        for i in range(ctx.count):
            wanted = ctx.needs_input_grad[3 + i]
            top = grad_first[first[i]] if grad_first is not None and i in first else None
            bottom = grad_rest[rest[i]] if grad_rest is not None and i in rest else None
            if not wanted or (top is None and bottom is None):
                grads.append(None)
                continue
            grad = torch.empty(**ctx.layout)
            for part, value in ((grad[:n], top), (grad[n:], bottom)):
                if value is None:
                    part.zero_()
                else:
                    part.copy_(value)
            grads.append(grad)
        return (None, None, None, *grads)


def _step_terms(
    pair: Any,
    config: LorraConfig,
    batch: Any,
    step: int,
    setup: StepSetup,
    frozen: FrozenBatch | None = None,
) -> dict[str, Any]:
    """The frozen and adapted forwards of a step and its two loss terms (not yet combined).

    With ``frozen`` (the step's cached frozen representations, :mod:`cbscope.lorra.frozen`) the
    frozen forward is skipped. Leaves the bridge in training mode: with gradient checkpointing
    the backward pass replays the adapted forward of each block, which must run with the same
    (LoRA dropout) mode; the caller switches back to ``eval()`` after ``backward``.
    """
    if config.recipe == "official":
        return official.official_step_terms(pair, config, batch, step, setup.targets)
    if config.loss == "repbend":
        return repbend.repbend_step_terms(pair, config, batch, setup)
    device = pair.device
    ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
    cb_mask, retain_mask = batch.cb_mask.to(device), batch.retain_mask.to(device)
    n = batch.n_cb
    layers = setup.layers
    t_pos, r_pos = setup.positions(setup.targets), setup.positions(setup.retain_layers)
    pair.set_training(False)
    if frozen is None:
        with pair.original(), torch.no_grad():
            orig = pair.resid_layers(ids, attention, layers)
        cb_orig = torch.stack([orig[i][:n] for i in t_pos])
        retain_orig = torch.stack([orig[i][n:] for i in r_pos])
    else:
        cb_orig, retain_orig = frozen.cb, frozen.retain
    pair.set_training(True)
    broken = pair.resid_layers(ids, attention, layers)
    cb_broken, retain_broken = _RowBlocks.apply(n, t_pos, r_pos, *broken)
    c_s, c_r = losses.schedule(step + 1, config.steps, config.lorra_alpha)
    c_r *= config.retain_weight
    cb_loss = cb_term(config, cb_orig, cb_broken, cb_mask, setup.aux)
    retain_loss = losses.retain_loss(retain_orig, retain_broken, retain_mask, relative=config.retain_relative)

    def retain_at_targets() -> tuple[Tensor, Tensor]:
        """Frozen and adapted retain rows at the target layers (for the ``retain_cos`` metric)."""
        with torch.no_grad():
            in_retain = [setup.retain_layers.index(layer) for layer in setup.targets]
            return (retain_orig[in_retain], torch.stack([broken[i][n:] for i in t_pos]))

    return {
        "cb_orig": cb_orig,
        "cb_broken": cb_broken,
        "retain_at_targets": retain_at_targets,
        "cb_mask": cb_mask,
        "retain_mask": retain_mask,
        "c_s": c_s,
        "c_r": c_r,
        "cb_loss": cb_loss,
        "retain_loss": retain_loss,
    }


def _sharded_optimiser_step(
    pair: Any,
    config: LorraConfig,
    encoded: EncodedData,
    entry: Mapping[str, Any],
    step: int,
    setup: StepSetup,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    limit: float = math.inf,
    frozen_reps: FrozenReps | None = None,
) -> dict[str, Any]:
    """One optimiser step of a multi-process run on this process's shard of the global batch.

    Each loss term is this shard's masked mean times ``local tokens / global tokens``
    (:func:`~cbscope.lorra.distributed.shard_scale`), so the gradients summed over processes are
    the gradient of the whole batch's loss. Metrics are reduced over processes before the NaN
    check, so every process takes the same decision. With ``frozen_reps`` the frozen
    representations of this shard's rows come from this process's cache.
    """
    whole = encoded.batch(entry)  # only for the global token counts (cheap: no forward)
    shard = shard_entry(entry, ctx.rank, ctx.world_size)
    batch = encoded.batch(shard)
    frozen = _frozen_batch(frozen_reps, encoded, shard, batch)
    t = _step_terms(pair, config, batch, step, setup, frozen)
    cb_orig, cb_broken = t["cb_orig"], t["cb_broken"]
    cb_mask, retain_mask, c_s, c_r = t["cb_mask"], t["retain_mask"], t["c_s"], t["c_r"]
    n_cb, n_retain = batch.cb_mask.sum(), batch.retain_mask.sum()
    cb_part = t["cb_loss"] * shard_scale(n_cb, whole.cb_mask.sum()).to(t["cb_loss"].device)
    retain_part = t["retain_loss"] * shard_scale(n_retain, whole.retain_mask.sum()).to(
        t["retain_loss"].device
    )
    local_loss = c_s * cb_part + c_r * retain_part
    stats = torch.tensor(
        [
            float(cb_part.detach()),
            float(retain_part.detach()),
            losses.mean_cosine(cb_orig, cb_broken, cb_mask) * float(n_cb),
            losses.mean_cosine(*t["retain_at_targets"](), retain_mask) * float(n_retain),
            losses.mean_norm(cb_orig, cb_mask) * float(n_cb),
            losses.mean_norm(cb_broken, cb_mask) * float(n_cb),
            float(n_cb),
            float(n_retain),
        ],
        dtype=torch.float64,
    )
    total = ctx.all_reduce_sum(stats).tolist()
    cb_loss, retain_loss = total[0], total[1]
    loss = c_s * cb_loss + c_r * retain_loss
    cb_tokens, retain_tokens = max(total[6], 1.0), max(total[7], 1.0)
    _guard(step, loss, cb_loss, retain_loss, limit)
    optimizer.zero_grad(set_to_none=True)
    local_loss.backward()
    ctx.all_reduce_grads(pair.lora_parameters())
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(pair.lora_parameters(), config.max_grad_norm)
    optimizer.step()
    return {
        "step": step + 1,
        "loss": loss,
        "cb_loss": cb_loss,
        "retain_loss": retain_loss,
        "c_s": c_s,
        "c_r": c_r,
        "cb_cos": total[2] / cb_tokens,
        "retain_cos": total[3] / retain_tokens,
        "cb_norm_orig": total[4] / cb_tokens,
        "cb_norm_cb": total[5] / cb_tokens,
    }


def mean_cosine_on(
    pair: Any,
    examples: Sequence[Any],
    layers: Sequence[int],
    *,
    token_mask: str = "full",
    max_length: int = 1024,
    batch_size: int = 16,
) -> float:
    """Mean per-token cosine between frozen and adapted representations on ``examples``.

    Args:
        pair: A pair with an adapter.
        examples: :class:`ChatExample` objects or prompt/response dicts.
        layers: Paper-convention layers.
        token_mask: Tokens averaged over: ``full``, ``response`` or ``request``.
        max_length: Token limit per example.
        batch_size: Examples per forward.
    """
    from cbscope.data import pad_id_of, pad_right
    from cbscope.lorra.data import as_examples, encode
    from cbscope.lorra.data import token_mask as make_mask

    rows = [encode(pair.tokenizer, ex, max_length) for ex in as_examples(examples, require_response=False, what="evaluation")]
    layers = list(layers)
    chunks = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, attention = pad_right([r.ids for r in chunk], pad_id_of(pair.tokenizer))
        chunks.append((ids, attention, make_mask(chunk, ids.shape[1], token_mask)))
    pair.bridge.eval()
    orig = [reps for reps, _ in _frozen_reps(pair, chunks, layers)]
    value = _val_cos(pair, chunks, orig, layers)
    return float("nan") if value is None else value


def _val_cos(
    pair: Any,
    chunks: Sequence[tuple[Tensor, Tensor, Tensor]],
    orig: Sequence[Tensor],
    layers: list[int],
    ctx: DistContext | None = None,
) -> float | None:
    """Mean cosine between frozen and adapted representations on the validation batches
    (with ``ctx``: this process's chunks, token-weighted and summed over processes)."""
    if ctx is not None:
        total, weight = _val_cos_sums(pair, chunks, orig, layers)
        sums = ctx.all_reduce_sum(torch.tensor([total, weight], dtype=torch.float64))
        total, weight = sums.tolist()
        return total / weight if weight else None
    if not chunks:
        return None
    total, weight = _val_cos_sums(pair, chunks, orig, layers)
    return total / weight if weight else None


def _val_cos_sums(
    pair: Any,
    chunks: Sequence[tuple[Tensor, Tensor, Tensor]],
    orig: Sequence[Tensor],
    layers: list[int],
) -> tuple[float, float]:
    """Token-weighted sum of the validation cosines and the token count."""
    total, weight = 0.0, 0.0
    with torch.no_grad():
        for (ids, attention, mask), reps_orig in zip(chunks, orig, strict=True):
            mask = mask.to(pair.device)
            reps = pair.resid(ids, attention, layers)
            count = float(mask.sum())
            total += losses.mean_cosine(reps_orig, reps, mask) * count
            weight += count
    return total, weight
