"""ModelPair: one model in two states, original (adapters off) and circuit-broken (adapters on).

A circuit breaker is a LoRA adapter; the "original" model is the same weights with the adapter
disabled (as in the paper's code). A :class:`ModelPair` holds:

- ``model``: the Hugging Face causal LM, with peft LoRA layers injected in place when an adapter
  is present;
- ``peft_model``: the :class:`peft.PeftModel` around it (``None`` without an adapter);
- ``bridge``: a TransformerLens ``TransformerBridge`` over ``model``, giving canonical hook points
  (``blocks.{b}.hook_resid_post`` ...) in both states.

The bridge replaces modules in place (their weights move under ``._original_component``), and a
bridged model's key-value cache is wrong in ``generate`` (seen with SmolLM2: fluent text without
the cache, garbage with it). So the bridge wraps a *structural copy* of the model that shares
every parameter and buffer with it: hook points and training go through the bridge, fast cached
generation through the untouched model, and both always compute with the same weights. Adapters
are switched on and off in both module trees at once (:meth:`ModelPair.original`). Peft's
state-dict keys therefore carry no ``._original_component``; :meth:`ModelPair.save_adapter`
strips it anyway, since a bridged key would make peft reload random adapters silently.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from cbscope import native_paths
from cbscope.errors import AdapterMismatchError, MissingFileError
from cbscope.io import replace_folder
from cbscope.layers import adapter_target_layers, resid_hook_name, validate_layers
from cbscope.models import (
    BUILTIN_SPECS,
    ResolvedModel,
    canonical_spec,
    parse_dtype,
    resolve_model,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BRIDGE_KEY_INFIX = "._original_component"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_META = "cbscope_adapter.json"



class _StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised from the last needed hook so the rest of the forward (and the unembedding) is skipped."""


def model_fingerprint(config: Any) -> dict[str, Any]:
    """Architecture facts an adapter depends on (saved beside it, checked on load)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    facts = {key: getattr(config, key, None) for key in keys}
    facts["digest"] = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return facts


def strip_bridge_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove the bridge's ``._original_component`` from peft state-dict keys."""
    return {key.replace(BRIDGE_KEY_INFIX, ""): value for key, value in state_dict.items()}


@dataclass(frozen=True)
class _ModuleWalk:
    """What :meth:`ModelPair._modules` found for one adapter set (``key``): every LoRA layer in
    both module trees, the unique modules of the bridge and its wrapped model, and the LoRA
    parameters."""

    key: tuple[str, ...]
    lora_layers: list[Any]
    bridged: list[Any]
    lora_parameters: list[Any]


