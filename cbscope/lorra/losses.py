r"""LoRRA losses (Representation Rerouting and variants).

The circuit-breaker term and the cosine are computed exactly as the official code computes them.
cbscope's retain term and schedule are *not* the official code's (below; ``docs/recipe.md`` lists
every difference); ``LorraConfig.recipe = "official"`` uses the official ones
(:mod:`cbscope.lorra.official`).

Notation: ``h^o_{l,b,p}`` is the frozen (adapters off) representation and ``h^c_{l,b,p}`` the
circuit-broken (adapters on) one, at paper layer ``l``, batch row ``b``, position ``p``, read at
``blocks.{l-1}.hook_resid_post``; ``m_{b,p}`` is a 0/1 token mask; ``L`` the set of layers used.

Circuit-breaker loss (RR, official ``lorra_circuit_breaker.py``)::

    cos_{l,b,p} = <h^o, h^c> / (|h^o| |h^c|)                         (over d_model)
    L_cb        = sum_{l,b,p} ReLU(cos_{l,b,p}) m_{b,p} / (|L| * sum_{b,p} m_{b,p})

i.e. ``(relu(cos) * mask).sum() / mask.sum()`` with the mask repeated over the target layers.

Retain loss::

    L_retain = sum_{l,b,p} |h^c_{l,b,p} - h^o_{l,b,p}|_2 m_{b,p} / (|L| * sum_{b,p} m_{b,p})

over paper layers ``1 .. max(target)`` (``retain_layers="all"``) or the target layers only. With
``LorraConfig.retain_relative`` (not in the official code) each distance is divided by
``|h^o_{l,b,p}|``, which makes the term scale-free: a model whose residual stream is large, or
has attention-sink tokens with huge norms (SmolLM2's first token: ~25000 against ~200), no
longer lets those tokens dominate.

This is not the official retain term. The official code takes the ``nanmean`` over every hidden
state of the model truncated after block ``max(target)``: the embedding output (difference
zero), layers ``1 .. max(target)`` and the *final-norm* output of block ``max(target)``, whose
difference is not zero (LoRA adapts that block too); and its denominator counts every padded
position of rows left padded to 1024 tokens. So it is not a constant multiple of cbscope's
term: on a random 6-block Llama with targets 2 and 4 (``benchmarks/official_recipe.py``) the
official retain loss was 0.6989 against cbscope's 0.1271 on the same weights and rows, and the
whole-step gradients had cosine 0.9967. cbscope averages over real
tokens at layers whose representations the breaker is meant to keep, so the term's weight does
not depend on how much padding a batch has; ``recipe="official"`` reproduces the official one.

Schedule (paper Algorithm 1)::

    c_s(t) = alpha * (1 - t' / 2T)        c_r(t) = alpha * t' / 2T       t' = min(max(t, 0), T)

The official code divides by a hard-coded 300 instead of ``2T`` (the same at its ``T = 150``):
with another ``T`` its schedule is not this one, and from step 300 on it computes no
circuit-breaker term (``recipe="official"`` uses it and refuses ``steps >= 300``). cbscope
scales the schedule to the run's own length so that every run ends at ``c_s = c_r``.

Variants of the circuit-breaker term (``LorraConfig.loss``), each a masked mean over tokens and
layers like ``L_cb``:

* ``rr``: ``L_cb`` above (the default).
* ``rmu``: ``|h^c - c u_l|_2``, with ``u_l`` a fixed random unit vector per layer and ``c`` a
  scale (RMU, Li et al. 2024, used the mean squared error; this is its L2 form).
* ``random_norm``: ``|h^c / |h^c| - u_l / |u_l||_2``, ``u_l`` a fixed random vector: the
  normalised representation is pushed onto a random direction.
* ``refusal_direction``: the same formula with ``u_l`` the frozen model's mean representation of
  the retain set's refusals at layer ``l`` (a semantically meaningful target, the paper's future
  work); the broken representation is rerouted toward "refusing".

* ``repbend``: RepBend (:mod:`cbscope.lorra.repbend`): an L2 push of the circuit-breaker
  representations away from the frozen ones (:func:`retain_loss`'s distance, subtracted),
  :func:`cohesion_loss`, :func:`kl_loss` on the retain rows' logits and :func:`pull_loss` toward
  the frozen states of the same request answered with a refusal, each with its own weight.

The direction losses equal ``sqrt(2 - 2 cos(h^c, u_l))``: zero when aligned, 2 when opposite.

RepBend's terms::

    L_cohesion = mean_l mean_{i != j} (1 - cos(x_{l,i}, x_{l,j}))      (x: one state per row)
    L_kl       = sum_{b,p} T^2 KL(softmax(z^o_{b,p}/T) || softmax(z^c_{b,p}/T)) m_{b,p} / sum m
    L_pull     = sum_{l,b,p} |h^c_{l,b,p} - g_{l,b,p}|_2 m_{b,p} / (|L| sum m)   (g: frozen target)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

LOSSES = ("rr", "rmu", "random_norm", "refusal_direction", "repbend")
KL_TEMPERATURE = 2.0

Reps = Float[Tensor, "layer batch pos d_model"]
Mask = Float[Tensor, "batch pos"]


def schedule(step: float, total_steps: int, alpha: float) -> tuple[float, float]:
    """The coefficients ``(c_s, c_r)`` of the circuit-breaker and retain losses at ``step``.

    Args:
        step: Training step ``t`` (the official code counts from 1); clamped to ``[0, T]``.
        total_steps: ``T``, the run's own number of steps.
        alpha: ``lorra_alpha``.

    Returns:
        ``(alpha * (1 - t / 2T), alpha * t / 2T)``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    progress = min(max(float(step), 0.0), float(total_steps)) / (2.0 * total_steps)
    return alpha * (1.0 - progress), alpha * progress


