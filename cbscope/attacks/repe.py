"""RepE steering attack: add a difference-of-means direction to the residual stream.

The direction, per paper-convention layer ``l``, is

    d_l = mean(h_l(positive)) - mean(h_l(negative))

read at ``blocks.{l-1}.hook_resid_post`` through the pair's bridge, at the last token of the
chat-formatted prompt (the assistant header, where the model decides how to answer) or at
``token_index`` from the end. Positive/negative are harmful vs harmless requests (the default) or
any two sets, e.g. requests followed by a refusal vs by a compliant prefix
(:func:`refusal_compliance_sets`).

During generation the attack adds ``coeff * d_l`` to the output of decoder block ``l - 1`` (that is
``hidden_states[l]``, the same point) through plain torch forward hooks on
``pair.model.model.layers[l - 1]``; generation itself runs on ``pair.generator`` (not bridged, KV
cache on). With ``coeff = -1`` a harmful request's representation moves onto the harmless mean:
the model no longer "sees" harm. By default only the *prompt* positions are steered (the forward
pass over the whole prompt; with the KV cache every later pass holds one new token): steering the
generated tokens too also moves them toward the harmless mean, which erases *what* was asked (on
the organism the base model then loops on benign words instead of answering). ``positions="all"``
steers every position. The hooks are removed in a ``finally`` (:func:`steering`).

The direction is computed in the attacked mode (a white-box attacker reads the model it attacks).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from cbscope.attacks.base import AttackRun, copy_metas, model_mode
from cbscope.attacks.generate import generate_responses
from cbscope.attacks.options import check_finite
from cbscope.attacks.protocol import Attack, AttackContext
from cbscope.attacks.registry import register_attack
from cbscope.attacks.suite import item_metas, item_prompts
from cbscope.data import encode_chat, pad_id_of, pad_right
from cbscope.errors import ConfigError
from cbscope.layers import default_target_layers, validate_layers

if TYPE_CHECKING:
    from cbscope.pair import ModelPair

logger = logging.getLogger(__name__)

Prompt = str | tuple[str, str]


@dataclass
class RepeConfig:
    """Options of the RepE steering attack.

    Attributes:
        layers: Paper-convention layers to steer (``None``: the paper's target layers scaled to
            the model, :func:`cbscope.layers.default_target_layers`).
        coeff: Multiplier of the direction added to the residual stream (``-1``: move harmful
            onto harmless).
        token_index: Position (from the end of the formatted prompt) where directions are read.
        positions: ``"prompt"`` (steer the prompt only) or ``"all"`` (every generated token too).
        max_new_tokens: Generation budget.
        batch_size: Prompts per forward / generate call.
    """

    layers: list[int] | None = None
    coeff: float = -1.0
    token_index: int = -1
    positions: str = "prompt"
    max_new_tokens: int = 32
    batch_size: int = 32

    def validate(self) -> RepeConfig:
        """Check value ranges; returns ``self``.

        Raises:
            ConfigError: Unknown positions, a non-positive budget or batch, a non-finite coeff.
        """
        check_finite(self, owner="repe")
        if self.positions not in ("all", "prompt"):
            raise ConfigError("repe positions must be 'all' or 'prompt'")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("repe max_new_tokens and batch_size must be >= 1")
        if self.layers is not None and (not self.layers or min(self.layers) < 1):
            raise ConfigError(f"repe layers must be paper-convention layers >= 1, not {self.layers}")
        return self


def decoder_layers(model: Any) -> Any:
    """The list of decoder blocks of a Hugging Face causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner.layers
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if hasattr(decoder, "layers"):
            return decoder.layers
    raise TypeError(f"cannot find the decoder blocks of {type(model).__name__}")


@torch.no_grad()
def mean_representations(
    pair: ModelPair,
    prompts: Sequence[Prompt],
    layers: Sequence[int],
    *,
    token_index: int = -1,
    batch_size: int = 32,
) -> Float[Tensor, "layer d_model"]:
    """Mean residual stream at ``layers`` (paper convention) and one position per prompt.

    A prompt is a request string (position counted from the end of the chat-formatted request,
    assistant header included) or a ``(request, response_prefix)`` pair (counted from the end of
    the prefix). Runs in the pair's current adapter state.
    """
    layers = validate_layers(layers, pair.n_layers)
    if not prompts:
        raise ValueError("no prompts to average")
    pad = pad_id_of(pair.tokenizer)
    encoded = []
    for prompt in prompts:
        request, response = (prompt, "") if isinstance(prompt, str) else prompt
        encoded.append(encode_chat(pair.tokenizer, request, response).input_ids)
    total = torch.zeros(len(layers), pair.d_model, dtype=torch.float64)
    for begin in range(0, len(encoded), batch_size):
        chunk = encoded[begin : begin + batch_size]
        ids, mask = pad_right(chunk, pad)
        resid = pair.resid(ids, mask, layers)
        positions = torch.tensor([len(seq) + token_index for seq in chunk])
        if bool((positions < 0).any()):
            raise ValueError(f"token_index {token_index} is before the start of a prompt")
        picked = resid[:, torch.arange(len(chunk)), positions.to(resid.device)]
        total += picked.double().sum(dim=1).cpu()
    return (total / len(encoded)).float()


