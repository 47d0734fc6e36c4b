"""cbscope: circuit breakers (Representation Rerouting) you can train, trace and attack.

Public API (imported lazily, so ``import cbscope`` and the CLI start fast)::

    pair = cbscope.load_pair("organism", adapter="runs/organism-rr")
    trace = cbscope.cosine_trace(pair, ["how do i brew zarnex"], ["sure here is how :"])

Layers everywhere follow the paper's convention: layer ``l`` is ``hidden_states[l]``, the input of
block ``l``, read at ``blocks.{l-1}.hook_resid_post``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "load_pair": "cbscope.pair",
    "ModelPair": "cbscope.pair",
    "AdapterMismatchError": "cbscope.pair",
    "resolve_model": "cbscope.models",
    "ModelSpecError": "cbscope.models",
    "resid_hook_name": "cbscope.layers",
    "LayerError": "cbscope.layers",
    "generate_text": "cbscope.generation",
    "DatasetError": "cbscope.data",
    "PromptError": "cbscope.data",
    "ChatExample": "cbscope.data",
    "LorraConfig": "cbscope.lorra",
    "train_circuit_breaker": "cbscope.lorra",
    "TrainResult": "cbscope.lorra",
    "cosine_trace": "cbscope.trace",
    "CosineTrace": "cbscope.trace",
    "trace_generation": "cbscope.trace",
    "firing_stats": "cbscope.trace",
    "train_harm_probe": "cbscope.probe",
    "HarmProbe": "cbscope.probe",
    "FiringPoint": "cbscope.trace",
    "FiringStats": "cbscope.trace",
    "GenerationTrace": "cbscope.trace",
    "cosine_trace_ids": "cbscope.trace",
    "evaluate_pair": "cbscope.evaluate",
    "EvalConfig": "cbscope.evaluate",
    "Report": "cbscope.evaluate",
    "generalisation_matrix": "cbscope.generalise",
    "GeneralisationResult": "cbscope.generalise",
    "frontier": "cbscope.generalise",
    "explain": "cbscope.why.explanation",
    "Explanation": "cbscope.why.explanation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cbscope' has no attribute {name!r}")
