"""LoRRA: train circuit breakers (Representation Rerouting LoRA adapters).

    from cbscope.lorra import LorraConfig, train_circuit_breaker
    result = train_circuit_breaker("organism", LorraConfig(steps=60), cb_examples, retain_examples,
                                   out_dir="runs/rr")

Modules: :mod:`~cbscope.lorra.config` (``LorraConfig``), :mod:`~cbscope.lorra.losses` (the
formulas), :mod:`~cbscope.lorra.data` (circuit-breaker / retain sets), :mod:`~cbscope.lorra.loop`
(the training loop), :mod:`~cbscope.lorra.checkpoint` (resumable checkpoints),
:mod:`~cbscope.lorra.outputs` (a run's folder, its staging folder, the published outputs),
:mod:`~cbscope.lorra.trainer` (:func:`train_circuit_breaker`) and :mod:`~cbscope.lorra.presets`
(``organism``, ``smollm2``, ``gemma3``). A whole run, folders included, is a
:class:`cbscope.run.RunConfig` run by :class:`cbscope.run.Runner`.
"""

from cbscope.lorra.config import ConfigError, LorraConfig
from cbscope.lorra.data import LorraData
from cbscope.lorra.presets import PRESETS, get_preset
from cbscope.lorra.trainer import (
    NonFiniteLossError,
    ResumeError,
    TrainResult,
    merge_adapter,
    prepare_pair,
    train_circuit_breaker,
)

__all__ = [
    "PRESETS",
    "ConfigError",
    "LorraConfig",
    "LorraData",
    "NonFiniteLossError",
    "ResumeError",
    "TrainResult",
    "get_preset",
    "merge_adapter",
    "prepare_pair",
    "train_circuit_breaker",
]
