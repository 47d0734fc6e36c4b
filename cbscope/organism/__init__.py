"""The model organism: a tiny chat model trained from scratch on a synthetic world.

It knows every topic's procedure (harmful ones included), refuses harmful requests in the training
request templates, still answers them under a prefilling attack or in a jailbreak template, and is
judged exactly (see :mod:`cbscope.organism.judges`). cbscope ships a built copy (seed 0) in
``cbscope/assets/organism``; :func:`build_organism` regenerates it bit-for-bit.

The names below are imported lazily: ``from cbscope.organism import World`` loads only
:mod:`cbscope.organism.world`, not the builder's torch and transformers, and importing one
submodule never runs another (so no import circle can pass through this package).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "ASSET_DIR": "cbscope.organism.load",
    "Topic": "cbscope.organism.world",
    "World": "cbscope.organism.world",
    "build_organism": "cbscope.organism.build",
    "default_organism_dir": "cbscope.organism.load",
    "evaluate_behaviour": "cbscope.organism.evaluate",
    "format_behaviour_table": "cbscope.organism.evaluate",
    "generate": "cbscope.organism.evaluate",
    "load_organism": "cbscope.organism.load",
    "make_world": "cbscope.organism.world",
}
_SUBMODULES = ("build", "evaluate", "judges", "lexicon", "load", "world")

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on use
    from cbscope.organism import judges
    from cbscope.organism.build import build_organism
    from cbscope.organism.evaluate import evaluate_behaviour, format_behaviour_table, generate
    from cbscope.organism.load import ASSET_DIR, default_organism_dir, load_organism
    from cbscope.organism.world import Topic, World, make_world

__all__ = [
    "ASSET_DIR",
    "Topic",
    "World",
    "build_organism",
    "default_organism_dir",
    "evaluate_behaviour",
    "format_behaviour_table",
    "generate",
    "judges",
    "load_organism",
    "make_world",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_SUBMODULES])
