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
atomically (``checkpoints/step-N.safetensors`` with the LoRA weights, AdamW state and torch RNG
state, then ``step-N.json`` with the step, config, data order and a hash of the tensors file: the
JSON is the commit marker). ``resume=True`` continues from the last complete checkpoint and gives
an adapter bit-identical to an uninterrupted run on the CPU. A non-finite loss stops the run
before the optimiser step (:class:`NonFiniteLossError`), leaving the last checkpoint intact.

Metrics of a step (``on_step`` gets every step, ``metrics.jsonl`` every ``log_every``):
``loss``, ``cb_loss``, ``retain_loss``, ``c_s``, ``c_r`` (times ``retain_weight``); ``cb_cos`` /
``retain_cos``: masked mean cosine (no ReLU) between frozen and adapted representations at the
target layers on the step's circuit-breaker / retain rows; ``val_cos``: the same on the held-out
circuit-breaker examples (adapters in eval mode); ``cb_norm_orig`` / ``cb_norm_cb``: mean token
norms of the circuit-breaker representations; ``step_seconds``.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from cbscope.data import DatasetError
from cbscope.errors import NonFiniteLossError, ResumeError
from cbscope.io import atomic_write
from cbscope.lorra import losses
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

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
INFO_FILE = "train_info.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1
StepCallback = Callable[[dict[str, Any]], None]




@dataclass
class TrainResult:
    """What :func:`train_circuit_breaker` returns.

    Attributes:
        pair: The trained pair (adapters on by default; ``pair.original()`` for the base).
        config: The run's config.
        metrics: One dict per step (``val_cos`` only on logging steps).
        out_dir: Output folder (``None`` for an in-memory run).
        steps_done: Steps completed (``config.steps`` unless stopped early).
        resumed_from: Step of the checkpoint resumed from (``None``: fresh run).
        seconds: Wall time of this call.
        info: Data sizes and other facts (also in ``train_info.json``).
    """

    pair: Any
    config: LorraConfig
    metrics: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    steps_done: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

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
    if config.loss == "rr":
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


# ---------------------------------------------------------------------- checkpoints
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _named_lora(pair: Any) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in pair.model.named_parameters() if "lora_" in name}


def save_checkpoint(
    folder: Path,
    step: int,
    pair: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra_tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write ``step-N.safetensors`` then ``step-N.json`` (each via a temporary file and rename),
    then delete older checkpoints. ``extra_tensors`` (e.g. every rank's RNG state) are stored
    beside the LoRA weights and AdamW state."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"lora.{n}": p.detach().cpu().contiguous() for n, p in _named_lora(pair).items()}
    params = list(_named_lora(pair).values())
    opt_state = optimizer.state_dict()["state"]
    for index in range(len(params)):
        for key, value in opt_state.get(index, {}).items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for key, value in (extra_tensors or {}).items():
        tensors[key] = value.detach().cpu().contiguous()
    name = f"step-{step:06d}"
    tensor_path = folder / f"{name}.safetensors"
    atomic_write(tensor_path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    meta = {**state, "format": CHECKPOINT_FORMAT, "step": step, "tensors": tensor_path.name,
            "tensors_sha256": _sha256(tensor_path)}
    atomic_write(folder / f"{name}.json", lambda p: p.write_text(json.dumps(meta)))
    for old in folder.glob("step-*"):
        if not old.name.startswith(name):
            old.unlink(missing_ok=True)
    return folder / f"{name}.json"


def latest_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """The newest complete checkpoint (JSON present, tensors hash verified), or ``None``."""
    for meta_path in sorted(folder.glob("step-*.json"), reverse=True):
        try:
            meta = json.loads(meta_path.read_text())
            tensor_path = folder / meta["tensors"]
            if _sha256(tensor_path) != meta["tensors_sha256"]:
                logger.warning("checkpoint %s is corrupt (hash mismatch); skipped", meta_path)
                continue
            return meta, load_file(str(tensor_path))
        except (OSError, ValueError, KeyError) as err:
            logger.warning("checkpoint %s unreadable (%s); skipped", meta_path, err)
    return None


def _restore(
    pair: Any, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], rank: int | None = None
) -> None:
    named = _named_lora(pair)
    missing = [n for n in named if f"lora.{n}" not in tensors]
    if missing:
        raise ResumeError(f"checkpoint lacks LoRA tensors {missing[:3]}")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(tensors[f"lora.{name}"].to(param.device, param.dtype))
    state = optimizer.state_dict()
    restored: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, field_name = key.split(".", 2)
            restored.setdefault(int(index), {})[field_name] = value
    state["state"] = restored
    optimizer.load_state_dict(state)
    suffix = "" if rank is None or f"rng.torch.{rank}" not in tensors else f".{rank}"
    torch.set_rng_state(tensors[f"rng.torch{suffix}"])
    if f"rng.cuda{suffix}" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"rng.cuda{suffix}"])


