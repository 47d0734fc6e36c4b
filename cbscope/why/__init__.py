"""Why does the breaker fire? Causal localisation of the rerouting, from adapter to token.

- :func:`decompose`: the rerouting delta at a layer split exactly into the embedding and every
  block's attention and MLP output, with each block's direct (own-LoRA) part;
- :func:`patching`: the circuit-broken model with chosen blocks' or module kinds' LoRA off (or
  only those on): necessity, sufficiency, a greedy minimal sufficient set of blocks;
- :func:`attribute`: which prompt and prefill tokens drive the firing (gradient x input and
  occlusion);
- :func:`logit_lens`, :func:`direction_report`, :func:`pca_states`: where the rerouted
  representation goes;
- :func:`explain`: all of it for one example, as an :class:`Explanation`.

Layers follow the paper's convention (layer ``l`` = ``blocks.{l-1}.hook_resid_post``); blocks
are TransformerLens block indices (``blocks.{b}``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ExplainError": "cbscope.why.tokens",
    "TokenSeq": "cbscope.why.tokens",
    "Focus": "cbscope.why.tokens",
    "encode": "cbscope.why.tokens",
    "from_trace": "cbscope.why.tokens",
    "find_focus": "cbscope.why.tokens",
    "Decomposition": "cbscope.why.decomposition",
    "decompose": "cbscope.why.decomposition",
    "KINDS": "cbscope.why.patch",
    "PatchError": "cbscope.why.patch",
    "Patching": "cbscope.why.patch",
    "adapter_sites": "cbscope.why.patch",
    "switch_adapters": "cbscope.why.patch",
    "patching": "cbscope.why.patch",
    "organism_judge": "cbscope.why.patch",
    "Attribution": "cbscope.why.attribution",
    "attribute": "cbscope.why.attribution",
    "organism_labels": "cbscope.why.attribution",
    "topic_vs_template": "cbscope.why.attribution",
    "LogitLens": "cbscope.why.lens",
    "logit_lens": "cbscope.why.lens",
    "DirectionReport": "cbscope.why.direction",
    "PCAStates": "cbscope.why.direction",
    "direction_report": "cbscope.why.direction",
    "refusal_direction": "cbscope.why.direction",
    "rerouting_directions": "cbscope.why.direction",
    "pca_states": "cbscope.why.direction",
    "Explanation": "cbscope.why.explanation",
    "explain": "cbscope.why.explanation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cbscope.why' has no attribute {name!r}")