@runtime_checkable
class PairLike(Protocol):
    """What traces, attacks and explanations need of a model pair.

    :class:`ModelPair` is the implementation; anything with these members (a test double, a
    wrapper around another model) can be traced and attacked the same way.
    """

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, with a chat template and a pad token."""
        ...

    @property
    def device(self) -> torch.device:
        """Where inputs go (the input embeddings' device)."""
        ...

    @property
    def bridge(self) -> TransformerBridge:
        """The TransformerLens bridge over the model (hook points, both states)."""
        ...

    @property
    def generator(self) -> Any:
        """The module to call ``generate`` on, in the current state."""
        ...

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks (paper layers run ``1 .. n_layers``)."""
        ...

    def original(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which the adapters are off (the frozen, original model)."""
        ...

    def resid(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None,
        layers: Sequence[int],
    ) -> Float[Tensor, "layer batch pos d_model"]:
        """Residual stream at paper-convention ``layers``."""
        ...


@dataclass
class ModelPair:
    """A base model and its circuit-breaker adapter, with TransformerLens hook points.

    Use :func:`load_pair` to make one. Outside ``with pair.original():`` the adapters are on.
    It implements :class:`PairLike`.

    Attributes:
        model: The Hugging Face causal LM (peft LoRA layers injected in place, if any).
        tokenizer: Its tokenizer (a pad token is always set).
        bridge: The TransformerLens bridge over a structural copy of ``model``.
        resolved: Where the model spec pointed.
        peft_model: The :class:`peft.PeftModel` around ``model`` (None without an adapter).
        adapter_path: The adapter folder it was loaded from (None: fresh or none).
        device: Where inputs go.
        dtype: The weights' dtype.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    bridge: TransformerBridge
    resolved: ResolvedModel
    peft_model: PeftModel | None = None
    adapter_path: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    _walk: _ModuleWalk | None = field(default=None, init=False, repr=False)

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks (paper layers run ``1 .. n_layers``)."""
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.model.config.hidden_size)

    @property
    def target_layers(self) -> list[int]:
        """The layers the adapter was trained to reroute (its ``lorra_config.json``; the
        paper's default for this depth without one)."""
        return adapter_target_layers(self.adapter_path, self.n_layers)

    @property
    def has_adapter(self) -> bool:
        """True when a LoRA adapter is attached."""
        return self.peft_model is not None

    @property
    def generator(self) -> PeftModel | PreTrainedModel:
        """The module to call ``generate`` on: the peft model (adapters on) or the base model."""
        return self.peft_model if self.peft_model is not None else self.model

    def _modules(self) -> _ModuleWalk:
        """The module lists the per-step calls need, from one walk over the module trees, redone
        only when peft's adapter set changes (walking thousands of modules on every call showed
        up in the per-step overhead)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        key = tuple(self.peft_model.peft_config) if self.peft_model is not None else ()
        if self._walk is None or self._walk.key != key:
            bridged = [self.bridge, getattr(self.bridge, "original_model", None)]
            bridged_modules = {id(m): m for tree in bridged if tree is not None for m in tree.modules()}
            every = {id(m): m for m in self.model.modules()} | bridged_modules
            self._walk = _ModuleWalk(
                key=key,
                lora_layers=[m for m in every.values() if isinstance(m, BaseTunerLayer)],
                bridged=list(bridged_modules.values()),
                lora_parameters=[p for name, p in self.model.named_parameters() if "lora_" in name],
            )
        return self._walk

    def set_training(self, training: bool) -> None:
        """``bridge.train(training)`` without its cost: the recursive ``train()`` walk revisits
        shared modules and took ~0.5 s of a 6 s SmolLM2 training step (three calls a step). The
        flag is set directly on a cached list of the unique modules of the bridge and its
        wrapped model (the same set ``train()`` reaches)."""
        for module in self._modules().bridged:
            module.__dict__["training"] = training  # nn.Module.__setattr__ is the slow part

    @contextlib.contextmanager
    def original(self) -> Iterator[ModelPair]:
        """Run with the adapters disabled: the frozen, original model (bridge and ``generate``)."""
        layers = self._modules().lora_layers if self.peft_model is not None else []
        previous = [layer._disable_adapters for layer in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            yield self
        finally:
            for layer, state in zip(layers, previous, strict=True):
                layer._disable_adapters = state

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA parameters (empty without an adapter), found once per adapter set (the
        trainer asks every step, for gradient clipping)."""
        return list(self._modules().lora_parameters)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute decoder-block activations in the backward pass of bridge forwards.

        Uses transformers' non-reentrant checkpointing (the reentrant kind passes no gradient to
        LoRA weights when the block inputs, frozen embeddings, need none) on the bridged copy;
        it only acts in training mode with gradients enabled. ``generate`` is unaffected.
        """
        hf_model = self.bridge.original_model
        kwargs = {"use_reentrant": False}
        if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.x names
            if enabled:
                hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                hf_model.activation_checkpointing_disable()
        elif enabled:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            hf_model.gradient_checkpointing_disable()

    def resid(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None,
        layers: Sequence[int],
    ) -> Float[Tensor, "layer batch pos d_model"]:
        """Residual stream at paper-convention ``layers``, read at ``blocks.{l-1}.hook_resid_post``.

        The forward stops right after the highest requested layer: the remaining blocks and the
        unembedding are never computed. Gradients flow when enabled by the caller (the hook
        tensors are not detached). Hooks always come off.

        Args:
            input_ids: Token ids, right padded.
            attention_mask: 1 for real tokens, 0 for padding.
            layers: Paper-convention layers (``1 .. n_layers``).
        """
        return torch.stack(self.resid_layers(input_ids, attention_mask, layers))

    def resid_layers(
        self,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None,
        layers: Sequence[int],
    ) -> list[Float[Tensor, "batch pos d_model"]]:
        """:meth:`resid` as one tensor per layer (sorted by layer), not stacked: the trainer
        takes row blocks of them without the copy and the full-size backward of a stack."""
        layers = validate_layers(layers, self.n_layers)
        captured: dict[int, Tensor] = {}
        last = layers[-1]

        def make_hook(layer: int):
            def hook(activation: Tensor, hook: Any) -> None:
                captured[layer] = activation
                if layer == last:
                    raise _StopForward

            return hook

        fwd_hooks = [(resid_hook_name(layer), make_hook(layer)) for layer in layers]
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        with contextlib.suppress(_StopForward), self.bridge.hooks(fwd_hooks=fwd_hooks):
            self.bridge(input_ids, attention_mask=attention_mask, return_type=None)
        missing = [layer for layer in layers if layer not in captured]
        if missing:
            raise RuntimeError(f"hooks for layers {missing} did not fire")
        return [captured[layer] for layer in layers]

    def save_adapter(self, out_dir: str | os.PathLike[str], *, extra: dict | None = None) -> Path:
        """Save the adapter in peft format, loadable by plain ``PeftModel.from_pretrained``.

        Written into a temporary folder and renamed, so an existing adapter is never left half
        overwritten.

        Args:
            out_dir: Target folder (replaced if it exists).
            extra: Extra metadata stored in ``cbscope_adapter.json``.
        """
        if self.peft_model is None:
            raise ValueError("this pair has no adapter to save")
        from peft import get_peft_model_state_dict

        out = Path(out_dir)
        tmp = out.with_name(out.name + ".saving")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = get_peft_model_state_dict(self.peft_model)
        state = {k: v.detach().to("cpu").contiguous() for k, v in strip_bridge_keys(state).items()}
        if not state:
            raise RuntimeError("the adapter has no weights to save")
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        peft_config = self.peft_model.peft_config["default"]
        # A built-in spec resolves anywhere; a machine-local path would leak into shared adapters.
        spec = canonical_spec(self.resolved.spec)
        base = spec if spec in BUILTIN_SPECS else str(self.resolved.path)
        peft_config.base_model_name_or_path = base
        peft_config.save_pretrained(str(tmp))
        meta = {
            "base_model": self.resolved.spec,
            "base_model_path": base,
            "fingerprint": model_fingerprint(self.model.config),
            **(extra or {}),
        }
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
        return replace_folder(tmp, out)


def shared_weight_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model``."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


#: Weight files that only a pickle loader reads (peft and torch would run their code).
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


def check_adapter_files(adapter_dir: Path) -> None:
    """Check an adapter folder before anything loads it: a readable ``adapter_config.json``,
    a ``cbscope_adapter.json`` (when present) that is a JSON object, and safetensors weights
    whose header is complete. Pickle weights are never loaded.

    Raises:
        MissingFileError: No weights file.
        AdapterMismatchError: No such folder, a config or metadata file that is not JSON, pickle-only weights,
            or a truncated / damaged safetensors file (one line each).
    """
    from safetensors import safe_open

    if not adapter_dir.is_dir():
        raise AdapterMismatchError(f"adapter folder {adapter_dir} does not exist")
    for name, required in ((ADAPTER_CONFIG, True), (ADAPTER_META, False)):
        path = adapter_dir / name
        if not path.is_file():
            if required:
                raise AdapterMismatchError(f"{adapter_dir} is not a peft adapter folder (no {name})")
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdapterMismatchError(f"{path} is not valid JSON ({err}); restore it from the "
                                       "run that wrote the adapter") from err
        if not isinstance(data, dict):
            raise AdapterMismatchError(f"{path} must hold a JSON object, not {type(data).__name__}")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = [name for name in PICKLE_WEIGHTS if (adapter_dir / name).is_file()]
        if pickles:
            raise AdapterMismatchError(
                f"{adapter_dir} holds only pickle weights ({', '.join(pickles)}); cbscope loads "
                f"{ADAPTER_WEIGHTS} only, since unpickling can run code: convert it with "
                "safetensors in a trusted environment"
            )
        raise MissingFileError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(weights), "pt") as handle:
            handle.keys()
    except Exception as err:  # safetensors raises its own SafetensorError
        raise AdapterMismatchError(
            f"{weights} is damaged or truncated ({err}); copy or train the adapter again"
        ) from err


def _check_adapter_fits(adapter_dir: Path, model: Any, resolved: ResolvedModel) -> None:
    """Raise :class:`AdapterMismatchError` when the adapter's saved fingerprint differs."""
    meta_path = adapter_dir / ADAPTER_META
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    saved = meta.get("fingerprint", {})
    if not isinstance(saved, dict):
        raise AdapterMismatchError(f"{meta_path}: 'fingerprint' must be a JSON object")
    current = model_fingerprint(model.config)
    if saved and saved.get("digest") != current["digest"]:
        differ = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
        raise AdapterMismatchError(
            f"adapter {adapter_dir} was trained on {meta.get('base_model')!r} and does not fit "
            f"model {resolved.spec!r}: (adapter, model) differ in {differ}"
        )


