"""Loading the shipped (or any built) model organism."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cbscope.errors import MissingFileError
from cbscope.organism.world import World

logger = logging.getLogger(__name__)

#: Folder of the organism shipped with cbscope (built with ``build_organism(seed=0)``).
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "organism"


def default_organism_dir() -> Path:
    """The shipped organism's folder.

    Raises:
        MissingFileError: If the package was installed without its assets (a
            :class:`FileNotFoundError` too).
    """
    if not (ASSET_DIR / "config.json").exists():
        raise MissingFileError(
            f"no organism in {ASSET_DIR}: build one with `cbscope organism build --out DIR` "
            "and pass its folder instead"
        )
    return ASSET_DIR


def load_organism(path: str | Path | None = None) -> tuple[Any, Any, World]:
    """Load an organism folder: ``(model, tokenizer, world)``.

    Args:
        path: Folder written by :func:`cbscope.organism.build_organism` (default: the shipped
            organism).

    Returns:
        The ``LlamaForCausalLM`` (eval mode, fp32, CPU), its tokenizer and the world.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path) if path is not None else default_organism_dir()
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    world = World.from_json(folder / "world.json")
    logger.info("loaded organism from %s", folder)
    return model, tokenizer, world
