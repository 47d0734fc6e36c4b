"""Multi-process (DDP-style) training through ``accelerate launch``.

``accelerate launch [--cpu] --num_processes N -m cbscope train ...`` starts N copies of the
trainer with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set. :func:`distributed_context` sees them,
lets accelerate's :class:`~accelerate.PartialState` open the process group (gloo on CPU, NCCL on
GPUs) and pick this process's device; a plain ``python`` run gets ``None`` and the trainer takes
its single-process path, unchanged.

The model is *not* wrapped in ``DistributedDataParallel``: the trainer's forwards run through a
TransformerBridge over a weight-sharing copy of the model, twice per step (adapters off, then
on), which DDP's one-wrapped-forward bookkeeping does not describe. Instead every rank holds the
full model, computes the loss on its shard of the global batch, and the LoRA gradients are summed
with one explicit ``all_reduce`` after ``backward`` (:meth:`DistContext.all_reduce_grads`). The
LoRA parameters are broadcast from rank 0 at the start, so every rank applies the same AdamW
update to the same weights and they stay equal without further communication.

Each rank's loss is normalised by the **global** token counts (see :func:`shard_scale`), so the
sum of the ranks' gradients is the single-process gradient of the whole batch, not an average of
per-shard means (which would weight a token by ``1 / tokens on its rank``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    """This process's place in a multi-process run.

    Attributes:
        rank: Global rank (0 logs, writes checkpoints and the adapter).
        world_size: Number of processes.
        local_rank: Rank on this machine (the GPU index).
        device: This process's device (``cuda:{local_rank}`` on GPUs, ``cpu`` with ``--cpu``).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process."""
        torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a cache), the others after it."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def comm_device(self, fallback: torch.device) -> torch.device:
        """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.device.type == "cuda" else fallback

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        """Sum ``values`` over processes (returns a new tensor on ``values``' device)."""
        buffer = values.detach().to(self.comm_device(values.device)).clone()
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
        return buffer.to(values.device)

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over processes, in place (one flat float32 buffer).

        Parameters without a gradient are skipped; which parameters get one depends only on the
        model structure, so it is the same on every rank.
        """
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        flat = torch.cat([p.grad.detach().reshape(-1).float() for p in with_grad])
        flat = flat.to(self.comm_device(flat.device))
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for param in with_grad:
            n = param.grad.numel()
            chunk = flat[offset : offset + n].view_as(param.grad)
            param.grad.copy_(chunk.to(param.grad.device, param.grad.dtype))
            offset += n

    def broadcast_params(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Copy rank 0's values of ``params`` to every rank."""
        if not params:
            return
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        flat = flat.to(self.comm_device(flat.device))
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for param in params:
                n = param.numel()
                param.copy_(flat[offset : offset + n].view_as(param).to(param.device, param.dtype))
                offset += n

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape and dtype everywhere), on the CPU, rank order."""
        local = tensor.detach().to(self.comm_device(torch.device("cpu")))
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, local)
        return [t.cpu() for t in out]

    def agree(self, value: int, what: str) -> None:
        """Raise :class:`RuntimeError` unless every rank has the same integer ``value``."""
        values = self.all_gather(torch.tensor([value], dtype=torch.long))
        if len({int(v) for v in values}) != 1:
            raise RuntimeError(f"processes disagree on {what}: {[int(v) for v in values]}")


def distributed_context() -> DistContext | None:
    """The :class:`DistContext` when launched with ``WORLD_SIZE > 1`` (``accelerate launch``,
    ``torchrun``), else ``None``. The process group is opened by accelerate on the first call."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # CPU processes (gloo) without a GPU, or with ACCELERATE_USE_CPU=1 on a GPU machine;
    # accelerate only picks gloo when told ``cpu``
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    cpu = use_cpu or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if state.num_processes <= 1:
        return None
    return DistContext(
        rank=int(state.process_index),
        world_size=int(state.num_processes),
        local_rank=int(state.local_process_index),
        device=torch.device(state.device),
    )


def resolve_device(device: str | torch.device, ctx: DistContext | None) -> torch.device:
    """The device of this process: ``cuda`` (no index) means ``cuda:{local_rank}`` in a
    multi-process run; anything else is kept."""
    dev = torch.device(device)
    if ctx is not None and dev.type == "cuda" and dev.index is None:
        return ctx.device if ctx.device.type == "cuda" else torch.device("cuda", ctx.local_rank)
    return dev


def shard_entry(entry: Mapping[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Rank ``rank``'s contiguous part of one plan entry (its circuit-breaker rows, their
    request-dropped flags, and its retain picks); sizes differ by at most one row."""

    def part(rows: Sequence[Any]) -> list[Any]:
        base, extra = divmod(len(rows), world_size)
        start = rank * base + min(rank, extra)
        return list(rows[start : start + base + (1 if rank < extra else 0)])

    return {key: part(value) for key, value in entry.items()}


def shard_scale(local_tokens: Tensor, global_tokens: Tensor) -> Tensor:
    """Factor turning a rank's masked mean into its share of the global masked mean.

    The trainer's losses are ``sum(values * mask) / (layers * mask.sum())``. Over the whole batch
    that is ``sum_r S_r / (layers * N)`` with ``S_r`` the masked sum on rank ``r`` and ``N`` the
    global token count, while rank ``r`` computes ``S_r / (layers * n_r)``; multiplied by
    ``n_r / N`` the ranks' terms (and their gradients) *add up* to the single-process value.
    """
    return local_tokens.float() / global_tokens.float().clamp_min(1.0)
