r"""RepBend (Yousefpour et al., ACL 2025, arXiv 2504.01550) as a LoRRA loss (``loss="repbend"``).

One step's loss, each term a masked mean (formulas in :mod:`cbscope.lorra.losses`)::

    loss = retain_weight * L_retain                      (alpha: safe states kept, L2)
         - repbend_unsafe * L_push                        (beta: unsafe states pushed away, L2)
         + repbend_cohesion * L_cohesion                  (gamma: unsafe states drawn together)
         + repbend_kl * L_kl                              (epsilon: retain logits kept, KL)
         + repbend_pull * L_pull                          (eta: unsafe request -> safe response)

* ``L_retain``: cbscope's retain term on the retain rows at the retain layers.
* ``L_push``: the same L2 distance on the circuit-breaker rows at the target layers; subtracted,
  so it is unbounded below: the other terms hold the model together.
* ``L_cohesion``: per target layer, the mean over pairs ``i != j`` of circuit-breaker rows of
  ``1 - cos(h^c_i, h^c_j)`` at each row's last request token.
* ``L_kl``: ``T^2 KL(softmax(z^o / T) || softmax(z^c / T))``, ``T = 2``, on the retain rows'
  next-token logits, averaged over real tokens (RepBend's code sums over positions and divides
  by the batch size; a per-token mean keeps the weight independent of the sequence length).
* ``L_pull``: the adapted states of a circuit-breaker row (harmful request, harmful response)
  pulled toward the *frozen* states of the same request answered with its refusal (the
  ``refusal`` retain example with the same request), at ``repbend_pull_tokens`` positions from
  the last request token; rows without such a refusal (or with the request dropped) add nothing.

The coefficients are constant, as in RepBend's code (no RR schedule; ``lorra_alpha`` is not
used): the metrics' ``cb_loss`` is the unsafe side (push, cohesion, pull, weighted) and
``retain_loss`` the safe side (``retain_weight * L_retain + repbend_kl * L_kl``), ``c_s = c_r = 1``. Both forwards run to the logits (the KL term), so a step costs more
than an RR step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from cbscope.layers import resid_hook_name
from cbscope.lorra import losses


def request_key(example: Any) -> str:
    """What two examples with the same request share (their messages)."""
    return json.dumps(list(example.messages), sort_keys=True)


def refusal_partners(cb: Sequence[Any], refusals: Sequence[Any]) -> list[int | None]:
    """For each circuit-breaker example, the index of a refusal example with the same request."""
    index: dict[str, int] = {}
    for position, example in enumerate(refusals):
        if example.messages:
            index.setdefault(request_key(example), position)
    return [index.get(request_key(ex)) if ex.messages else None for ex in cb]


def pull_rows(
    cb: Sequence[Any], partners: Sequence[Any | None], width: int, pad_id: int, tokens: int
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(ids, attention, mask)`` of the refusal partners of a batch's circuit-breaker rows,
    right padded (or cut) to ``width``; ``mask`` marks the ``tokens`` positions from the last
    request token that both rows have. ``None`` when no row has a partner."""
    ids = torch.full((len(cb), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(cb), width), dtype=torch.long)
    mask = torch.zeros((len(cb), width), dtype=torch.long)
    found = False
    for row, (ex, partner) in enumerate(zip(cb, partners, strict=True)):
        if partner is None or ex.response_start < 1:
            continue
        start = ex.response_start
        if partner.response_start != start or partner.ids[:start] != ex.ids[:start]:
            continue  # not the same request tokens (a dropped request, a cut)
        kept = partner.ids[:width]
        ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        attention[row, : len(kept)] = 1
        end = min(start - 1 + tokens, len(kept), len(ex.ids), width)
        if end > start - 1:
            mask[row, start - 1 : end] = 1
            found = True
    return (ids, attention, mask) if found else None