def _layer_mask(mask: Tensor, reps: Tensor) -> Tensor:
    """The ``batch pos`` mask as float, broadcastable over ``layer batch pos``."""
    if mask.shape != reps.shape[1:3]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit reps {tuple(reps.shape)}")
    return mask.to(reps.dtype).unsqueeze(0)


def masked_mean(values: Float[Tensor, "layer batch pos"], mask: Mask) -> Tensor:
    """Sum of ``values * mask`` over layers and tokens divided by ``layers * mask.sum()``.

    Masked-out positions never contribute, even when ``values`` is NaN there.
    """
    weights = _layer_mask(mask, values.unsqueeze(-1)).expand_as(values)
    total = torch.where(weights > 0, values * weights, torch.zeros_like(values)).sum()
    count = weights.sum()
    return total / count.clamp_min(1.0)


def token_cosine(a: Reps, b: Reps) -> Float[Tensor, "layer batch pos"]:
    """Per-token cosine over ``d_model``, computed as the official code does (no epsilon).

    Each side is divided by its float32 norm, then the products are summed.
    """
    a_unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True, dtype=torch.float)
    b_unit = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True, dtype=torch.float)
    return (a_unit * b_unit).sum(dim=-1)


def circuit_breaker_loss(orig: Reps, broken: Reps, mask: Mask) -> Tensor:
    """RR loss: masked mean over layers and tokens of ``ReLU(cos(orig, broken))``."""
    return masked_mean(torch.relu(token_cosine(orig, broken)), mask)


def retain_loss(orig: Reps, broken: Reps, mask: Mask, *, relative: bool = False) -> Tensor:
    """Masked mean over layers and tokens of ``|broken - orig|_2`` (over ``d_model``), divided
    per token by ``|orig|_2`` when ``relative``."""
    distance = torch.linalg.vector_norm(broken - orig, dim=-1, dtype=torch.float)
    if relative:
        distance = distance / torch.linalg.vector_norm(orig, dim=-1, dtype=torch.float)
    return masked_mean(distance, mask)


def rmu_loss(
    broken: Reps, directions: Float[Tensor, "layer d_model"], scale: float | Sequence[float] | Tensor,
    mask: Mask,
) -> Tensor:
    """RMU-style loss: masked mean of ``|broken - scale * u_l|_2`` with unit ``u_l`` per layer.

    Args:
        broken: Adapted representations.
        directions: One direction per layer (normalised here).
        scale: The coefficient ``c`` (a float, or one per layer).
        mask: Token mask.
    """
    unit = directions / torch.linalg.vector_norm(directions, dim=-1, keepdim=True)
    scale_t = torch.as_tensor(scale, dtype=broken.dtype, device=broken.device).reshape(-1, 1)
    target = (scale_t * unit.to(broken.dtype))[:, None, None, :]
    distance = torch.linalg.vector_norm(broken - target, dim=-1, dtype=torch.float)
    return masked_mean(distance, mask)


def direction_loss(broken: Reps, directions: Float[Tensor, "layer d_model"], mask: Mask) -> Tensor:
    """Masked mean of ``|broken/|broken| - u_l/|u_l||_2`` (``random_norm``, ``refusal_direction``)."""
    unit = directions / torch.linalg.vector_norm(directions, dim=-1, keepdim=True)
    broken_unit = broken / torch.linalg.vector_norm(broken, dim=-1, keepdim=True, dtype=torch.float)
    distance = torch.linalg.vector_norm(
        broken_unit - unit.to(broken_unit.dtype)[:, None, None, :], dim=-1
    )
    return masked_mean(distance, mask)


def mean_cosine(a: Reps, b: Reps, mask: Mask) -> float:
    """Masked mean cosine (no ReLU), a logging metric."""
    with torch.no_grad():
        return float(masked_mean(token_cosine(a.float(), b.float()), mask))


def mean_norm(reps: Reps, mask: Mask) -> float:
    """Masked mean token norm, a logging metric."""
    with torch.no_grad():
        return float(masked_mean(torch.linalg.vector_norm(reps.float(), dim=-1), mask))


def cohesion_loss(points: Float[Tensor, "layer batch d_model"]) -> Tensor:
    """RepBend's cohesion: per layer, the mean over pairs ``i != j`` of ``1 - cos(x_i, x_j)``,
    averaged over layers (0 with fewer than two rows)."""
    if points.shape[1] < 2:
        return points.sum() * 0.0
    unit = points / torch.linalg.vector_norm(points, dim=-1, keepdim=True, dtype=torch.float)
    cosines = unit @ unit.transpose(-1, -2)
    n = points.shape[1]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=points.device)
    return (1.0 - cosines[:, off_diagonal]).mean()


def kl_loss(
    orig_logits: Float[Tensor, "batch pos vocab"], broken_logits: Float[Tensor, "batch pos vocab"],
    mask: Mask, *, temperature: float = KL_TEMPERATURE,
) -> Tensor:
    """Masked token mean of ``T^2 KL(softmax(orig/T) || softmax(broken/T))``."""
    log_p = torch.log_softmax(orig_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(broken_logits.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature**2
    return masked_mean(per_token.unsqueeze(0), mask)


def pull_loss(broken: Reps, target: Reps, mask: Mask) -> Tensor:
    """Masked mean of ``|broken - target|_2`` (RepBend's pull toward a frozen target state)."""
    distance = torch.linalg.vector_norm(broken - target, dim=-1, dtype=torch.float)
    return masked_mean(distance, mask)
