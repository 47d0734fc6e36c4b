"""Soft-prompt (input-embedding) attack, as in the circuit-breakers paper's embedding attack.

``n_tokens`` free embedding vectors are placed right after the request, inside the user turn and
before the end-of-turn / assistant header::

    <chat prefix> REQUEST [s_1 ... s_n] <end of user turn> <assistant header> TARGET

and optimised to make the model produce ``TARGET`` (e.g. ``"sure here is how : <procedure>"`` for
the organism, AdvBench's ``target`` for real models): minimise the mean cross-entropy of the target
tokens with *signed* gradient descent, ``s <- s - step * sign(grad)``. Each prompt has its own
soft prompt; prompts are optimised together in batches, and a prompt stops early once greedy
decoding reproduces its target (every target token is the argmax given the previous ones; this is
exactly "greedy generation emits the target") or its loss falls below ``loss_eps``. The soft prompt
with the lowest loss seen is kept. Then the response is greedily generated from the input
embeddings (our own small KV-cached loop, :func:`greedy_generate_embeds`) *without* the target.

The attack runs against one mode of the pair: ``"cb"`` (adapters on) or ``"base"`` (adapters off).
Model weights are never changed.

``step_size`` is relative: the absolute step is ``step_size`` times the RMS of the model's
input-embedding table, so one default works for any model (the absolute value is reported).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from cbscope.attacks.base import AttackRun, copy_metas, model_mode
from cbscope.attacks.options import check_finite
from cbscope.attacks.protocol import Attack, AttackContext
from cbscope.attacks.registry import register_attack
from cbscope.attacks.suite import item_metas, item_prompts
from cbscope.errors import ConfigError
from cbscope.generation import decode_embeds

if TYPE_CHECKING:
    from cbscope.pair import ModelPair

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class SoftPromptConfig:
    """Options of the soft-prompt attack.

    Attributes:
        n_tokens: Number of optimised embedding vectors (20).
        steps: Maximum optimisation steps per batch (500).
        step_size: Signed-gradient step, relative to the RMS of the embedding table.
        init: Initialise from this string's token embeddings (repeated / cut to ``n_tokens``);
            ``None``: embeddings of random vocabulary tokens (seeded).
        early_stop: Stop a prompt once greedy decoding produces its target.
        loss_eps: Also stop a prompt once its target loss is below this.
        batch_size: Prompts optimised together.
        max_new_tokens: Generation budget of the final response.
        seed: Seed of the random initialisation.
    """

    n_tokens: int = 20
    steps: int = 500
    step_size: float = 0.05
    init: str | None = None
    early_stop: bool = True
    loss_eps: float = 0.01
    batch_size: int = 64
    max_new_tokens: int = 32
    seed: int = 0

    def validate(self) -> SoftPromptConfig:
        """Check value ranges; returns ``self``.

        Raises:
            ConfigError: A value out of range or a non-finite number.
        """
        check_finite(self, owner="soft_prompt")
        if self.n_tokens < 1:
            raise ConfigError(f"soft_prompt n_tokens must be >= 1, not {self.n_tokens}")
        if self.steps < 0:
            raise ConfigError(f"soft_prompt steps must be >= 0, not {self.steps}")
        if self.step_size <= 0:
            raise ConfigError(f"soft_prompt step_size must be > 0, not {self.step_size}")
        if self.batch_size < 1:
            raise ConfigError(f"soft_prompt batch_size must be >= 1, not {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"soft_prompt max_new_tokens must be >= 1, not {self.max_new_tokens}")
        return self


@dataclass
class SoftPromptResult:
    """Outcome of :func:`optimise_soft_prompts`.

    Attributes:
        prompts: Requests.
        targets: Target completions.
        responses: Greedy responses from the optimised input embeddings.
        embeddings: The kept (lowest-loss) soft prompts, ``[prompt, n_tokens, d_model]``, on CPU.
        initial_loss: Per-prompt target loss (mean token cross-entropy) before optimisation.
        final_loss: Per-prompt target loss of the kept soft prompt.
        steps_used: Steps each prompt ran before stopping.
        target_hit: Whether greedy decoding produced the target at the kept soft prompt.
        loss_curve: Mean target loss over prompts at each step (stopped prompts keep their last).
        step_size_abs: The absolute signed-gradient step used.
    """

    prompts: list[str]
    targets: list[str]
    responses: list[str]
    embeddings: Float[Tensor, "prompt n_tokens d_model"]
    initial_loss: list[float]
    final_loss: list[float]
    steps_used: list[int]
    target_hit: list[bool]
    loss_curve: list[float] = field(default_factory=list)
    step_size_abs: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-friendly numbers (no tensors)."""
        n = max(1, len(self.prompts))
        return {
            "mean_initial_loss": sum(self.initial_loss) / n,
            "mean_final_loss": sum(self.final_loss) / n,
            "target_hit_rate": sum(self.target_hit) / n,
            "mean_steps_used": sum(self.steps_used) / n,
            "loss_curve": self.loss_curve,
            "step_size_abs": self.step_size_abs,
        }


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter (restored afterwards)."""
    params = list(model.parameters())
    states = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, state in zip(params, states, strict=True):
            p.requires_grad_(state)


def split_chat_prompt(tokenizer: Any, prompt: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted prompt, split right after the request text.

    Returns:
        ``(head, tail)``: ``head`` ends with the request, ``tail`` is the rest of the user turn
        and the assistant header (``add_generation_prompt=True``).

    Raises:
        ValueError: If the chat template does not contain the request verbatim.
    """
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    cut = text.rfind(prompt)
    if cut < 0:
        raise ValueError(f"the chat template does not contain the request {prompt[:60]!r} verbatim")
    cut += len(prompt)
    head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    tail = tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
    return list(head), list(tail)