RESUME_IGNORES = ("log_every", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing")


def _start_or_resume(
    out: Path,
    resume: bool,
    pair: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    ctx: DistContext | None = None,
) -> int:
    """Prepare ``out``; with ``resume``, restore the newest checkpoint and return its step.

    In a multi-process run every rank reads the same checkpoint; only rank 0 changes files, after
    all have read (``out`` must be on a filesystem every process sees).
    """
    main = ctx is None or ctx.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt_dir, metrics_path = out / CHECKPOINT_DIR, out / METRICS_FILE
    if ctx is not None:
        ctx.barrier()
    found = latest_checkpoint(ckpt_dir) if resume and ckpt_dir.is_dir() else None
    if ctx is not None:
        ctx.barrier()
    if found is None:
        if resume:
            logger.info("no checkpoint in %s: starting from step 0", ckpt_dir)
        if main:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            metrics_path.write_text("")
        return 0
    meta, tensors = found
    saved, current = meta["config"], state["config"]
    diff = sorted(k for k in current if k not in RESUME_IGNORES and saved.get(k) != current[k])
    if diff:
        raise ResumeError(f"the checkpoint in {ckpt_dir} was made with another config (fields {diff})")
    if meta["data_fingerprint"] != state["data_fingerprint"]:
        raise ResumeError(f"the checkpoint in {ckpt_dir} was made with other data")
    state["plan"] = meta["plan"]  # the saved data order
    saved_world = int(meta.get("world_size", 1))
    current_world = ctx.world_size if ctx is not None else 1
    if saved_world != current_world:
        logger.warning(
            "the checkpoint was written by %d process(es), this run has %d: same data and "
            "schedule, but LoRA-dropout random streams differ from an uninterrupted run",
            saved_world,
            current_world,
        )
    _restore(pair, optimizer, tensors, rank=ctx.rank if ctx is not None else None)
    if main:
        _write_metrics(metrics_path, [], truncate_after=int(meta["step"]))
    logger.info("resumed from step %d (%s)", meta["step"], ckpt_dir)
    return int(meta["step"])


# ---------------------------------------------------------------------- outputs
def _write_metrics(path: Path, rows: Sequence[dict[str, Any]], *, truncate_after: int | None = None) -> None:
    if truncate_after is not None:
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= truncate_after]
        path.write_text("".join(line + "\n" for line in kept))
        return
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def save_outputs(result: TrainResult, *, merge: bool = False) -> Path:
    """Save the peft adapter, ``lorra_config.json`` and ``train_info.json`` into ``out_dir``
    (and a merged model into ``out_dir/merged`` with ``merge``)."""
    out = result.out_dir
    assert out is not None
    staging = out / ".adapter-staging"
    result.pair.save_adapter(staging, extra={"lorra": result.info.get("summary", {})})
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    shutil.rmtree(staging, ignore_errors=True)
    result.config.save(out)
    (out / INFO_FILE).write_text(json.dumps(result.info, indent=2, default=str) + "\n")
    if merge:
        merge_adapter(result.pair.resolved.path, out, out / "merged", dtype=result.pair.dtype)
    return out


