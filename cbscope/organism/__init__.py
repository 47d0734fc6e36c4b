"""The model organism: a tiny chat model trained from scratch on a synthetic world.

It knows every topic's procedure (harmful ones included), refuses harmful requests in the training
request templates, still answers them under a prefilling attack or in a jailbreak template, and is
judged exactly (see :mod:`cbscope.organism.judges`). cbscope ships a built copy (seed 0) in
``cbscope/assets/organism``; :func:`build_organism` regenerates it bit-for-bit.
"""

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
