"""Logit lens: what each model would predict from the residual stream at every layer.

The raw residual stream at paper layer ``l`` (``blocks.{l-1}.hook_resid_post``) goes through
the model's final norm and unembedding, for the original and the circuit-broken model alike; per
token and layer we keep the top-k next tokens with their probabilities and the entropy (nats)
of the whole distribution. At the last layer this is the model's own output distribution.
Logits are made one layer at a time, so memory stays at one ``[pos, vocab]`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cbscope.why.tokens import ExplainError, TokenSeq, require_adapter, resid_at, token_texts

MODELS = ("original", "circuit-broken")


def final_norm(pair: Any) -> Any:
    """The model's final normalisation module (``model.norm`` for Llama, Gemma, Qwen ...).

    Raises:
        ExplainError: The architecture has none this function knows.
    """
    decoder = pair.model.get_decoder() if hasattr(pair.model, "get_decoder") else pair.model
    for name in ("norm", "final_layernorm", "ln_f"):
        module = getattr(decoder, name, None)
        if module is not None:
            return module
    raise ExplainError(f"cannot find the final norm of {type(pair.model).__name__}")


def readout(pair: Any) -> tuple[Any, Tensor]:
    """``(final norm, unembedding matrix [vocab, d_model])``."""
    return final_norm(pair), pair.model.get_output_embeddings().weight


@dataclass
class LogitLens:
    """Top-k predictions and entropies of both models at every layer and token.

    Attributes:
        layers: Paper-convention layers.
        tokens: Token texts of the sequence.
        k: Predictions kept per token.
        top_ids: Per model (``"original"``, ``"circuit-broken"``), ``[layer, pos, k]`` ids.
        top_probs: Per model, ``[layer, pos, k]`` probabilities.
        entropy: Per model, ``[layer, pos]`` entropy in nats.
        vocab: Text of every id that appears in ``top_ids``.
    """

    layers: list[int]
    tokens: list[str]
    k: int
    top_ids: dict[str, Int[Tensor, "layer pos k"]]
    top_probs: dict[str, Float[Tensor, "layer pos k"]]
    entropy: dict[str, Float[Tensor, "layer pos"]]
    vocab: dict[int, str]

    def top(self, model: str, layer: int, pos: int) -> list[tuple[str, float]]:
        """The top-k ``(token, probability)`` of ``model`` at ``(layer, pos)``."""
        if model not in MODELS:
            raise ExplainError(f"model must be one of {MODELS}, not {model!r}")
        index = self.layers.index(layer)
        return [(self.vocab[int(i)], float(p)) for i, p in
                zip(self.top_ids[model][index, pos], self.top_probs[model][index, pos],
                    strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "layers": self.layers, "tokens": self.tokens, "k": self.k,
            "top_ids": {m: t.tolist() for m, t in self.top_ids.items()},
            "top_probs": {m: [[[round(p, 5) for p in ps] for ps in row] for row in t.tolist()]
                          for m, t in self.top_probs.items()},
            "entropy": {m: [[round(v, 5) for v in row] for row in t.tolist()]
                        for m, t in self.entropy.items()},
            "vocab": {str(i): text for i, text in self.vocab.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogitLens:
        """Inverse of :meth:`to_dict`."""
        return cls(
            layers=[int(x) for x in data["layers"]], tokens=list(data["tokens"]), k=int(data["k"]),
            top_ids={m: torch.tensor(v, dtype=torch.long) for m, v in data["top_ids"].items()},
            top_probs={m: torch.tensor(v) for m, v in data["top_probs"].items()},
            entropy={m: torch.tensor(v) for m, v in data["entropy"].items()},
            vocab={int(i): text for i, text in data["vocab"].items()},
        )


@torch.no_grad()
def lens_of(pair: Any, resid: Float[Tensor, "pos d_model"], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k ids, probabilities and the entropy of one layer's residual stream."""
    norm, unembed = readout(pair)
    logits = norm(resid.to(unembed.dtype)) @ unembed.T
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    top = torch.topk(logp, k, dim=-1)
    return top.indices.cpu(), top.values.exp().cpu(), entropy.cpu()


def logit_lens(
    pair: Any,
    seq: TokenSeq,
    layers: Sequence[int] | None = None,
    *,
    k: int = 5,
    resid: dict[str, Sequence[Tensor]] | None = None,
) -> LogitLens:
    """The logit lens of both models over one example.

    Args:
        pair: The model pair.
        seq: The example.
        layers: Paper-convention layers (default: all).
        k: Top predictions kept per token.
        resid: Precomputed residual streams per model (``[pos, d]`` per layer, in ``layers``
            order), to skip the two forwards.

    Raises:
        ExplainError: No adapter or ``k < 1``.
        LayerError: A layer outside the model.
    """
    from cbscope.layers import validate_layers

    require_adapter(pair)
    chosen = validate_layers(range(1, pair.n_layers + 1) if layers is None else layers,
                             pair.n_layers)
    if k < 1:
        raise ExplainError(f"k must be >= 1, got {k}")
    k = min(k, pair.model.get_output_embeddings().weight.shape[0])
    if resid is None:
        with pair.original():
            orig = resid_at(pair, seq, chosen)
        resid = {"original": orig, "circuit-broken": resid_at(pair, seq, chosen)}
    top_ids, top_probs, entropy = {}, {}, {}
    for model in MODELS:
        parts = [lens_of(pair, r, k) for r in resid[model]]
        top_ids[model] = torch.stack([p[0] for p in parts])
        top_probs[model] = torch.stack([p[1] for p in parts])
        entropy[model] = torch.stack([p[2] for p in parts])
    ids = sorted({int(i) for t in top_ids.values() for i in t.unique().tolist()})
    vocab = dict(zip(ids, token_texts(pair.tokenizer, ids), strict=True))
    return LogitLens(chosen, list(seq.tokens), k, top_ids, top_probs, entropy, vocab)
