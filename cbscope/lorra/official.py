r"""The official-compatible recipe (``LorraConfig.recipe = "official"``).

cbscope's default recipe differs from the official circuit-breakers code (``compute_loss`` in
``lorra_circuit_breaker.py`` and ``cb_train_dataset.py``) in several places that change the
numbers. With ``recipe="official"`` a run follows the official code in each of them:

* **Retain term over every hidden state of the truncated model.** The official code truncates
  the model after block ``max(target)`` and takes ``output_hidden_states``: the embedding output,
  paper layers ``1 .. max(target)`` and, last, the *final norm applied to* the output of block
  ``max(target)`` (paper layer ``max(target) + 1``). Both sides are multiplied by the attention
  mask, and the loss is the ``nanmean`` of the per-token L2 distances over all of them::

      L_retain = sum_{s,b,p} |h^c_{s,b,p} - h^o_{s,b,p}|_2 m_{b,p} / (S * B * P)

  ``S = max(target) + 2`` states, ``B`` retain rows, ``P`` the padded width: the denominator
  counts padded positions and the embedding state (whose difference is exactly zero: LoRA never
  touches the embeddings, so cbscope counts it without computing it).
* **Circuit-breaker term** as cbscope's (:func:`~cbscope.lorra.losses.circuit_breaker_loss`)
  over the attention mask: the official code divides by the real-token count there.
* **Schedule divisor 300**, whatever the run's length: ``c_r = alpha t / 300``,
  ``c_s = alpha (1 - t / 300)``, ``t = 1, 2, ...`` (the official trainer's
  ``get_training_progress``). At ``T = 150`` this is cbscope's ``t / 2T``. At ``t >= 300`` the
  official code computes no circuit-breaker term (``c_s <= 0`` skips it) and then fails on the
  unassigned variable, so an official-mode run refuses ``steps >= 300``
  (:meth:`LorraConfig.validate`).
* **LoRA on blocks ``0 .. max(target)``** (``transform_layers = -1``), block ``max(target)``
  included: it changes the final-norm state of the retain term.
* **Padding to fixed lengths.** A circuit-breaker row is its request, truncated on the right and
  left padded to ``cb_max_length // 2`` tokens, followed by its response, truncated and right
  padded to the rest of ``cb_max_length`` (official: 512 + 512); a retain row is truncated on the
  right and left padded to ``max_length`` (official: 1024). Positions are ``0 .. P-1`` whatever
  the padding (as transformers numbers them when no ``position_ids`` are given).
* **Four forwards** (frozen retain, frozen circuit-breaker, adapted retain, adapted
  circuit-breaker), since the two sets have their own widths.
* **Request dropped per example, once.** The official data drops the request of each example
  with probability 1/2 when the dataset is built (Llama-3); here each example's flag is drawn
  once from the seed (``response_only_fraction`` for circuit-breaker examples,
  ``retain_response_only_fraction`` for chat retain examples) and kept for the whole run.

What this mode does not reproduce: the official one-shot string template (``{user_tag}
{instruction}{assistant_tag}{response}`` tokenised as one string; cbscope renders the request
with the tokenizer's chat template and tokenises the response on its own, which can differ from
the official string by a merge at the boundary), DeepSpeed, and the HF Trainer's RNG streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cbscope.lorra import losses

SCHEDULE_DIVISOR = 300
"""The official trainer's ``get_training_progress`` divides the step by 300, whatever ``T``."""


def official_schedule(step: int, alpha: float) -> tuple[float, float]:
    """The official ``(c_s, c_r)`` at step ``t`` (counted from 1): ``alpha (1 - t/300)``,
    ``alpha t / 300``.

    Raises:
        ValueError: For ``t >= 300``, where the official code has no circuit-breaker term.
    """
    if step >= SCHEDULE_DIVISOR:
        raise ValueError(
            f"step {step}: the official schedule has c_s <= 0 from step {SCHEDULE_DIVISOR} on, "
            "where the official code computes no circuit-breaker term"
        )
    progress = step / SCHEDULE_DIVISOR
    return alpha * (1.0 - progress), alpha * progress


def official_retain_loss(
    orig: Sequence[Float[Tensor, "batch pos d_model"]],
    broken: Sequence[Float[Tensor, "batch pos d_model"]],
    attention: Int[Tensor, "batch pos"],
    *,
    zero_states: int = 1,
) -> Tensor:
    """The official retain loss: the mean of ``|h^c - h^o|_2 * m`` over every state, row and
    position, padding included.

    Args:
        orig: Frozen states, one ``batch pos d_model`` tensor each.
        broken: Adapted states, the same states.
        attention: The retain rows' attention mask (1 real, 0 padding).
        zero_states: States whose difference is exactly zero and are not passed (the embedding
            output), counted in the denominator.
    """
    if len(orig) != len(broken) or not orig:
        raise ValueError("give the same, non-empty list of states on both sides")
    keep = attention.to(orig[0].device).bool()
    total = torch.zeros((), dtype=torch.float, device=orig[0].device)
    for o, c in zip(orig, broken, strict=True):
        distance = torch.linalg.vector_norm(c - o, dim=-1, dtype=torch.float)
        total = total + torch.where(keep, distance, torch.zeros_like(distance)).sum()
    count = (len(orig) + zero_states) * attention.shape[0] * attention.shape[1]
    return total / count


