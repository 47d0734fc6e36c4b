"""Native Hugging Face compute under the bridge while no hook inside a component is in use.

TransformerLens's bridge re-implements some components so that their internal hook points can
fire: rotary-embedding attention is re-implemented step by step in eager PyTorch
(``PositionEmbeddingsAttentionBridge.forward``, for ``hook_attn_scores``, ``hook_pattern`` ...),
and each normalisation computes its statistics a second time for ``hook_scale`` /
``hook_normalized`` before calling the HF module. Training and cosine traces only read
``blocks.{l}.hook_resid_post``, yet every forward and backward paid for both.

:func:`install` gives each such component a dispatching ``forward``: while none of the hook
points inside it has a hook (a ``run_with_cache`` or a user's hook adds one), the HF module runs
itself (attention through PyTorch's ``scaled_dot_product_attention``); otherwise the bridge's own
hooked forward runs, so every hook still sees what it always saw.

Attention: the HF module gets a private copy of its config with ``_attn_implementation =
"sdpa"``; the model-level config stays as the bridge set it (``eager``), so the mask the HF model
builds is the additive float mask, which the SDPA kernel takes as is. The q/k/v/o projections are
the same modules (LoRA layers included) on both paths. Normalisation: only bridges whose hooked
path already returns the HF module's output when no hook edits it (``use_native_layernorm_autograd``)
are switched, so the numbers are bit-identical.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

NATIVE_IMPLEMENTATION = "sdpa"


def _hook_points(component: nn.Module) -> list[nn.Module]:
    """The component's hook points (its own and its sub-bridges'), found once."""
    from transformer_lens.hook_points import HookPoint

    return [m for m in component.modules() if isinstance(m, HookPoint)]


def _dispatching_forward(component: nn.Module, native: Callable[..., Any]) -> Callable[..., Any]:
    hooked_forward = type(component).forward.__get__(component)
    hook_points = _hook_points(component)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if any(h._forward_hooks or h._forward_pre_hooks or h._backward_hooks for h in hook_points):
            return hooked_forward(*args, **kwargs)
        return native(*args, **kwargs)

    return forward


def _native_norm(hf_norm: nn.Module) -> Callable[..., Any]:
    def forward(hidden_states: Any, **_: Any) -> Any:
        result = hf_norm(hidden_states)
        return result if result.dtype == hidden_states.dtype else result.to(hidden_states.dtype)

    return forward


def install(bridge: nn.Module) -> int:
    """Give the bridge's re-implemented attention and normalisation modules a native fast path.

    Args:
        bridge: A ``TransformerBridge``.

    Returns:
        The number of components that got the fast path (0 when the architecture's components
        are not re-implemented by the bridge or this TransformerLens has another layout).
    """
    try:
        from transformer_lens.model_bridge.generalized_components.normalization import (
            NormalizationBridge,
        )
        from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (  # noqa: E501
            PositionEmbeddingsAttentionBridge,
        )
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # another TransformerLens / transformers layout: keep the bridge's path
        return 0
    original_model = getattr(bridge, "original_model", None)
    sdpa = NATIVE_IMPLEMENTATION in ALL_ATTENTION_FUNCTIONS and bool(
        getattr(original_model, "_supports_sdpa", False)
    )
    installed = 0
    for module in bridge.modules():
        original = getattr(module, "original_component", None)
        if original is None:
            continue
        if isinstance(module, PositionEmbeddingsAttentionBridge) and sdpa:
            config = getattr(original, "config", None)
            if config is None or not hasattr(config, "_attn_implementation"):
                continue
            native_config = copy.copy(config)
            native_config._attn_implementation = NATIVE_IMPLEMENTATION
            # nn.Module.__setattr__ would register these on the module; keep them plain.
            object.__setattr__(original, "config", native_config)
            object.__setattr__(module, "forward", _dispatching_forward(module, original))
            installed += 1
        elif (
            isinstance(module, NormalizationBridge)
            and getattr(module, "use_native_layernorm_autograd", False)
            and not isinstance(original, nn.Identity)
        ):
            native = _native_norm(original)
            object.__setattr__(module, "forward", _dispatching_forward(module, native))
            installed += 1
    logger.debug("native fast path on %d bridge components", installed)
    return installed
