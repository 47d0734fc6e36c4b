"""The one layer convention of cbscope.

The circuit-breakers paper (and the official code) names layers by the index into Hugging Face's
``hidden_states`` tuple: ``hidden_states[0]`` is the embedding output and ``hidden_states[l]`` is
the *input* of decoder block ``l``, i.e. the output of block ``l - 1``. In TransformerLens hook
names that is ``blocks.{l-1}.hook_resid_post``. So the paper's "layer 10" is
``blocks.9.hook_resid_post``.

Every public cbscope argument called ``layers`` / ``target_layers`` uses the **paper convention**
(1-based, ``1 .. n_layers``). The helpers here are the only place that converts.

One caveat: Hugging Face applies the model's final norm to the *last* entry,
``hidden_states[n_layers]``, so for ``l = n_layers`` the hook point (the raw residual stream) and
HF's tuple differ; every other layer matches exactly. cbscope always reads the raw residual.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cbscope.errors import LayerError


def resid_hook_name(paper_layer: int) -> str:
    """Hook name of the residual stream the paper calls ``paper_layer``.

    Args:
        paper_layer: Paper/HF ``hidden_states`` index, ``>= 1``.

    Returns:
        ``"blocks.{paper_layer - 1}.hook_resid_post"``.
    """
    if paper_layer < 1:
        raise LayerError(
            f"layer {paper_layer} has no block output: paper layers start at 1 "
            "(layer 0 is the embedding)"
        )
    return f"blocks.{paper_layer - 1}.hook_resid_post"


def block_index(paper_layer: int) -> int:
    """Index of the decoder block whose output is the paper's ``paper_layer``."""
    return paper_layer - 1


def validate_layers(layers: Iterable[int], n_layers: int, *, what: str = "layer") -> list[int]:
    """Check paper-convention layers against a model's depth.

    Args:
        layers: Paper-convention layer indices.
        n_layers: Number of decoder blocks in the model.
        what: Word used in the error message (e.g. ``"target layer"``).

    Returns:
        The layers, sorted and de-duplicated.

    Raises:
        LayerError: If the list is empty or a layer is outside ``1 .. n_layers``.
    """
    result = sorted(set(int(layer) for layer in layers))
    if not result:
        raise LayerError(f"no {what}s given")
    bad = [layer for layer in result if not 1 <= layer <= n_layers]
    if bad:
        raise LayerError(
            f"{what} {bad} out of range: this model has {n_layers} blocks, so layers run "
            f"1..{n_layers} (paper convention: layer l = blocks.{{l-1}}.hook_resid_post)"
        )
    return result


def parse_layers(text: str | Sequence[int] | None) -> list[int] | None:
    """Parse ``"5,10,20"`` (or a sequence) into a list of ints; ``None``/``"all"`` -> ``None``."""
    if text is None:
        return None
    if isinstance(text, str):
        text = text.strip()
        if text in ("", "all"):
            return None
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError as err:
            raise LayerError(f"cannot parse layers {text!r}: expected e.g. '5,10,20'") from err
    return [int(layer) for layer in text]


def default_target_layers(n_layers: int) -> list[int]:
    """The paper's target layers (10, 20 of 32) scaled to a model with ``n_layers`` blocks."""
    if n_layers < 2:
        return [1]
    low = max(1, round(10 * n_layers / 32))
    high = max(low + 1, round(20 * n_layers / 32))
    return sorted({min(low, n_layers), min(high, n_layers)})


def figure6_layers(n_layers: int) -> list[int]:
    """Early / middle / late layers for Figure-6 style plots (5, 10, 20 of 32, scaled)."""
    picks = {max(1, min(n_layers, round(x * n_layers / 32))) for x in (5, 10, 20)}
    return sorted(picks)


def adapter_target_layers(adapter_dir: str | os.PathLike[str] | None, n_layers: int) -> list[int]:
    """The layers a breaker was trained to reroute, from its saved config.

    Reads ``lorra_config.json`` (``target_layers``; ``null`` means the paper's default for the
    model's depth), else ``train_info.json`` (``target_layers``), else uses
    :func:`default_target_layers`. Layers outside the model are dropped.

    Args:
        adapter_dir: The adapter folder (None: no adapter).
        n_layers: Number of decoder blocks of the model.

    Returns:
        Sorted paper-convention layers.
    """
    found: list[int] | None = None
    if adapter_dir is not None:
        folder = Path(adapter_dir)
        for name in ("lorra_config.json", "train_info.json"):
            try:
                value = json.loads((folder / name).read_text()).get("target_layers")
            except (OSError, ValueError, AttributeError):
                continue
            if value:
                found = [int(layer) for layer in value]
                break
    layers = sorted({layer for layer in (found or []) if 1 <= layer <= n_layers})
    return layers or default_target_layers(n_layers)