def final_norm(pair: Any) -> torch.nn.Module:
    """The model's final norm (the module transformers applies before its last hidden state)."""
    model = pair.model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise ValueError(f"{type(model).__name__}: no final norm found (decoder.norm)")
    return norm


# ---------------------------------------------------------------------- layout
def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Rows truncated on the right to ``width`` and left padded to it: ``(ids, attention)``."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        kept = list(row)[:width]
        if kept:
            ids[index, width - len(kept):] = torch.tensor(kept, dtype=torch.long)
            attention[index, width - len(kept):] = 1
    return ids, attention


def right_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Rows truncated on the right to ``width`` and right padded to it: ``(ids, attention)``."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        kept = list(row)[:width]
        if kept:
            ids[index, : len(kept)] = torch.tensor(kept, dtype=torch.long)
            attention[index, : len(kept)] = 1
    return ids, attention


@dataclass
class OfficialBatch:
    """One official step's inputs: circuit-breaker and retain rows in their own tensors.

    Attributes:
        cb_ids: ``[left-padded request | right-padded response]`` rows.
        cb_attention: Their attention mask (the circuit-breaker term's token mask).
        retain_ids: Left-padded retain rows.
        retain_attention: Their attention mask (the retain term's mask).
    """

    cb_ids: Int[Tensor, "cb pos"]
    cb_attention: Int[Tensor, "cb pos"]
    retain_ids: Int[Tensor, "retain pos"]
    retain_attention: Int[Tensor, "retain pos"]

    @property
    def n_cb(self) -> int:
        """Circuit-breaker rows."""
        return int(self.cb_ids.shape[0])

    @property
    def cb_mask(self) -> Tensor:
        """The circuit-breaker term's mask (the attention mask)."""
        return self.cb_attention

    @property
    def retain_mask(self) -> Tensor:
        """The retain term's mask (the attention mask)."""
        return self.retain_attention


def official_collate(
    cb: Sequence[Any], retain: Sequence[Any], pad_id: int, *, cb_length: int, retain_length: int
) -> OfficialBatch:
    """The official layout of encoded examples (:class:`~cbscope.lorra.data.EncodedExample`).

    Args:
        cb: Circuit-breaker examples (``ids`` and ``response_start``).
        retain: Retain examples.
        pad_id: The padding token.
        cb_length: Circuit-breaker width: ``cb_length // 2`` request tokens, the rest response.
        retain_length: Retain width.
    """
    request_width = cb_length // 2
    request_ids, request_att = left_pad([ex.ids[: ex.response_start] for ex in cb], request_width,
                                        pad_id)
    response_ids, response_att = right_pad([ex.ids[ex.response_start:] for ex in cb],
                                           cb_length - request_width, pad_id)
    retain_ids, retain_att = left_pad([ex.ids for ex in retain], retain_length, pad_id)
    return OfficialBatch(
        torch.cat([request_ids, response_ids], dim=1),
        torch.cat([request_att, response_att], dim=1),
        retain_ids,
        retain_att,
    )


# ---------------------------------------------------------------------- one step
def official_step_terms(pair: Any, config: Any, batch: OfficialBatch, step: int,
                        targets: Sequence[int]) -> dict[str, Any]:
    """The four forwards of an official step and its two loss terms (not yet combined).

    Returns the keys of :func:`cbscope.lorra.loop._step_terms`. Leaves the bridge in training
    mode (the caller switches back after ``backward``).
    """
    device = pair.device
    targets = sorted(targets)
    top = max(targets)
    states = list(range(1, top + 2))  # paper layers 1 .. top + 1; top + 1 gets the final norm
    norm = final_norm(pair)
    cb_ids, cb_att = batch.cb_ids.to(device), batch.cb_attention.to(device)
    r_ids, r_att = batch.retain_ids.to(device), batch.retain_attention.to(device)

    def retain_states() -> list[Tensor]:
        reps = pair.resid_layers(r_ids, r_att, states)
        return [*reps[:-1], norm(reps[-1])]

    pair.set_training(False)
    with pair.original(), torch.no_grad():
        retain_orig = retain_states()
        cb_orig = torch.stack(pair.resid_layers(cb_ids, cb_att, targets))
    pair.set_training(True)
    retain_broken = retain_states()
    cb_broken = torch.stack(pair.resid_layers(cb_ids, cb_att, targets))
    c_s, c_r = official_schedule(step + 1, config.lorra_alpha)
    c_r *= config.retain_weight
    cb_loss = losses.circuit_breaker_loss(cb_orig, cb_broken, cb_att)
    retain_loss = official_retain_loss(retain_orig, retain_broken, r_att)

    def retain_at_targets() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return (torch.stack([retain_orig[t - 1] for t in targets]),
                    torch.stack([retain_broken[t - 1] for t in targets]))

    return {
        "cb_orig": cb_orig,
        "cb_broken": cb_broken,
        "retain_at_targets": retain_at_targets,
        "cb_mask": cb_att,
        "retain_mask": r_att,
        "c_s": c_s,
        "c_r": c_r,
        "cb_loss": cb_loss,
        "retain_loss": retain_loss,
    }
