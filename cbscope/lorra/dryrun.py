"""``cbscope train --dry-run``: check the data, print the plan, estimate the memory, load no
weights (so it runs on a laptop for a 8B run meant for a GPU).

The model's config and tokenizer are read (small files); the data are built and encoded with
the tokenizer, and the data order of every step is made, so a missing file, a record without a
field or a conversation the chat template rejects is named as it would be by the real run. Data
the *base model* must answer (a CSV of prompts, the ``smollm2``/``gemma3`` presets) cannot be
built without the weights: a dry run says so.

Memory is an estimate for one process, from the parameter count (the model built on the
``meta`` device, which allocates nothing) and the activation rule of Korthikanti et al. (2022,
"Reducing Activation Recomputation in Large Transformer Models"): ``34 s b h + 5 a s^2 b``
bytes per block in 16-bit (``s`` tokens per row, ``b`` rows, ``h`` d_model, ``a`` heads),
twice that in fp32, for the adapted forwards that keep their graphs; with gradient
checkpointing, ``2 s b h`` bytes (16-bit) per block plus one block's full activations. The
frozen forwards keep no graph. Attention implementations that do not store the ``s^2`` scores
(SDPA, flash) need less; treat the number as an upper bound for planning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from cbscope.errors import ConfigError

logger = logging.getLogger(__name__)

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class DryRunReport:
    """What a dry run found: the plan, the data sizes and the memory estimate (bytes)."""

    plan: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"plan": self.plan, "data": self.data, "memory": self.memory}

    def text(self) -> str:
        """A human-readable summary."""
        lines = ["dry run: nothing trained, no weights loaded"]
        for key, value in self.plan.items():
            lines.append(f"  {key}: {value}")
        lines.append("  data: " + ", ".join(f"{k} {v}" for k, v in self.data.items()))
        gib = {k: round(v / GIB, 2) for k, v in self.memory.items() if isinstance(v, (int, float))}
        lines.append("  memory estimate (GiB): " + ", ".join(f"{k} {v}" for k, v in gib.items()))
        return "\n".join(lines)


def _parameter_count(hf_config: Any) -> int:
    """The model's parameter count, from a model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def estimate_memory(hf_config: Any, lorra: Any, *, n_params: int, lora_params: int,
                    rows: list[tuple[int, int]], blocks_run: int) -> dict[str, float]:
    """The memory estimate of one training step (bytes), see the module docstring.

    Args:
        hf_config: The model's transformers config (``hidden_size``, ``num_attention_heads``).
        lorra: The run's LoRRA config (``dtype``, ``gradient_checkpointing``).
        n_params: Base model parameters.
        lora_params: LoRA parameters.
        rows: ``(rows, tokens per row)`` of each adapted forward whose graph is kept until the
            backward pass.
        blocks_run: Decoder blocks the forwards run through.
    """
    dtype = "float32" if lorra.dtype == "auto" else str(lorra.dtype)
    width = BYTES.get(dtype, 4)
    scale = width / 2  # the rule is for 16-bit activations
    h = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    activations = 0.0
    for b, s in rows:
        full = (34 * s * b * h + 5 * heads * s * s * b) * scale
        if lorra.gradient_checkpointing:
            activations += 2 * s * b * h * scale * blocks_run + full
        else:
            activations += full * blocks_run
    weights = n_params * width
    lora = lora_params * width * 4  # weights, gradients, AdamW's two moments
    return {"weights": float(weights), "lora_and_optimizer": float(lora),
            "activations": float(activations), "total": float(weights + lora + activations)}


def dry_run(runner: Any) -> DryRunReport:
    """Check a run without loading its weights (see the module docstring).

    Raises:
        CbscopeError: Whatever the real run would raise before training: bad config, missing
            files, malformed records (named), data that need the model to answer.
    """
    from transformers import AutoConfig, AutoTokenizer

    from cbscope.lorra.data import EncodedData, make_plan
    from cbscope.models import resolve_model

    plan = runner.plan()
    lorra = plan.lorra
    resolved = resolve_model(runner._model_spec())
    hf_config = AutoConfig.from_pretrained(str(resolved.path))
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    n_layers = int(hf_config.num_hidden_layers)
    targets = lorra.resolved_target_layers(n_layers)
    retain_layers = lorra.resolved_retain_layers(n_layers)
    blocks = lorra.resolved_lora_layers(n_layers)
    # what data builders read of a pair; the config lets cached generations be found
    stub = SimpleNamespace(tokenizer=tokenizer, resolved=resolved, n_layers=n_layers,
                           d_model=int(hf_config.hidden_size), model=SimpleNamespace(config=hf_config))
    try:
        data = runner._build_data(stub, lorra, False)
    except AttributeError as err:  # the data builder wanted the model itself
        raise ConfigError(
            "this run's data need the base model to answer prompts (or to generate), which a dry "
            f"run does not load ({err}); give the answers in JSONL files to check them dry"
        ) from err
    encoded = EncodedData(data, tokenizer, lorra)
    steps = make_plan(len(encoded.cb), encoded.sizes(), lorra)
    n_params = _parameter_count(hf_config)
    modules = set(lorra.lora_target_modules)
    lora_params = 0
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_config)
    for name, module in meta.named_modules():
        parts = name.split(".")
        if parts[-1] in modules and hasattr(module, "in_features"):
            block = next((int(p) for p in parts if p.isdigit()), None)
            if block in blocks:
                lora_params += lorra.lora_r * (module.in_features + module.out_features)
    top = max([*targets, *retain_layers])
    if lorra.recipe == "official":
        cb_len = lorra.cb_max_length or lorra.max_length
        rows = [(lorra.batch_size, cb_len), (lorra.batch_size, lorra.max_length)]
    else:
        widths = [encoded.batch(entry).input_ids.shape[1] for entry in steps]
        rows = [(2 * lorra.batch_size, max(widths))]
    memory = estimate_memory(hf_config, lorra, n_params=n_params, lora_params=lora_params,
                             rows=rows, blocks_run=min(top, n_layers))
    report = DryRunReport(
        plan={
            "model": str(resolved.path), "recipe": lorra.recipe, "loss": lorra.loss,
            "steps": lorra.steps, "batch_size": lorra.batch_size, "target_layers": targets,
            "retain_layers": retain_layers, "lora_blocks": f"{blocks[0]}..{blocks[-1]}",
            "dtype": lorra.dtype, "lora_b_init_std": lorra.lora_b_init_std,
            "parameters": n_params, "lora_parameters": lora_params,
            "rows_per_adapted_forward": rows, "out": str(runner.cfg.out),
        },
        data={**data.sizes(), "steps_planned": len(steps)},
        memory=memory,
    )
    logger.info("%s", report.text())
    return report