def resid_and_logits(pair: Any, ids: Tensor, attention: Tensor, layers: Sequence[int]) -> tuple[list[Tensor], Tensor]:
    """Residual stream at paper ``layers`` and the logits, from one full forward."""
    captured: dict[int, Tensor] = {}

    def make_hook(layer: int):
        def hook(activation: Tensor, hook: Any) -> None:
            captured[layer] = activation

        return hook

    hooks = [(resid_hook_name(layer), make_hook(layer)) for layer in layers]
    with pair.bridge.hooks(fwd_hooks=hooks):
        logits = pair.bridge(ids, attention_mask=attention, return_type="logits")
    return [captured[layer] for layer in layers], logits


def repbend_step_terms(pair: Any, config: Any, batch: Any, setup: Any) -> dict[str, Any]:
    """The forwards of a RepBend step and its two sides (keys of
    :func:`cbscope.lorra.loop._step_terms`, plus ``extra``: each term's value)."""
    device = pair.device
    ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
    cb_mask, retain_mask = batch.cb_mask.to(device), batch.retain_mask.to(device)
    n = batch.n_cb
    layers = setup.layers
    t_pos, r_pos = setup.positions(setup.targets), setup.positions(setup.retain_layers)
    pair.set_training(False)
    with pair.original(), torch.no_grad():
        orig, orig_logits = resid_and_logits(pair, ids, attention, layers)
        pull = getattr(batch, "pull", None)
        pull_target = None
        if pull is not None and config.repbend_pull > 0:
            pull_ids, pull_att, _ = (t.to(device) for t in pull)
            pull_target = torch.stack(pair.resid_layers(pull_ids, pull_att, setup.targets))
    pair.set_training(True)
    broken, broken_logits = resid_and_logits(pair, ids, attention, layers)
    cb_orig = torch.stack([orig[i][:n] for i in t_pos])
    cb_broken = torch.stack([broken[i][:n] for i in t_pos])
    retain_orig = torch.stack([orig[i][n:] for i in r_pos])
    retain_broken = torch.stack([broken[i][n:] for i in r_pos])
    zero = torch.zeros((), device=device)
    push = losses.retain_loss(cb_orig, cb_broken, cb_mask)
    ends = batch.cb_request_end.to(device)
    rows = torch.arange(n, device=device)
    cohesion = losses.cohesion_loss(cb_broken[:, rows, ends]) if config.repbend_cohesion > 0 else zero
    pull_term = (losses.pull_loss(cb_broken, pull_target, pull[2].to(device))
                 if pull_target is not None else zero)
    kl = (losses.kl_loss(orig_logits[n:], broken_logits[n:], retain_mask)
          if config.repbend_kl > 0 else zero)
    retain = losses.retain_loss(retain_orig, retain_broken, retain_mask,
                                relative=config.retain_relative)
    unsafe_side = (-config.repbend_unsafe * push + config.repbend_cohesion * cohesion
                   + config.repbend_pull * pull_term)
    safe_side = config.retain_weight * retain + config.repbend_kl * kl

    def retain_at_targets() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return (torch.stack([orig[i][n:] for i in t_pos]),
                    torch.stack([broken[i][n:] for i in t_pos]))

    return {
        "cb_orig": cb_orig,
        "cb_broken": cb_broken,
        "retain_at_targets": retain_at_targets,
        "cb_mask": cb_mask,
        "retain_mask": retain_mask,
        "c_s": 1.0,
        "c_r": 1.0,
        "cb_loss": unsafe_side,
        "retain_loss": safe_side,
        "extra": {"push": push, "cohesion": cohesion, "pull": pull_term, "kl": kl,
                  "retain_l2": retain},
    }


def with_partners(entry: Mapping[str, Any], partners: Sequence[int | None]) -> list[int | None]:
    """The refusal partner of each circuit-breaker row of a plan entry (``None`` if dropped)."""
    return [None if drop else partners[i] for i, drop in zip(entry["cb"], entry["drop"], strict=True)]
