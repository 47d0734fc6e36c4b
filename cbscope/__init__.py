"""cbscope: circuit breakers (Representation Rerouting) you can train, trace and attack.

Public API (imported lazily, so ``import cbscope`` and the CLI start fast)::

    pair = cbscope.load_pair("organism", adapter="runs/organism-rr")
    trace = cbscope.cosine_trace(pair, ["how do i brew zarnex"], ["sure here is how :"])

Layers everywhere follow the paper's convention: layer ``l`` is ``hidden_states[l]``, the input of
block ``l``, read at ``blocks.{l-1}.hook_resid_post``.

The names are listed twice: in ``_EXPORTS`` (what ``__getattr__`` imports on first use) and
under ``TYPE_CHECKING`` (what IDEs and type checkers see); ``tests/test_imports.py`` checks that
the two agree.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "load_pair": "cbscope.pair",
    "ModelPair": "cbscope.pair",
    "PairLike": "cbscope.pair",
    "resolve_model": "cbscope.models",
    "resid_hook_name": "cbscope.layers",
    "generate_text": "cbscope.generation",
    "ChatExample": "cbscope.data",
    "check_request_length": "cbscope.data",
    "CbscopeError": "cbscope.errors",
    "USER_ERRORS": "cbscope.errors",
    "AdapterMismatchError": "cbscope.errors",
    "ConfigError": "cbscope.errors",
    "DatasetError": "cbscope.errors",
    "LayerError": "cbscope.errors",
    "MissingFileError": "cbscope.errors",
    "ModelSpecError": "cbscope.errors",
    "PromptError": "cbscope.errors",
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
    "check_threshold": "cbscope.trace",
    "evaluate_pair": "cbscope.evaluate",
    "EvalConfig": "cbscope.evaluate",
    "Report": "cbscope.evaluate",
    "generalisation_matrix": "cbscope.generalise",
    "GeneralisationResult": "cbscope.generalise",
    "frontier": "cbscope.generalise",
    "explain": "cbscope.why.explanation",
    "Explanation": "cbscope.why.explanation",
}

if TYPE_CHECKING:
    from cbscope.data import ChatExample, check_request_length
    from cbscope.errors import (
        USER_ERRORS,
        AdapterMismatchError,
        CbscopeError,
        ConfigError,
        DatasetError,
        LayerError,
        MissingFileError,
        ModelSpecError,
        PromptError,
    )
    from cbscope.evaluate import EvalConfig, Report, evaluate_pair
    from cbscope.generalise import GeneralisationResult, frontier, generalisation_matrix
    from cbscope.generation import generate_text
    from cbscope.layers import resid_hook_name
    from cbscope.lorra import LorraConfig, TrainResult, train_circuit_breaker
    from cbscope.models import resolve_model
    from cbscope.pair import ModelPair, PairLike, load_pair
    from cbscope.probe import HarmProbe, train_harm_probe
    from cbscope.trace import (
        CosineTrace,
        FiringPoint,
        FiringStats,
        GenerationTrace,
        check_threshold,
        cosine_trace,
        cosine_trace_ids,
        firing_stats,
        trace_generation,
    )
    from cbscope.why.explanation import Explanation, explain

__all__ = [
    "AdapterMismatchError",
    "CbscopeError",
    "ChatExample",
    "ConfigError",
    "CosineTrace",
    "DatasetError",
    "EvalConfig",
    "Explanation",
    "FiringPoint",
    "FiringStats",
    "GeneralisationResult",
    "GenerationTrace",
    "HarmProbe",
    "LayerError",
    "LorraConfig",
    "MissingFileError",
    "ModelPair",
    "ModelSpecError",
    "PairLike",
    "PromptError",
    "Report",
    "TrainResult",
    "USER_ERRORS",
    "check_request_length",
    "check_threshold",
    "cosine_trace",
    "cosine_trace_ids",
    "evaluate_pair",
    "explain",
    "firing_stats",
    "frontier",
    "generalisation_matrix",
    "generate_text",
    "load_pair",
    "resid_hook_name",
    "resolve_model",
    "trace_generation",
    "train_circuit_breaker",
    "train_harm_probe",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cbscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