def _embed(model: Any, ids: Sequence[int]) -> Tensor:
    table = model.get_input_embeddings()
    device = table.weight.device
    return table(torch.tensor(list(ids), dtype=torch.long, device=device))


def _special_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}


def initial_soft_prompts(
    model: Any, tokenizer: Any, n_prompts: int, config: SoftPromptConfig
) -> Float[Tensor, "prompt n_tokens d_model"]:
    """Starting soft prompts: ``config.init``'s token embeddings, or random non-special tokens."""
    table = model.get_input_embeddings().weight.detach()
    if config.init:
        ids = list(tokenizer(config.init, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"init string {config.init!r} has no tokens")
        ids = (ids * (config.n_tokens // len(ids) + 1))[: config.n_tokens]
        rows = table[torch.tensor(ids, device=table.device)]
        return rows.unsqueeze(0).repeat(n_prompts, 1, 1).clone()
    specials = _special_ids(tokenizer)
    allowed = torch.tensor([i for i in range(table.shape[0]) if i not in specials])
    generator = torch.Generator().manual_seed(config.seed)
    picks = allowed[torch.randint(len(allowed), (n_prompts, config.n_tokens), generator=generator)]
    return table[picks.to(table.device)].clone()


def _batch_forward(
    model: Any,
    heads: list[Tensor],
    soft: Tensor,
    tails: list[Tensor],
    targets: list[list[int]],
    target_embeds: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """Per-row target loss and "greedy hits the whole target" flags (right padding)."""
    rows, labels = [], []
    for i in range(len(heads)):
        parts = [heads[i], soft[i], tails[i], target_embeds[i]]
        seq = torch.cat(parts, dim=0)
        rows.append(seq)
        start = heads[i].shape[0] + soft.shape[1] + tails[i].shape[0]
        lab = torch.full((seq.shape[0],), IGNORE, dtype=torch.long)
        lab[start : start + len(targets[i])] = torch.tensor(targets[i], dtype=torch.long)
        labels.append(lab)
    width = max(r.shape[0] for r in rows)
    d = soft.shape[-1]
    embeds = soft.new_zeros((len(rows), width, d))
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=soft.device)
    label_t = torch.full((len(rows), width), IGNORE, dtype=torch.long, device=soft.device)
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
        label_t[i, : row.shape[0]] = lab.to(soft.device)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits.float()
    shifted = logits[:, :-1]
    next_labels = label_t[:, 1:]
    token_loss = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        next_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(next_labels.shape)
    valid = next_labels != IGNORE
    row_loss = (token_loss * valid).sum(-1) / valid.sum(-1).clamp_min(1)
    hits = ((shifted.argmax(-1) == next_labels) | ~valid).all(-1)
    return row_loss, hits


@torch.no_grad()
def greedy_generate_embeds(
    model: Any,
    tokenizer: Any,
    sequences: Sequence[Float[Tensor, "pos d_model"]],
    *,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy decoding from input embeddings (left-padded batch, KV cache).

    Args:
        model: A Hugging Face causal LM (peft-injected LoRA layers are fine).
        tokenizer: Its tokenizer (for ``eos_token_id`` and decoding).
        sequences: One ``[pos, d_model]`` embedding sequence per example (the prompt).
        max_new_tokens: Generation budget.

    Returns:
        Decoded new text per sequence (special tokens skipped, stripped), like
        :func:`cbscope.generation.generate_text`; :func:`cbscope.generation.decode_embeds` with
        ``temperature=None``.
    """
    answers = decode_embeds(model, tokenizer, sequences, max_new_tokens=max_new_tokens)
    return [a[0] for a in answers]


def prompt_embeddings(
    model: Any, tokenizer: Any, prompts: Sequence[str], soft: Tensor | None = None
) -> list[Tensor]:
    """Embedding sequences ``head + soft[i] + tail`` of chat-formatted prompts (no soft: plain)."""
    out = []
    for i, prompt in enumerate(prompts):
        head, tail = split_chat_prompt(tokenizer, prompt)
        parts = [_embed(model, head)]
        if soft is not None:
            parts.append(soft[i].to(parts[0].device, parts[0].dtype))
        parts.append(_embed(model, tail))
        out.append(torch.cat(parts, dim=0))
    return out


@torch.no_grad()
def target_loss(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    soft: Float[Tensor, "prompt n_tokens d_model"] | None = None,
) -> list[float]:
    """Mean token cross-entropy of each target after its prompt (and soft prompt, if given).

    ``exp(-loss)`` is the geometric-mean probability of the target tokens.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pieces = [split_chat_prompt(tokenizer, p) for p in prompts]
    heads = [_embed(model, h) for h, _ in pieces]
    tails = [_embed(model, t) for _, t in pieces]
    tgt_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets]
    if soft is None:
        soft = heads[0].new_zeros((len(prompts), 0, heads[0].shape[-1]))
    soft = soft.to(heads[0].device, heads[0].dtype)
    losses, _ = _batch_forward(
        model, heads, soft, tails, tgt_ids, [_embed(model, t) for t in tgt_ids]
    )
    return [float(x) for x in losses]


def optimise_soft_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    config: SoftPromptConfig | None = None,
    *,
    show_progress: bool = False,
) -> SoftPromptResult:
    """Optimise one soft prompt per request toward its target, then generate greedily.

    Args:
        model: A Hugging Face causal LM in the state to attack (e.g. inside ``pair.original()``
            for the base model); its weights are not changed.
        tokenizer: Its tokenizer (chat template required).
        prompts: Requests (user messages).
        targets: Target completions, one per request.
        config: :class:`SoftPromptConfig`.
        show_progress: Show a tqdm bar per batch.
    """
    config = (config or SoftPromptConfig()).validate()
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    table = model.get_input_embeddings().weight
    step_abs = float(config.step_size * table.detach().float().pow(2).mean().sqrt())
    was_training = model.training
    model.eval()
    n = len(prompts)
    all_soft = initial_soft_prompts(model, tokenizer, n, config)
    initial = [0.0] * n
    final = [0.0] * n
    steps_used = [0] * n
    hit_flags = [False] * n
    curves: list[list[float]] = []
    responses: list[str] = []
    try:
        with frozen(model):
            for begin in range(0, n, config.batch_size):
                idx = list(range(begin, min(n, begin + config.batch_size)))
                with torch.no_grad():
                    pieces = [split_chat_prompt(tokenizer, prompts[i]) for i in idx]
                    heads = [_embed(model, h) for h, _ in pieces]
                    tails = [_embed(model, t) for _, t in pieces]
                    tgt_ids = [
                        list(tokenizer(targets[i], add_special_tokens=False)["input_ids"])
                        for i in idx
                    ]
                    if any(not t for t in tgt_ids):
                        raise ValueError("every target needs at least one token")
                    tgt_embeds = [_embed(model, t) for t in tgt_ids]
                soft = all_soft[idx].clone().requires_grad_(True)
                best = soft.detach().clone()
                best_loss = torch.full((len(idx),), float("inf"))
                best_hit = torch.zeros(len(idx), dtype=torch.bool)
                active = torch.ones(len(idx), dtype=torch.bool)
                used = torch.zeros(len(idx), dtype=torch.long)
                last_loss = torch.zeros(len(idx))
                curve: list[float] = []
                bar = tqdm(
                    range(config.steps + 1),
                    desc=f"soft prompt {begin // config.batch_size + 1}",
                    disable=not show_progress,
                    leave=False,
                )
                for step in bar:
                    row_loss, hits = _batch_forward(model, heads, soft, tails, tgt_ids, tgt_embeds)
                    loss_cpu = row_loss.detach().cpu()
                    hits_cpu = hits.detach().cpu()
                    if step == 0:
                        for j, i in enumerate(idx):
                            initial[i] = float(loss_cpu[j])
                    last_loss = torch.where(active, loss_cpu, last_loss)
                    curve.append(float(last_loss.mean()))
                    improved = active & (loss_cpu < best_loss)
                    if bool(improved.any()):
                        best[improved.to(best.device)] = soft.detach()[improved.to(best.device)]
                        best_loss = torch.where(improved, loss_cpu, best_loss)
                        best_hit = torch.where(improved, hits_cpu, best_hit)
                    stop = (hits_cpu & config.early_stop) | (loss_cpu < config.loss_eps)
                    if bool((stop & active).any()):
                        # keep the stopping soft prompt, even if an earlier loss was lower
                        newly = stop & active
                        best[newly.to(best.device)] = soft.detach()[newly.to(best.device)]
                        best_loss = torch.where(newly, loss_cpu, best_loss)
                        best_hit = torch.where(newly, hits_cpu, best_hit)
                    active &= ~stop
                    if step == config.steps or not bool(active.any()):
                        break
                    used += active.long()
                    (grad,) = torch.autograd.grad(
                        (row_loss * active.to(row_loss.device)).sum(), soft
                    )
                    with torch.no_grad():
                        update = grad.sign() * active.to(grad.device)[:, None, None]
                        soft -= step_abs * update
                    if show_progress:
                        bar.set_postfix(loss=f"{curve[-1]:.3f}", active=int(active.sum()))
                bar.close()
                for j, i in enumerate(idx):
                    final[i] = float(best_loss[j])
                    steps_used[i] = int(used[j])
                    hit_flags[i] = bool(best_hit[j])
                all_soft[idx] = best.to(all_soft.device)
                curves.append(curve)
                with torch.no_grad():
                    seqs = prompt_embeddings(model, tokenizer, [prompts[i] for i in idx], best)
                    responses += greedy_generate_embeds(
                        model, tokenizer, seqs, max_new_tokens=config.max_new_tokens
                    )
    finally:
        if was_training:
            model.train()
    length = max((len(c) for c in curves), default=0)
    weights = [min(config.batch_size, n - b) for b in range(0, n, config.batch_size)]
    loss_curve = []
    for t in range(length):
        values = [(c[min(t, len(c) - 1)], w) for c, w in zip(curves, weights, strict=True)]
        loss_curve.append(sum(v * w for v, w in values) / max(1, sum(w for _, w in values)))
    logger.info(
        "soft prompt: %d prompts, mean loss %.3f -> %.3f, target hit %d/%d",
        n,
        sum(initial) / max(1, n),
        sum(final) / max(1, n),
        sum(hit_flags),
        n,
    )
    return SoftPromptResult(
        prompts=list(prompts),
        targets=list(targets),
        responses=responses,
        embeddings=all_soft.detach().cpu(),
        initial_loss=initial,
        final_loss=final,
        steps_used=steps_used,
        target_hit=hit_flags,
        loss_curve=loss_curve,
        step_size_abs=step_abs,
    )


def soft_prompt_attack(
    pair: ModelPair,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    mode: str = "cb",
    config: SoftPromptConfig | None = None,
    metas: Sequence[dict[str, Any]] | None = None,
    show_progress: bool = False,
) -> AttackRun:
    """Run the soft-prompt attack against the pair's base (``"base"``) or circuit-broken model.

    The run's ``extra`` holds :meth:`SoftPromptResult.summary` and the config; each meta gets the
    prompt's ``target``, ``initial_loss``, ``final_loss``, ``steps_used`` and ``target_hit``.
    """
    config = config or SoftPromptConfig()
    with model_mode(pair, mode):
        result = optimise_soft_prompts(
            pair.model, pair.tokenizer, prompts, targets, config, show_progress=show_progress
        )
    out_metas = copy_metas(metas, len(prompts))
    for i, meta in enumerate(out_metas):
        meta.update(
            target=result.targets[i],
            initial_loss=result.initial_loss[i],
            final_loss=result.final_loss[i],
            steps_used=result.steps_used[i],
            target_hit=result.target_hit[i],
        )
    run = AttackRun("soft_prompt", mode, list(prompts), result.responses, metas=out_metas)
    run.extra = {**result.summary(), "config": asdict(config)}
    run.extra["result"] = result
    return run


@register_attack
class SoftPromptAttack(Attack):
    """:func:`soft_prompt_attack` on ``suite.soft`` toward each item's ``meta["target"]``."""

    name = "soft_prompt"
    Options = SoftPromptConfig
    options_field = "soft_prompt"
    generation_fields = ("max_new_tokens",)
    order = 60
    meta_key = "soft_prompt"
    description = "optimised input embeddings after the request (signed gradient toward a target)"

    def check(self, ctx: AttackContext, options: SoftPromptConfig) -> None:
        """Also refuse an ``init`` string the tokenizer turns into no tokens.

        Raises:
            ConfigError: An empty initialisation.
        """
        super().check(ctx, options)
        if options.init is not None and not ctx.pair.tokenizer(
            options.init, add_special_tokens=False
        )["input_ids"]:
            raise ConfigError(f"soft_prompt init {options.init!r} has no tokens")

    def run(self, ctx: AttackContext, mode: str, options: SoftPromptConfig) -> AttackRun:
        """Optimise one soft prompt per item; answers get the shared ``max_new_tokens``."""
        config = SoftPromptConfig(
            **{**asdict(options), "max_new_tokens": ctx.generation.max_new_tokens}
        )
        soft = ctx.suite.soft
        return soft_prompt_attack(
            ctx.pair,
            item_prompts(soft),
            [str(it.meta["target"]) for it in soft],
            mode=mode,
            config=config,
            metas=item_metas(soft),
            show_progress=ctx.show_progress,
        )

    def run_meta(self, run: AttackRun) -> dict[str, Any]:
        """Loss curve, target-hit rate, steps used and the config (not the embeddings)."""
        meta = {k: v for k, v in run.extra.items() if k not in ("result", "config")}
        meta["config"] = run.extra.get("config")
        return meta
