"""Forward hooks on a Hugging Face decoder's blocks: read or edit the residual stream.

Paper layer ``l`` is the output of decoder block ``l - 1`` (``blocks.{l-1}.hook_resid_post`` on
the bridge, ``hidden_states[l]`` in Hugging Face, never normed here). These hooks sit on
``model.model.layers[l - 1]`` itself, so they work on ``pair.model`` with input embeddings, with
gradients, and during KV-cached generation; each context manager removes its hooks on exit, even
on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor

from cbscope.attacks.repe import decoder_layers

__all__ = ["StopForward", "capture_resid"]


class StopForward(Exception):  # noqa: N818 - control flow, not an error
    """Raised by :func:`capture_resid` (``stop=True``) after the highest layer it reads."""


@contextlib.contextmanager
def capture_resid(
    model: Any, layers: Sequence[int], *, stop: bool = False
) -> Iterator[dict[int, Tensor]]:
    """Collect the residual stream at paper-convention ``layers`` during the next forwards.

    Yields a dict ``{layer: [batch, pos, d_model]}`` filled by each forward (the last one wins);
    the tensors are not detached. With ``stop=True`` the forward raises :class:`StopForward`
    after the highest layer (wrap the call in ``contextlib.suppress(StopForward)``): the rest of
    the blocks and the unembedding are skipped.
    """
    blocks = decoder_layers(model)
    wanted = sorted(set(int(layer) for layer in layers))
    if not wanted or wanted[0] < 1 or wanted[-1] > len(blocks):
        raise ValueError(f"layers {list(layers)} must lie in 1 .. {len(blocks)}")
    captured: dict[int, Tensor] = {}
    handles = []

    def make_hook(layer: int):
        def hook(module: Any, inputs: Any, output: Any) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if stop and layer == wanted[-1]:
                raise StopForward

        return hook

    try:
        for layer in wanted:
            handles.append(blocks[layer - 1].register_forward_hook(make_hook(layer)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
