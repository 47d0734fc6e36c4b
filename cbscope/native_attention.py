"""Native attention under the bridge while no attention hook is in use.

TransformerLens's bridge re-implements rotary-embedding attention step by step in eager PyTorch
(``PositionEmbeddingsAttentionBridge.forward``) so that ``hook_attn_scores``, ``hook_pattern`` and
friends can fire. Training and cosine traces only read ``blocks.{l}.hook_resid_post``, yet every
forward and backward paid for the eager re-implementation. :func:`install` gives each such
attention bridge a dispatching ``forward``: while none of the hook points inside it has a hook
(a ``run_with_cache`` or a user's attention hook adds one), the Hugging Face attention module runs
itself with PyTorch's ``scaled_dot_product_attention``; otherwise the bridge's own hooked
re-implementation runs, so every hook still sees what it always saw.

The HF module gets a private copy of its config with ``_attn_implementation = "sdpa"``; the
model-level config stays as the bridge set it (``eager``), so the mask the HF model builds is the
additive float mask, which the SDPA kernel takes as is. The q/k/v/o projections are the same
modules (LoRA layers included) on both paths.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

NATIVE_IMPLEMENTATION = "sdpa"


def _hook_points(bridge_attention: nn.Module) -> list[nn.Module]:
    """The attention bridge's hook points (its own and its q/k/v/o bridges'), found once."""
    from transformer_lens.hook_points import HookPoint

    return [m for m in bridge_attention.modules() if isinstance(m, HookPoint)]


def _dispatching_forward(bridge_attention: nn.Module, hf_attention: nn.Module) -> Any:
    hooked_forward = type(bridge_attention).forward.__get__(bridge_attention)
    hook_points = _hook_points(bridge_attention)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if any(h._forward_hooks or h._forward_pre_hooks or h._backward_hooks for h in hook_points):
            return hooked_forward(*args, **kwargs)
        return hf_attention(*args, **kwargs)

    return forward


def install(bridge: nn.Module) -> int:
    """Give the bridge's re-implemented attention modules a native fast path.

    Args:
        bridge: A ``TransformerBridge``.

    Returns:
        The number of attention modules that got the fast path (0 when the architecture's
        attention is not re-implemented by the bridge or its HF module cannot use SDPA).
    """
    try:
        from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (  # noqa: E501
            PositionEmbeddingsAttentionBridge,
        )
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # another TransformerLens / transformers layout: keep the bridge's path
        return 0
    if NATIVE_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        return 0
    original_model = getattr(bridge, "original_model", None)
    if original_model is None or not getattr(original_model, "_supports_sdpa", False):
        return 0
    installed = 0
    for module in bridge.modules():
        if not isinstance(module, PositionEmbeddingsAttentionBridge):
            continue
        hf_attention = getattr(module, "original_component", None)
        config = getattr(hf_attention, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            continue
        native_config = copy.copy(config)
        native_config._attn_implementation = NATIVE_IMPLEMENTATION
        # nn.Module.__setattr__ would register these on the bridge; keep them plain attributes.
        object.__setattr__(hf_attention, "config", native_config)
        object.__setattr__(module, "forward", _dispatching_forward(module, hf_attention))
        installed += 1
    logger.debug("native attention on %d attention modules", installed)
    return installed
