"""Refusal-direction ablation (Arditi et al. 2024): project one direction out of every layer.

Refusal in chat models is mediated by one residual direction. Its estimate is the difference of
means of the residual stream on harmful and harmless requests at the last prompt token,

    r = mean(h_l(harmful)) - mean(h_l(harmless)),    r_hat = r / ||r||,

read at paper layer ``l`` (``blocks.{l-1}.hook_resid_post`` through the pair's bridge,
:func:`~cbscope.attacks.repe.difference_of_means`). While the model answers, ``h <- h - (h .
r_hat) r_hat`` is applied to the residual stream at every layer and every position (prompt and
generated tokens): at the input of the first block (the embeddings) and at the output of every
decoder block, i.e. ``hook_resid_pre`` of block 0 and ``hook_resid_post`` of every block, through
plain torch hooks on the Hugging Face blocks (the same points; generation keeps its KV cache).
Every block therefore reads a stream without the direction, and the final norm does too.

Two choices, both options, depart from the plainest reading of the paper where the organism
needs it (measured in ``docs/attacks.md``):

* ``projection``: ``"zero"`` sets the component along ``r_hat`` to 0 (Arditi's directional
  ablation, right for a centred stream); ``"harmless_mean"`` (the default) sets it, at each
  layer, to the mean component of the harmless requests at the same position, so a harmful
  request looks harmless along ``r_hat`` even when the stream is not centred (the organism's is
  not: zeroing leaves it refusing at every layer).
* ``positions``: ``"prompt"`` (the default) edits the forward over the prompt only (with the KV
  cache, later passes hold one new token each, which attend to the edited prompt); ``"all"``
  edits every generated token too, which on the organism also erases what was asked (it loops
  on ``"sure here is how :"``).

Run against ``"base"`` it asks whether the model still refuses without its refusal direction;
against ``"cb"`` whether the breaker still holds once refusal is gone. The direction is read in
the attacked mode by default (a white-box attacker reads the model it attacks) or from the base
model (``direction_from="base"``, Arditi's setting). Ablating a zero direction is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cbscope.attacks.base import AttackRun, copy_metas, model_mode
from cbscope.attacks.generate import generate_responses
from cbscope.attacks.options import check_finite
from cbscope.attacks.protocol import Attack, AttackContext
from cbscope.attacks.registry import register_attack
from cbscope.attacks.repe import decoder_layers, difference_of_means
from cbscope.attacks.suite import item_metas, item_prompts
from cbscope.data import encode_chat
from cbscope.errors import ConfigError
from cbscope.layers import validate_layers

if TYPE_CHECKING:
    from cbscope.pair import ModelPair

__all__ = [
    "RefusalAblationConfig",
    "ablation",
    "projection_means",
    "refusal_ablation_attack",
    "refusal_direction",
]


@dataclass
class RefusalAblationConfig:
    """Options of the refusal-ablation attack.

    Attributes:
        layer: Paper layer where the direction is read (``None``: the middle layer,
            ``ceil(n_layers / 2)``).
        token_index: Position (from the end of the chat-formatted prompt) where it is read.
        direction_from: ``"attacked"`` (the attacked mode) or ``"base"`` (adapters off).
        projection: ``"harmless_mean"`` or ``"zero"`` (see the module docstring).
        positions: ``"prompt"`` or ``"all"`` (see the module docstring).
        max_new_tokens: Generation budget.
        batch_size: Prompts per forward / generate call.
    """

    layer: int | None = None
    token_index: int = -1
    direction_from: str = "attacked"
    projection: str = "harmless_mean"
    positions: str = "prompt"
    max_new_tokens: int = 32
    batch_size: int = 32

    def validate(self) -> RefusalAblationConfig:
        """Check value ranges; returns ``self``.

        Raises:
            ConfigError: A layer below 1, an unknown ``direction_from``, a bad budget or batch.
        """
        check_finite(self, owner="refusal_ablation")
        if self.layer is not None and self.layer < 1:
            raise ConfigError(f"refusal_ablation layer must be a paper layer >= 1, not {self.layer}")
        if self.direction_from not in ("attacked", "base"):
            raise ConfigError("refusal_ablation direction_from must be 'attacked' or 'base'")
        if self.projection not in ("harmless_mean", "zero"):
            raise ConfigError("refusal_ablation projection must be 'harmless_mean' or 'zero'")
        if self.positions not in ("prompt", "all"):
            raise ConfigError("refusal_ablation positions must be 'prompt' or 'all'")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("refusal_ablation max_new_tokens and batch_size must be >= 1")
        return self


def _project_out(hidden: Tensor, unit: Tensor, centre: float = 0.0) -> Tensor:
    unit = unit.to(hidden.device, hidden.dtype)
    return hidden - ((hidden @ unit) - centre)[..., None] * unit


@contextlib.contextmanager
def ablation(
    model: Any,
    direction: Tensor,
    *,
    centres: Sequence[float] | None = None,
    positions: str = "all",
) -> Iterator[None]:
    """Set the residual stream's component along ``direction`` at every layer while inside.

    Point ``p`` is the input of the first block (``p = 0``) or the output of block ``p - 1``
    (paper layer ``p``); there ``h <- h - (h . u - centres[p]) u`` with ``u`` the unit
    direction (``centres`` ``None``: all 0, the directional ablation). A zero direction leaves
    the model as it is (nothing is hooked). Hooks are removed on exit, even on error.

    Args:
        model: A Hugging Face causal LM (``pair.model``; what ``pair.generator`` runs).
        direction: ``[d_model]`` vector (any norm; it is normalised).
        centres: ``n_layers + 1`` target components, one per point.
        positions: ``"all"``: every forward; ``"prompt"``: only forwards over more than one
            position (the prompt, when generating with a KV cache).
    """
    if positions not in ("all", "prompt"):
        raise ValueError(f"positions must be 'all' or 'prompt', not {positions!r}")
    norm = float(direction.norm())
    if norm == 0.0:
        yield
        return
    unit = direction.detach().float() / norm
    blocks = decoder_layers(model)
    centre = list(centres) if centres is not None else [0.0] * (len(blocks) + 1)
    if len(centre) != len(blocks) + 1:
        raise ValueError(f"centres needs {len(blocks) + 1} values, not {len(centre)}")

    def skip(hidden: Tensor) -> bool:
        return positions == "prompt" and hidden.shape[1] == 1

    def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if skip(hidden):
            return None
        edited = _project_out(hidden, unit, centre[0])
        if args:
            return (edited, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edited}

    def make_post_hook(point: int):
        def post_hook(module: Any, inputs: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if skip(hidden):
                return None
            edited = _project_out(hidden, unit, centre[point])
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return post_hook

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        handles += [
            block.register_forward_hook(make_post_hook(i + 1)) for i, block in enumerate(blocks)
        ]
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def projection_means(
    model: Any, tokenizer: Any, prompts: Sequence[Any], direction: Tensor, *, token_index: int = -1
) -> list[float]:
    """Mean component along ``direction`` (normalised) at every point (embeddings, then each
    block's output) and position ``token_index`` of the chat-formatted prompts."""
    unit = direction.detach().float() / direction.norm()
    blocks = decoder_layers(model)
    sums = [0.0] * (len(blocks) + 1)
    got: dict[int, Tensor] = {}

    def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got[0] = args[0] if args else kwargs["hidden_states"]

    def make_hook(point: int):
        def hook(module: Any, inputs: Any, output: Any) -> None:
            got[point] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [b.register_forward_hook(make_hook(i + 1)) for i, b in enumerate(blocks)]
    device = model.get_input_embeddings().weight.device
    try:
        for prompt in prompts:
            request, response = (prompt, "") if isinstance(prompt, str) else prompt
            ids = encode_chat(tokenizer, request, response).input_ids
            model(input_ids=torch.tensor([ids], device=device))
            for point in range(len(sums)):
                sums[point] += float(got[point][0, token_index].float() @ unit.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return [total / len(prompts) for total in sums]


def refusal_direction(
    pair: ModelPair,
    harmful: Sequence[Any],
    harmless: Sequence[Any],
    layer: int,
    *,
    token_index: int = -1,
    batch_size: int = 32,
) -> Tensor:
    """Difference of means (harmful minus harmless) at ``layer``, in the pair's current state."""
    return difference_of_means(
        pair, harmful, harmless, [layer], token_index=token_index, batch_size=batch_size
    )[layer]


def refusal_ablation_attack(
    pair: ModelPair,
    prompts: Sequence[str],
    *,
    harmful: Sequence[Any],
    harmless: Sequence[Any],
    mode: str = "cb",
    config: RefusalAblationConfig | None = None,
    metas: Sequence[dict[str, Any]] | None = None,
    show_progress: bool = False,
) -> AttackRun:
    """Answer ``prompts`` with the refusal direction projected out of every layer.

    Args:
        pair: The model pair (never modified).
        prompts: Harmful requests.
        harmful: Requests of the direction's "+" side.
        harmless: Requests of its "-" side.
        mode: ``"base"`` or ``"cb"``.
        config: :class:`RefusalAblationConfig`.
        metas: Per-prompt metadata.
        show_progress: Show a tqdm bar.
    """
    config = (config or RefusalAblationConfig()).validate()
    layer = config.layer or (pair.n_layers + 1) // 2
    validate_layers([layer], pair.n_layers, what="refusal_ablation layer")
    source = mode if config.direction_from == "attacked" else "base"
    with model_mode(pair, source):
        direction = refusal_direction(
            pair, harmful, harmless, layer, token_index=config.token_index,
            batch_size=config.batch_size,
        )
    centres = None
    with model_mode(pair, mode):
        if config.projection == "harmless_mean" and float(direction.norm()) > 0:
            centres = projection_means(
                pair.model, pair.tokenizer, harmless, direction, token_index=config.token_index
            )
    with (
        model_mode(pair, mode),
        ablation(pair.model, direction, centres=centres, positions=config.positions),
    ):
        responses = generate_responses(
            pair, prompts, mode=mode, max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size, show_progress=show_progress,
        )
    run = AttackRun(
        "refusal_ablation", mode, list(prompts), responses, metas=copy_metas(metas, len(prompts))
    )
    run.extra = {
        "layer": layer,
        "direction_from": source,
        "direction_norm": float(direction.norm()),
        "centres": centres,
        "config": asdict(config),
    }
    return run


@register_attack
class RefusalAblationAttack(Attack):
    """:func:`refusal_ablation_attack` on ``suite.harmful``, the direction from
    ``suite.repe_positive`` minus ``suite.repe_negative``."""

    name = "refusal_ablation"
    Options = RefusalAblationConfig
    generation_fields = ("max_new_tokens", "batch_size")
    order = 72
    in_default = False
    meta_key = "refusal_ablation"
    description = "difference-of-means refusal direction projected out of every layer (Arditi)"

    def check(self, ctx: AttackContext, options: RefusalAblationConfig) -> None:
        """Also refuse a layer the model does not have.

        Raises:
            LayerError: A layer outside ``1 .. n_layers``.
        """
        super().check(ctx, options)
        if options.layer is not None:
            validate_layers([options.layer], ctx.pair.n_layers, what="refusal_ablation layer")

    def run(self, ctx: AttackContext, mode: str, options: RefusalAblationConfig) -> AttackRun:
        """Ablate while answering; answers get the shared budget and batch size."""
        config = RefusalAblationConfig(
            **{
                **asdict(options),
                "max_new_tokens": ctx.generation.max_new_tokens,
                "batch_size": ctx.generation.batch_size,
            }
        )
        return refusal_ablation_attack(
            ctx.pair, item_prompts(ctx.suite.harmful), harmful=ctx.suite.repe_positive,
            harmless=ctx.suite.repe_negative, mode=mode, config=config,
            metas=item_metas(ctx.suite.harmful), show_progress=ctx.show_progress,
        )

    def run_meta(self, run: AttackRun) -> dict[str, Any]:
        """The layer, where the direction was read, its norm, the config."""
        return dict(run.extra)