def _verify_loaded_adapter(adapter_dir: Path, peft_model: Any) -> None:
    """Check every saved LoRA tensor landed in the model (peft only warns on missing keys)."""
    saved = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    live = {
        name.replace(".default", ""): param
        for name, param in peft_model.named_parameters()
        if "lora_" in name
    }
    unmatched = [key for key in saved if key not in live]
    if unmatched or len(saved) != len(live):
        raise AdapterMismatchError(
            f"adapter {adapter_dir}: {len(unmatched)} of {len(saved)} saved tensors match no LoRA "
            f"parameter of the model (e.g. {unmatched[:2]}); was it saved with bridge keys?"
        )
    for key, tensor in saved.items():
        if not torch.equal(live[key].detach().cpu().to(tensor.dtype), tensor):
            raise AdapterMismatchError(f"adapter {adapter_dir}: tensor {key} did not load")


def load_hf_model(
    resolved: ResolvedModel,
    *,
    device: torch.device,
    dtype: torch.dtype | str,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Load a resolved model folder with transformers (offline, no remote code).

    ``dtype="auto"`` keeps the checkpoint's own dtype; with ``device_map`` accelerate places
    the weights (``device`` is then not used).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(
            str(resolved.path), dtype=dtype, device_map=device_map
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(resolved.path), dtype=dtype)
        model.to(device)
    model.eval()
    return model, tokenizer


def load_pair(
    spec: str | os.PathLike[str] | ResolvedModel = "organism",
    adapter: str | os.PathLike[str] | None = None,
    *,
    lora_config: Any | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "float32",
    device_map: str | dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> ModelPair:
    """Load a model spec, optionally with a LoRA adapter, and bridge it for hook points.

    Args:
        spec: Model spec (``"organism"``, ``"smollm2-135m"``, ``"gemma3-270m"``, a folder or a
            hub name).
        adapter: A peft adapter folder to load (the circuit breaker), or ``None``.
        lora_config: A :class:`peft.LoraConfig` for a fresh, trainable adapter (instead of
            ``adapter``); used by the trainer.
        device: Torch device.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a torch dtype, or ``"auto"`` (the
            checkpoint's own dtype).
        device_map: For inference on models larger than one device: a transformers/accelerate
            device map (``"auto"``, ``"balanced"``, a dict) that spreads the layers over the
            visible GPUs (and the CPU); ``device`` is then ignored and ``pair.device`` is the
            device of the input embeddings. Not for training (use ``accelerate launch``).
        gradient_checkpointing: Recompute block activations in the backward pass
            (:meth:`ModelPair.set_gradient_checkpointing`).

    Raises:
        ModelSpecError: If the spec cannot be resolved.
        MissingFileError: If the adapter folder has no weights file.
        AdapterMismatchError: If the adapter does not fit the model, or one of its files is
            damaged (not JSON, truncated safetensors, pickle-only weights).
    """
    from peft import PeftModel, get_peft_model
    from transformer_lens.model_bridge import TransformerBridge

    if adapter is not None and lora_config is not None:
        raise ValueError("give either an adapter folder or a fresh lora_config, not both")
    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    if adapter is not None:
        check_adapter_files(Path(adapter))  # before the base model is loaded
    torch_device = torch.device(device)
    auto_dtype = isinstance(dtype, str) and dtype.lower() == "auto"
    torch_dtype = parse_dtype(None if auto_dtype else dtype)
    model, tokenizer = load_hf_model(
        resolved,
        device=torch_device,
        dtype="auto" if auto_dtype else torch_dtype,
        device_map=device_map,
    )
    if auto_dtype:
        torch_dtype = model.dtype
    if device_map is not None:
        torch_device = model.get_input_embeddings().weight.device

    peft_model = None
    adapter_path = None
    if adapter is not None:
        adapter_path = Path(adapter)
        _check_adapter_fits(adapter_path, model, resolved)
        try:
            peft_model = PeftModel.from_pretrained(model, str(adapter_path))
        except (RuntimeError, ValueError, KeyError) as err:
            raise AdapterMismatchError(
                f"adapter {adapter_path} does not fit model {resolved.spec!r}: {err}"
            ) from err
        _verify_loaded_adapter(adapter_path, peft_model)
        peft_model.eval()
    elif lora_config is not None:
        peft_model = get_peft_model(model, lora_config)
    if peft_model is not None:
        if device_map is None:
            peft_model.to(torch_device)
        model = peft_model.base_model.model

    bridge = TransformerBridge.boot_transformers(
        str(resolved.path),
        hf_model=shared_weight_copy(model),
        tokenizer=tokenizer,
        device=None if device_map is not None else torch_device,
        dtype=torch_dtype,
    )
    bridge.eval()
    native_paths.install(bridge)
    if peft_model is not None:
        native_paths.install_lora(model, bridge)
    pair = ModelPair(
        model=model,
        tokenizer=tokenizer,
        bridge=bridge,
        resolved=resolved,
        peft_model=peft_model,
        adapter_path=adapter_path,
        device=torch_device,
        dtype=torch_dtype,
    )
    if gradient_checkpointing:
        pair.set_gradient_checkpointing(True)
    return pair
