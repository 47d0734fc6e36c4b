"""Resumable checkpoints of a LoRRA run: written atomically, verified, judged and pruned.

A checkpoint is two files in a run's ``checkpoints/`` folder: ``step-N.safetensors`` (the LoRA
weights, the AdamW state and the RNG states) and ``step-N.json`` (the step, the config, the data
order, the sha256 of the tensors file ...). Each is written to a temporary sibling and renamed;
the JSON comes second and is the commit marker. No pickle is involved.

Every checkpoint has a ``status`` in its JSON:

* ``unconfirmed``: just written. Its tensors are finite and the loss of the step that made it
  was finite.
* ``good``: the next step ran on its weights, and that loss was finite and had not exploded
  (:func:`loss_limit`). A checkpoint's weights are judged by the loss they give. A step at lr
  1e30 leaves finite weights of about 1e30, and every later loss on them is NaN, so the step's
  own loss says nothing about the weights it leaves.
* ``bad``: its tensors are not finite, or the next step's loss on its weights was not finite
  or had exploded.

:func:`find_resumable` returns the newest checkpoint that is not bad and whose tensors match
their hash. It skips a corrupt one and falls back to the one before it. :func:`prune` keeps the
newest checkpoint and the two newest good ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from cbscope.errors import ResumeError
from cbscope.io import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = 1
KEEP_GOOD = 2
#: A loss above this many times the first step's loss (or 1, if that is smaller) has exploded.
EXPLOSION_FACTOR = 1e4
#: Config fields a resumed run may change. They do not change the numbers (gradient
#: checkpointing and the frozen cache up to float error).
RESUME_IGNORES = ("log_every", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing",
                  "cache_frozen", "cache_budget_gb", "cache_store", "cache_fill")
UNCONFIRMED, GOOD, BAD = "unconfirmed", "good", "bad"
_NAME = re.compile(r"^step-(\d+)\.json$")


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def loss_limit(reference: float | None) -> float:
    """The largest loss that has not exploded, given the run's first-step loss."""
    if reference is None or not math.isfinite(reference):
        return math.inf
    return EXPLOSION_FACTOR * max(abs(reference), 1.0)


def _named_lora(pair: Any) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in pair.model.named_parameters() if "lora_" in name}


def _name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class Checkpoint:
    """One checkpoint on disk, as its JSON describes it.

    Attributes:
        step: Optimiser steps done when it was written.
        json_path: Its ``step-N.json``.
        meta: The JSON's content (``{}`` when unreadable).
        problem: Why it cannot be resumed (``None``: it is usable, as far as its JSON says).
    """

    step: int
    json_path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def tensor_path(self) -> Path:
        """Its ``step-N.safetensors``."""
        return self.json_path.with_name(self.meta.get("tensors", f"{_name(self.step)}.safetensors"))

    @property
    def status(self) -> str:
        """``unconfirmed``, ``good`` or ``bad``. Checkpoints without a status are unconfirmed."""
        return str(self.meta.get("status", UNCONFIRMED))

    def verify(self) -> str | None:
        """Why the checkpoint cannot be resumed, or ``None``. Its tensors are hashed."""
        if self.problem is not None:
            return self.problem
        if self.status == BAD:
            return f"marked bad ({self.meta.get('why', 'no reason recorded')})"
        if not self.tensor_path.is_file():
            return f"{self.tensor_path.name} is missing"
        if sha256_file(self.tensor_path) != self.meta.get("tensors_sha256"):
            return f"{self.tensor_path.name} does not match its hash (corrupt or truncated)"
        return None

    def load_tensors(self) -> dict[str, Tensor]:
        """The tensors (call :meth:`verify` first)."""
        try:
            return load_file(str(self.tensor_path))
        except Exception as err:  # safetensors raises its own error type on a damaged file
            raise ResumeError(f"checkpoint {self.tensor_path} cannot be read: {err}") from err


