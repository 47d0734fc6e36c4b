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
hooked forward runs, so every hook still sees what it always saw. Hooks on the component's own
``hook_in`` / ``hook_out`` alone (``blocks.{b}.hook_attn_out``, ``blocks.{b}.hook_resid_mid`` =
``ln2.hook_in``: what the residual-stream decomposition of :mod:`cbscope.explain` reads) keep
the native compute: the two hooks are applied to its input and output, where the hooked forward
applies them.

Attention: the HF module gets a private copy of its config with ``_attn_implementation =
"sdpa"``; the model-level config stays as the bridge set it (``eager``), so the mask the HF model
builds is the additive float mask, which the SDPA kernel takes as is (Gemma-3's sliding-window
layers get their banded mask from the HF model the same way). The q/k/v/o projections, and the q/k
norms where there are some (Gemma-3), are the same modules (LoRA layers included) on both paths.
A model class that does not support SDPA (``_supports_sdpa = False``, e.g. Gemma-2, whose
attention-logit soft-capping SDPA lacks) keeps the bridge's attention. Normalisation: only bridges whose hooked
path already returns the HF module's output when no hook edits it (``use_native_layernorm_autograd``)
are switched, so the numbers are bit-identical.

LoRA layers (:func:`install_lora`): peft's ``lora.Linear.forward`` checks its arguments, loops
over the active adapters and multiplies the low-rank update by ``scaling`` even when that is 1
(``lora_alpha == r``, the organism and benchmark configs), which costs a full-width
multiplication in the forward and another in the backward (about 5% of a SmolLM2 training
step). The lean forward computes ``base(x) + B(A(dropout(x))) [* scaling]`` directly for the
common case (one active vanilla adapter, not merged, no extra arguments, matching dtypes) and
hands everything else to peft; the numbers are bit-identical (multiplying by 1 is exact).
:func:`lora_row_scale` makes the lean forward scale the update per batch row, so that one
batched forward can hold rows of the original model (scale 0) beside the adapted one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

NATIVE_IMPLEMENTATION = "sdpa"
ROW_SCALE = "_cbscope_row_scale"


def _hook_points(component: nn.Module) -> list[nn.Module]:
    """The component's hook points (its own and its sub-bridges'), found once."""
    from transformer_lens.hook_points import HookPoint

    return [m for m in component.modules() if isinstance(m, HookPoint)]


def _has_hooks(point: nn.Module) -> bool:
    return bool(point._forward_hooks or point._forward_pre_hooks or point._backward_hooks)


def _with_edge_hooks(component: nn.Module, native: Callable[..., Any]) -> Callable[..., Any]:
    """``native`` with the component's own ``hook_in`` / ``hook_out`` applied around it, where
    the hooked forward applies them: ``hook_in`` on the input hidden states, ``hook_out`` on the
    output (the first element of attention's ``(output, weights)``)."""
    hook_in, hook_out = component.hook_in, component.hook_out

    def forward(*args: Any, **kwargs: Any) -> Any:
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = hook_in(kwargs["hidden_states"])
        else:
            args = (hook_in(args[0]), *args[1:])
        result = native(*args, **kwargs)
        if isinstance(result, tuple):
            return (hook_out(result[0]), *result[1:])
        return hook_out(result)

    return forward


def _dispatching_forward(component: nn.Module, native: Callable[..., Any]) -> Callable[..., Any]:
    hooked_forward = type(component).forward.__get__(component)
    edges = [getattr(component, "hook_in", None), getattr(component, "hook_out", None)]
    edge_ids = {id(point) for point in edges if point is not None}
    inner = [h for h in _hook_points(component) if id(h) not in edge_ids]
    # per-head results replace the output projection in the hooked forward: never native then
    per_head = bool(getattr(getattr(component, "config", None), "use_attn_result", False))
    edge_native = _with_edge_hooks(component, native) if len(edge_ids) == 2 else None

    def forward(*args: Any, **kwargs: Any) -> Any:
        if per_head or any(_has_hooks(h) for h in inner):
            return hooked_forward(*args, **kwargs)
        if edge_native is not None and any(_has_hooks(h) for h in edges):
            return edge_native(*args, **kwargs)
        if edge_native is None and any(h is not None and _has_hooks(h) for h in edges):
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


def _lean_lora_forward(layer: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
    """peft's ``lora.Linear.forward`` for one active vanilla adapter, without the extra work."""
    if args or kwargs or layer.merged:
        return type(layer).forward(layer, x, *args, **kwargs)
    if layer.disable_adapters:
        return layer.base_layer(x)
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
        return type(layer).forward(layer, x)
    name = active[0]
    lora_a = layer.lora_A[name]
    if x.dtype != lora_a.weight.dtype:
        return type(layer).forward(layer, x)
    result = layer.base_layer(x)
    update = layer.lora_B[name](lora_a(layer.lora_dropout[name](x)))
    scaling = layer.scaling[name]
    if scaling != 1:
        update = update * scaling
    rows = layer.__dict__.get(ROW_SCALE)
    if rows is not None:
        update = update * rows.view(-1, *([1] * (update.dim() - 1))).to(update)
    out = result + update
    return out if out.dtype == result.dtype else out.to(result.dtype)


def row_scale_supported(layers: list[nn.Module], dtype: Any) -> bool:
    """Whether every layer runs the lean forward's own arithmetic for ``dtype`` inputs (one
    active vanilla adapter, not merged, LoRA weights of that dtype), so that
    :func:`lora_row_scale` acts on all of them."""
    for layer in layers:
        if "forward" not in vars(layer) or layer.merged:
            return False
        active = layer.active_adapters
        if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
            return False
        if layer.lora_A[active[0]].weight.dtype != dtype:
            return False
    return True


@contextlib.contextmanager
def lora_row_scale(layers: list[nn.Module], scale: Any) -> Iterator[None]:
    """Multiply the LoRA update of each batch row by ``scale[row]`` in the lean forward.

    With a scale of 0 a row computes the base model exactly (``base(x) + 0``) and with 1 the
    adapted one, so one batched forward runs the original and the circuit-broken model side by
    side (:mod:`cbscope.why.decomposition`). Check :func:`row_scale_supported` first: layers on
    peft's own forward ignore the scale.
    """
    for layer in layers:
        layer.__dict__[ROW_SCALE] = scale
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop(ROW_SCALE, None)


def install_lora(*models: nn.Module) -> int:
    """Give every peft ``lora.Linear`` in ``models`` the lean forward (see the module docstring).

    Args:
        models: Module trees holding peft LoRA layers (a module shared by several trees is
            patched once).

    Returns:
        The number of LoRA layers patched (0 when this peft has another layout).
    """
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    needed = ("merged", "disable_adapters", "active_adapters", "lora_A", "lora_B",
              "lora_dropout", "scaling", "lora_variant", "base_layer")
    layers: dict[int, nn.Module] = {}
    for model in models:
        for module in model.modules():
            # exact type: quantised subclasses (bitsandbytes, ...) keep peft's own forward
            if type(module) is LoraLinear:
                layers[id(module)] = module
    if not all(hasattr(layer, attr) for layer in layers.values() for attr in needed):
        return 0
    for layer in layers.values():
        # a bound method (not a closure): a deep copy of the layer rebinds it to the copy
        object.__setattr__(layer, "forward", types.MethodType(_lean_lora_forward, layer))
    logger.debug("lean LoRA forward on %d layers", len(layers))
    return len(layers)