def difference_of_means(
    pair: ModelPair,
    positive: Sequence[Prompt],
    negative: Sequence[Prompt],
    layers: Sequence[int],
    *,
    token_index: int = -1,
    batch_size: int = 32,
) -> dict[int, Float[Tensor, " d_model"]]:
    """``{layer: mean(positive) - mean(negative)}`` at paper-convention ``layers``."""
    layers = validate_layers(layers, pair.n_layers)
    pos = mean_representations(
        pair, positive, layers, token_index=token_index, batch_size=batch_size
    )
    neg = mean_representations(
        pair, negative, layers, token_index=token_index, batch_size=batch_size
    )
    return {layer: pos[i] - neg[i] for i, layer in enumerate(layers)}


def refusal_compliance_sets(
    requests: Sequence[str], refusal: str, compliance: str
) -> tuple[list[Prompt], list[Prompt]]:
    """``(request, refusal)`` and ``(request, compliance)`` pairs (refusal-vs-compliance)."""
    return [(r, refusal) for r in requests], [(r, compliance) for r in requests]


@contextlib.contextmanager
def steering(
    model: Any, directions: Mapping[int, Tensor], coeff: float = 1.0, *, positions: str = "all"
) -> Iterator[None]:
    """Add ``coeff * directions[l]`` to the output of decoder block ``l - 1`` (paper layer ``l``).

    Plain torch forward hooks on ``model.model.layers[l - 1]``; works during ``generate`` with a
    KV cache. Hooks are removed on exit, even on error.

    Args:
        model: The Hugging Face causal LM (``pair.model``; also what ``pair.generator`` runs).
        directions: ``{paper_layer: [d_model] vector}``.
        coeff: Multiplier.
        positions: ``"all"``: every forward pass; ``"prompt"``: only passes over more than one
            position, i.e. the prompt when generating with a KV cache (single-token decoding
            passes are left alone).
    """
    if positions not in ("all", "prompt"):
        raise ValueError(f"positions must be 'all' or 'prompt', not {positions!r}")
    blocks = decoder_layers(model)
    validate_layers(directions.keys(), len(blocks))
    handles = []

    def make_hook(vector: Tensor):
        def hook(module: Any, inputs: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if positions == "prompt" and hidden.shape[1] == 1:
                return output
            if isinstance(output, tuple):
                hidden = output[0]
                return (hidden + (coeff * vector).to(hidden.device, hidden.dtype), *output[1:])
            return output + (coeff * vector).to(output.device, output.dtype)

        return hook

    try:
        for layer, vector in directions.items():
            handles.append(blocks[layer - 1].register_forward_hook(make_hook(vector.detach())))
        yield
    finally:
        for handle in handles:
            handle.remove()


def repe_attack(
    pair: ModelPair,
    prompts: Sequence[str],
    *,
    positive: Sequence[Prompt],
    negative: Sequence[Prompt],
    mode: str = "cb",
    config: RepeConfig | None = None,
    metas: Sequence[dict[str, Any]] | None = None,
    show_progress: bool = False,
) -> AttackRun:
    """Steer with ``coeff * (mean(positive) - mean(negative))`` while answering ``prompts``.

    Args:
        pair: The model pair.
        prompts: Harmful requests to answer under steering.
        positive: Prompts defining the "+" side (harmful requests).
        negative: Prompts defining the "-" side (harmless requests).
        mode: ``"base"`` or ``"cb"``; the direction is read in the same mode.
        config: :class:`RepeConfig`.
        metas: Per-prompt metadata.
        show_progress: Show a tqdm bar.
    """
    config = config or RepeConfig()
    layers = validate_layers(config.layers or default_target_layers(pair.n_layers), pair.n_layers)
    with model_mode(pair, mode):
        directions = difference_of_means(
            pair,
            positive,
            negative,
            layers,
            token_index=config.token_index,
            batch_size=config.batch_size,
        )
        with steering(pair.model, directions, config.coeff, positions=config.positions):
            responses = generate_responses(
                pair,
                prompts,
                mode=mode,
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                show_progress=show_progress,
            )
    run = AttackRun("repe", mode, list(prompts), responses, metas=copy_metas(metas, len(prompts)))
    run.extra = {
        "layers": layers,
        "coeff": config.coeff,
        "positions": config.positions,
        "direction_norms": {str(layer): float(vec.norm()) for layer, vec in directions.items()},
    }
    return run


@register_attack
class RepeAttack(Attack):
    """:func:`repe_attack` on ``suite.harmful``, the direction from ``suite.repe_positive`` minus
    ``suite.repe_negative`` read in the attacked mode."""

    name = "repe"
    Options = RepeConfig
    options_field = "repe"
    generation_fields = ("max_new_tokens", "batch_size")
    order = 70
    meta_key = "repe"
    description = "difference-of-means steering of the residual stream (forward hooks)"

    def check(self, ctx: AttackContext, options: RepeConfig) -> None:
        """Also refuse layers the model does not have (before any attack runs).

        Raises:
            LayerError: A layer outside ``1 .. n_layers``.
        """
        super().check(ctx, options)
        if options.layers is not None:
            validate_layers(options.layers, ctx.pair.n_layers, what="repe layer")

    def run(self, ctx: AttackContext, mode: str, options: RepeConfig) -> AttackRun:
        """Steer while answering; answers get the shared budget and batch size."""
        config = RepeConfig(
            **{
                **asdict(options),
                "max_new_tokens": ctx.generation.max_new_tokens,
                "batch_size": ctx.generation.batch_size,
            }
        )
        return repe_attack(
            ctx.pair,
            item_prompts(ctx.suite.harmful),
            positive=ctx.suite.repe_positive,
            negative=ctx.suite.repe_negative,
            mode=mode,
            config=config,
            metas=item_metas(ctx.suite.harmful),
        )

    def run_meta(self, run: AttackRun) -> dict[str, Any]:
        """Layers, coefficient, positions and the direction norms."""
        return run.extra