def merge_adapter(base: str | os.PathLike[str], adapter: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> Path:
    """Load base + adapter with plain transformers/peft, merge, and save an HF model folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(tmp)
    for extra in ("world.json",):
        if (Path(base) / extra).is_file():
            shutil.copy(Path(base) / extra, tmp / extra)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------- the loop
def train_circuit_breaker(
    pair_or_spec: Any = "organism",
    config: LorraConfig | None = None,
    cb_data: Any = None,
    retain_data: Any = None,
    *,
    val_data: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    merge: bool = False,
    on_step: StepCallback | None = None,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
    show_progress: bool = True,
) -> TrainResult:
    """Train a circuit breaker (a LoRA adapter) with LoRRA.

    Args:
        pair_or_spec: A model spec (``"organism"``, ``"smollm2-135m"``, a folder) or a
            :class:`~cbscope.pair.ModelPair` (see :func:`prepare_pair`).
        config: The run's :class:`LorraConfig` (default: the paper's).
        cb_data: Circuit-breaker examples (list of :class:`ChatExample`/dicts, a JSONL file, a
            CSV of prompts the base model answers) or a whole :class:`LorraData`.
        retain_data: Retain examples: ``{source: examples}``, or a list/file split by each
            example's ``source`` field (ignored when ``cb_data`` is a :class:`LorraData`).
        val_data: Held-out circuit-breaker examples for ``val_cos`` (default: ``val_size``
            examples split off the circuit-breaker set).
        out_dir: Output folder: the peft adapter, ``lorra_config.json``, ``metrics.jsonl``,
            ``train_info.json`` and ``checkpoints/``. ``None``: train in memory only.
        resume: Continue from the last checkpoint in ``out_dir`` (fresh start if none).
        merge: Also write a merged HF model to ``out_dir/merged``.
        on_step: Called after every step with that step's metrics dict.
        stop_after: Stop (with a checkpoint) after this many steps *in this call*.
        device: Torch device when a spec is given (``cuda`` means this process's GPU under
            ``accelerate launch``).
        show_progress: tqdm bar (rank 0 only in a multi-process run).

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
        NonFiniteLossError: The loss became NaN/inf (the last checkpoint is left intact).
        ResumeError: The checkpoint was made with another config or other data.
        DatasetError: Malformed data (file, line and field named).
    """
    started = time.perf_counter()
    config = (config or LorraConfig()).validate()
    out = Path(out_dir) if out_dir is not None else None
    ctx = distributed_context()
    main = ctx is None or ctx.is_main
    if ctx is not None and config.batch_size < ctx.world_size:
        raise ConfigError(
            f"batch_size {config.batch_size} is smaller than the number of processes "
            f"{ctx.world_size}: every process needs at least one row of each global batch"
        )
    pair = prepare_pair(pair_or_spec, config, device=device)
    with _main_first(ctx):  # rank 0 writes the generation cache, the others read it
        data = assemble_data(
            pair, config, cb_data, retain_data, val_data, show_progress=show_progress and main
        )
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
    state = {"config": config.to_dict(), "data_fingerprint": encoded.fingerprint(), "plan": plan}
    if ctx is not None:
        info["processes"] = state["world_size"] = ctx.world_size
    optimizer = torch.optim.AdamW(pair.lora_parameters(), lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult(pair, config, out_dir=out, info=info)
    ckpt_dir = out / CHECKPOINT_DIR if out is not None else None
    metrics_path = out / METRICS_FILE if out is not None and main else None
    start = _start_or_resume(out, resume, pair, optimizer, state, ctx) if out is not None else 0
    result.resumed_from = start or None
    plan = state["plan"]
    if ctx is not None:
        ctx.agree(start, "the step to start from (do all processes see the same --out?)")
        ctx.broadcast_params(pair.lora_parameters())  # as DDP does; they are equal already
    if start == 0:
        # one dropout stream per process; rank 0 (and a single process) use the seed itself
        torch.manual_seed(config.seed + (ctx.rank if ctx is not None else 0))

    total = config.steps
    end = total if stop_after is None else min(total, start + stop_after)
    bar = tqdm(
        range(start, end),
        desc="LoRRA",
        disable=not (show_progress and main),
        initial=start,
        total=total,
    )
    for step in bar:
        tick = time.perf_counter()
        if ctx is None:
            row = _train_step(pair, config, encoded.batch(plan[step]), step, setup, optimizer)
        else:
            try:
                row = _sharded_optimiser_step(
                    pair, config, encoded, plan[step], step, setup, optimizer, ctx
                )
            finally:
                pair.set_training(False)  # after backward, as in _train_step
        done = step + 1
        if done % config.log_every == 0 or done == total:
            row["val_cos"] = _val_cos(pair, val_chunks, val_orig, targets, ctx)
        row["step_seconds"] = time.perf_counter() - tick
        result.metrics.append(row)
        result.steps_done = done
        bar.set_postfix(cb=f"{row['cb_cos']:.3f}", retain=f"{row['retain_cos']:.4f}")
        if metrics_path is not None and "val_cos" in row:
            _write_metrics(metrics_path, [row])
        if ckpt_dir is not None and done < total and (
            (config.checkpoint_every and done % config.checkpoint_every == 0) or done == end
        ):
            extra = _rank_rng_states(ctx) if ctx is not None else None
            if main:
                save_checkpoint(ckpt_dir, done, pair, optimizer, state, extra)
        if on_step is not None:
            on_step(dict(row))
    bar.close()
    pair.bridge.eval()
    pair.peft_model.eval()
    result.steps_done = max(result.steps_done, start)
    result.seconds = time.perf_counter() - started
    info["summary"] = {"steps": result.steps_done, "seconds": round(result.seconds, 2),
                       "resumed_from": result.resumed_from,
                       "final": {k: v for k, v in result.final.items() if isinstance(v, (int, float))}}
    if out is not None and result.finished and main:
        save_outputs(result, merge=merge)
        if not config.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    if ctx is not None:
        ctx.barrier()  # the adapter is on disk before any process returns
    return result


def _rank_rng_states(ctx: DistContext) -> dict[str, Tensor]:
    """Every process's RNG state (a collective: all ranks call it), keyed ``rng.torch.{rank}``."""
    states = {f"rng.torch.{r}": t for r, t in enumerate(ctx.all_gather(torch.get_rng_state()))}
    if torch.cuda.is_available():
        gathered = ctx.all_gather(torch.cuda.get_rng_state())
        states.update({f"rng.cuda.{r}": t for r, t in enumerate(gathered)})
    return states