def list_checkpoints(folder: Path) -> list[Checkpoint]:
    """Every ``step-N.json`` in ``folder``, oldest first (unreadable ones carry a problem)."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if not match:
            continue
        checkpoint = Checkpoint(int(match.group(1)), path)
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or int(meta.get("step", -1)) != checkpoint.step:
                raise ValueError("not a checkpoint description")
            checkpoint.meta = meta
        except (OSError, ValueError, TypeError) as err:
            checkpoint.problem = f"{path.name} is unreadable ({err})"
        found.append(checkpoint)
    return sorted(found, key=lambda c: c.step)


@dataclass
class Resumable:
    """What :func:`find_resumable` found.

    Attributes:
        checkpoint: The newest usable checkpoint (``None``: none).
        skipped: ``(file name, why)`` of each newer checkpoint passed over.
    """

    checkpoint: Checkpoint | None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def describe_skipped(self) -> str:
        """``"step-000004.json: corrupt; ..."`` (empty when nothing was skipped)."""
        return "; ".join(f"{name}: {why}" for name, why in self.skipped)


def find_resumable(folder: Path) -> Resumable:
    """The newest checkpoint in ``folder`` that is not bad and whose tensors match their hash."""
    skipped = []
    for checkpoint in reversed(list_checkpoints(folder)):
        problem = checkpoint.verify()
        if problem is None:
            return Resumable(checkpoint, skipped)
        skipped.append((checkpoint.json_path.name, problem))
    return Resumable(None, skipped)


def latest_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """``(meta, tensors)`` of the newest usable checkpoint, or ``None``."""
    found = find_resumable(folder)
    for name, why in found.skipped:
        logger.warning("checkpoint %s skipped: %s", folder / name, why)
    if found.checkpoint is None:
        return None
    return found.checkpoint.meta, found.checkpoint.load_tensors()


def newest_good(folder: Path) -> Checkpoint | None:
    """The newest checkpoint that is not bad (by its JSON; tensors not hashed)."""
    usable = [c for c in list_checkpoints(folder) if c.problem is None and c.status != BAD]
    return usable[-1] if usable else None


def save_checkpoint(
    folder: Path,
    step: int,
    pair: Any,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra_tensors: Mapping[str, Tensor] | None = None,
    *,
    loss: float | None = None,
) -> Path:
    """Write ``step-N.safetensors``, then ``step-N.json``, then prune old checkpoints.

    Args:
        folder: The run's ``checkpoints/`` folder.
        step: Steps done.
        pair: The pair being trained (its LoRA weights are saved).
        optimizer: Its AdamW (the state is saved).
        state: Run facts for the JSON (config, data fingerprint, plan ...).
        extra_tensors: More tensors, e.g. every rank's RNG state.
        loss: The loss of the step that made the checkpoint.

    Returns:
        The JSON path.
    """
    folder.mkdir(parents=True, exist_ok=True)
    named = _named_lora(pair)
    tensors = {f"lora.{n}": p.detach().cpu().contiguous() for n, p in named.items()}
    opt_state = optimizer.state_dict()["state"]
    for index in range(len(named)):
        for key, value in opt_state.get(index, {}).items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    finite = all(bool(torch.isfinite(t).all()) for k, t in tensors.items()
                 if t.is_floating_point())
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for key, value in (extra_tensors or {}).items():
        tensors[key] = value.detach().cpu().contiguous()
    name = _name(step)
    tensor_path = folder / f"{name}.safetensors"
    atomic_write(tensor_path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    meta = {**state, "format": CHECKPOINT_FORMAT, "step": step, "tensors": tensor_path.name,
            "tensors_sha256": sha256_file(tensor_path), "loss": loss, "status": UNCONFIRMED}
    if not finite:
        meta.update(status=BAD, why="its LoRA weights or AdamW state are not finite")
    elif loss is not None and not math.isfinite(loss):
        meta.update(status=BAD, why=f"the loss of the step that made it is {loss}")
    json_path = folder / f"{name}.json"
    atomic_write_text(json_path, json.dumps(meta), fsync=True)
    prune(folder, current=step)
    return json_path


def set_status(folder: Path, step: int, status: str, **facts: Any) -> None:
    """Record ``status`` (and ``facts``) in checkpoint ``step``'s JSON (atomically), then prune."""
    path = folder / f"{_name(step)}.json"
    if not path.is_file():
        return
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta.update(status=status, **facts)
    atomic_write_text(path, json.dumps(meta), fsync=True)
    if status == BAD:
        logger.warning("checkpoint %s marked bad: %s", path, facts.get("why", ""))
    prune(folder, current=step)


def prune(folder: Path, keep_good: int = KEEP_GOOD, *, current: int | None = None) -> None:
    """Delete every checkpoint except the newest (or ``current``) and the ``keep_good`` newest
    good ones.

    Files of another name (temporary files of an interrupted write) are left alone.
    """
    found = list_checkpoints(folder)
    if not found:
        return
    good = sorted((c.step for c in found if c.status == GOOD and c.problem is None), reverse=True)
    keep = {found[-1].step if current is None else current, *good[:keep_good]}
    for checkpoint in found:
        if checkpoint.step not in keep:
            checkpoint.tensor_path.unlink(missing_ok=True)
            checkpoint.json_path.unlink(missing_ok=True)


def drop_after(folder: Path, step: int) -> list[str]:
    """Delete the checkpoints newer than ``step`` (those a resumed run passed over: corrupt,
    bad or unreadable); returns their names."""
    dropped = []
    for checkpoint in list_checkpoints(folder):
        if checkpoint.step > step:
            checkpoint.tensor_path.unlink(missing_ok=True)
            checkpoint.json_path.unlink(missing_ok=True)
            dropped.append(checkpoint.json_path.name)
    return dropped


def restore(
    pair: Any, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], rank: int | None = None
) -> None:
    """Copy a checkpoint's LoRA weights, AdamW state and RNG state back.

    The optimiser keeps its own learning rate (a resumed run may lower it).
    """
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


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """``(refused fields, allowed overrides)`` between a checkpoint's config and this run's.

    A lower learning rate is allowed (the advice after a loss explodes); the fields of
    :data:`RESUME_IGNORES` are ignored; any other difference is refused.
    """
    refused, allowed = [], {}
    for key in sorted(current):
        if key in RESUME_IGNORES or saved.get(key) == current[key]:
            continue
        if key == "lr" and isinstance(saved.get(key), (int, float)) and current[key] < saved[key]:
            allowed[key] = {"checkpoint": saved[key], "now": current[key]}
            continue
        refused.append(key)
    return refused, allowed


def check_compatible(checkpoint: Checkpoint, config: Mapping[str, Any]) -> dict[str, Any]:
    """The allowed overrides of resuming ``checkpoint`` with ``config``.

    Raises:
        ResumeError: The checkpoint was made with another config (other than a lower lr).
    """
    refused, allowed = config_changes(checkpoint.meta.get("config", {}), config)
    if refused:
        saved = checkpoint.meta.get("config", {})
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in refused)
        hint = " (a resumed run may only lower lr)" if "lr" in refused else ""
        raise ResumeError(
            f"the checkpoint {checkpoint.json_path} was made with another config ({detail}){hint}; "
            "resume with the same settings, or start again with --restart"
        )
    return allowed


def describe(checkpoints: Sequence[Checkpoint]) -> str:
    """``"step 4 (good), step 6 (unconfirmed)"``."""
    return ", ".join(f"step {c.step} ({c.problem or c.status})" for c in checkpoints) or "none"
