r"""Durability terms: a breaker that survives harmful fine-tuning (``LorraConfig.durability``).

``"tar"`` (TAR-style, Tamirisa et al. 2024, first order): at every step, after the RR gradient,
the step's circuit-breaker rows are used to *simulate* the attack: ``durability_steps`` steps of
harmful fine-tuning of the breaker's LoRA weights on the cross-entropy of the rows' response
tokens move ``theta`` to ``theta'``. Each step is ``theta -= durability_lr * sign(g)``: AdamW's
first step has exactly this form, and the fine-tuning attack uses AdamW. (The attack itself
trains a *fresh* LoRA on the merged model; the simulation perturbs the breaker's own LoRA, which
spans the same blocks and modules.) What the attack recovered is the RR circuit-breaker
term at ``theta'``::

    L_dur = sum_{l,b,p} ReLU(cos(h^o_{l,b,p}, h^{theta'}_{l,b,p})) m_{b,p} / (|L| sum m)

and its gradient at ``theta'``, times ``durability_weight``, is added to the step's gradient
(first order: ``d theta' / d theta`` is taken as the identity, as TAR and first-order MAML do).
The LoRA weights are restored to ``theta`` before the optimiser step, whatever happens in the
inner loop; with ``durability_weight = 0`` the run is the plain run, bit for bit (tested). The
inner steps run with dropout off. Cost: ``durability_steps`` extra full forwards and backwards
plus one truncated forward and backward per step.

``"repnoise"`` (RepNoise-style, Rosati et al. 2024, simplified): a term added to the loss that
pulls the adapted circuit-breaker representations toward fresh Gaussian noise with the frozen
representations' per-token scale, scale-free::

    L_noise = sum_{l,b,p} |h^c - eps|_2 / |h^o|_2 m / (|L| sum m),   eps ~ N(0, |h^o|^2 / d I)

RepNoise itself matches the harmful representations' distribution to noise with an MMD and adds
gradient ascent on the harmful loss; this is only its noise term.

The fine-tuning attack that judges durability is :func:`cbscope.attacks.finetune.finetune_attack`
(called by ``benchmarks/durability.py`` through that public function only).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cbscope.lorra import losses

DURABILITY = ("none", "tar", "repnoise")


def response_lm_loss(pair: Any, ids: Tensor, attention: Tensor, request_end: Tensor) -> Tensor:
    """Mean next-token cross-entropy on the response tokens (those after ``request_end``)."""
    logits = pair.bridge(ids, attention_mask=attention, return_type="logits")
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
    target_ok = (positions[:, 1:] > request_end[:, None]) & attention[:, 1:].bool()
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
        reduction="none").reshape(ids.shape[0], -1)
    count = target_ok.sum().clamp_min(1)
    return torch.where(target_ok, per_token, torch.zeros_like(per_token)).sum() / count


def tar_gradient(pair: Any, config: Any, batch: Any, targets: list[int], cb_orig: Tensor) -> float:
    """Simulate the attack from the current weights, add ``durability_weight`` times the gradient
    of what it recovered to each LoRA parameter's ``.grad``, restore the weights.

    Returns:
        ``L_dur``, the recovered circuit-breaker term at ``theta'``.
    """
    params = [p for p in pair.lora_parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    device = pair.device
    n = batch.n_cb
    ids, attention = batch.input_ids[:n].to(device), batch.attention_mask[:n].to(device)
    ends = batch.cb_request_end.to(device)
    cb_mask = batch.cb_mask.to(device)
    was_training = pair.bridge.training
    pair.set_training(False)
    try:
        for _ in range(config.durability_steps):
            loss = response_lm_loss(pair, ids, attention, ends)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.sub_(config.durability_lr * torch.sign(g).to(p.dtype))
        recovered_reps = torch.stack(pair.resid_layers(ids, attention, targets))
        recovered = losses.circuit_breaker_loss(cb_orig, recovered_reps, cb_mask)
        grads = torch.autograd.grad(recovered, params, allow_unused=True)
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
        pair.set_training(was_training)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is None:
                continue
            extra = config.durability_weight * g.to(p.dtype)
            p.grad = extra if p.grad is None else p.grad + extra
    return float(recovered.detach())


def noise_loss(cb_orig: Tensor, cb_broken: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The RepNoise-style noise term (module docstring); fresh noise on every call."""
    scale = torch.linalg.vector_norm(cb_orig.float(), dim=-1, keepdim=True)
    noise = torch.randn(cb_orig.shape, generator=generator, device="cpu").to(cb_orig.device)
    noise = noise * scale / cb_orig.shape[-1] ** 0.5
    distance = torch.linalg.vector_norm(cb_broken.float() - noise, dim=-1) / scale.squeeze(-1)
    return losses.masked_mean(distance, mask)