def _train_step(
    pair: Any,
    config: LorraConfig,
    batch: Any,
    step: int,
    setup: StepSetup,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """One optimiser step; returns its metrics."""
    try:
        t = _step_terms(pair, config, batch, step, setup)
        cb_orig, cb_broken = t["cb_orig"], t["cb_broken"]
        cb_mask, retain_mask, c_s, c_r = t["cb_mask"], t["retain_mask"], t["c_s"], t["c_r"]
        cb_loss, retain_loss = t["cb_loss"], t["retain_loss"]
        loss = c_s * cb_loss + c_r * retain_loss
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"step {step + 1}: the loss is {loss.item()} (cb_loss {cb_loss.item()}, retain_loss "
                f"{retain_loss.item()}); stopped before the optimiser step. The last checkpoint is "
                "intact: lower lr or check the data, then resume"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
) -> dict[str, Any]:
    """The frozen and adapted forwards of a step and its two loss terms (not yet combined).

    Leaves the bridge in training mode: with gradient checkpointing the backward pass replays the
    adapted forward of each block, which must run with the same (LoRA dropout) mode; the caller
    switches back to ``eval()`` after ``backward``.
    """
    device = pair.device
    ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
    cb_mask, retain_mask = batch.cb_mask.to(device), batch.retain_mask.to(device)
    n = batch.n_cb
    layers = setup.layers
    t_pos, r_pos = setup.positions(setup.targets), setup.positions(setup.retain_layers)
    pair.set_training(False)
    with pair.original(), torch.no_grad():
        orig = pair.resid_layers(ids, attention, layers)
    pair.set_training(True)
    broken = pair.resid_layers(ids, attention, layers)
    cb_orig = torch.stack([orig[i][:n] for i in t_pos])
    retain_orig = torch.stack([orig[i][n:] for i in r_pos])
    cb_broken, retain_broken = _RowBlocks.apply(n, t_pos, r_pos, *broken)
    c_s, c_r = losses.schedule(step + 1, config.steps, config.lorra_alpha)
    c_r *= config.retain_weight
    cb_loss = cb_term(config, cb_orig, cb_broken, cb_mask, setup.aux)
    retain_loss = losses.retain_loss(retain_orig, retain_broken, retain_mask, relative=config.retain_relative)

    def retain_at_targets() -> tuple[Tensor, Tensor]:
        """Frozen and adapted retain rows at the target layers (for the ``retain_cos`` metric)."""
        with torch.no_grad():
            return (torch.stack([orig[i][n:] for i in t_pos]),
                    torch.stack([broken[i][n:] for i in t_pos]))

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
) -> dict[str, Any]:
    """One optimiser step of a multi-process run on this process's shard of the global batch.

    Each loss term is this shard's masked mean times ``local tokens / global tokens``
    (:func:`~cbscope.lorra.distributed.shard_scale`), so the gradients summed over processes are
    the gradient of the whole batch's loss. Metrics are reduced over processes before the NaN
    check, so every process takes the same decision.
    """
    whole = encoded.batch(entry)  # only for the global token counts (cheap: no forward)
    batch = encoded.batch(shard_entry(entry, ctx.rank, ctx.world_size))
    t = _step_terms(pair, config, batch, step, setup)
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
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"step {step + 1}: the loss is {loss} (cb_loss {cb_loss}, retain_loss {retain_loss}); "
            "stopped before the optimiser step. The last checkpoint is intact: lower lr or check "
            "the data, then resume"
        )
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
