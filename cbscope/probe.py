"""A harmfulness probe: the paper's representation-reading baseline.

Zou et al. (2024) compare circuit breakers with a linear probe that reads harmfulness off the
residual stream and stops the generation when it fires. :func:`train_harm_probe` trains such a
probe: logistic regression (plain torch, full batch, L-BFGS) on the per-token residual stream at
one paper-convention layer, over the *response tokens only* of harmful and benign examples.
Features are standardised with the training mean and standard deviation, classes are weighted
equally, and the weights carry a small L2 penalty.

Threshold calibration (``calibration``):

- ``"example"`` (default): a benign example counts as a false positive when the *maximum* of its
  response-token scores exceeds the threshold, the way a monitor that stops a generation on its
  first flagged token behaves. The threshold is the ``1 - fpr`` quantile of the benign examples'
  maxima, so at most a share ``fpr`` of benign responses would be stopped.
- ``"token"``: the ``1 - fpr`` quantile of all benign response-token scores (a per-token FPR).

Scores are probabilities (sigmoid of the logit). A probe saves to ``<stem>.safetensors``
(weights) plus ``<stem>.json`` (layer, threshold, metadata); no pickle.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from cbscope.data import ChatExample, Conversation, encode_chat, pad_id_of, pad_right
from cbscope.layers import validate_layers
from cbscope.sidecar import read_sidecar, write_sidecar

logger = logging.getLogger(__name__)

PROBE_FORMAT_VERSION = 1
Calibration = Literal["example", "token"]
ExampleLike = ChatExample | dict[str, Any]


def _prompt_response(example: ExampleLike) -> tuple[str | Conversation, str]:
    if isinstance(example, ChatExample):
        return (example.messages if len(example.messages) > 1 else example.prompt), example.response
    if isinstance(example, dict) and "prompt" in example:
        return example["prompt"], str(example.get("response", "") or "")
    raise TypeError("examples must be ChatExample or dicts with 'prompt' and 'response'")


@torch.no_grad()
def response_features(
    pair: Any,
    examples: Sequence[ExampleLike],
    layer: int,
    *,
    adapters: bool = False,
    batch_size: int = 16,
    show_progress: bool = False,
) -> list[Float[Tensor, "pos d_model"]]:
    """Residual stream at ``layer`` on each example's response tokens (float32, CPU).

    Args:
        pair: The model pair.
        examples: Examples with non-empty responses.
        layer: Paper-convention layer.
        adapters: Read the circuit-broken model (True) or the original one (False).
        batch_size: Examples per forward pass.
        show_progress: Show a tqdm bar.
    """
    encoded = [encode_chat(pair.tokenizer, *_prompt_response(example)) for example in examples]
    empty = [i for i, enc in enumerate(encoded) if enc.response_start >= len(enc.input_ids)]
    if empty:
        raise ValueError(f"examples {empty[:5]} have no response tokens to probe")
    pad_id = pad_id_of(pair.tokenizer)
    features: list[Tensor] = []
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc="probe features", disable=not show_progress):
        batch = encoded[start : start + batch_size]
        ids, mask = pad_right([enc.input_ids for enc in batch], pad_id)
        context = contextlib.nullcontext() if adapters else pair.original()
        with context:
            resid = pair.resid(ids, mask, [layer])[0].float().cpu()
        for row, enc in enumerate(batch):
            features.append(resid[row, enc.response_start : len(enc.input_ids)].clone())
    return features


def roc_auc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half)."""
    pos = positive.double().flatten()
    neg = negative.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("AUC needs positive and negative scores")
    scores = torch.cat([pos, neg])
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    # average ranks over ties
    unique, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.double).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=torch.double).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    ranks = (sums / counts)[inverse]
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


@dataclass
class HarmProbe:
    """A linear harmfulness probe on one layer's residual stream.

    Attributes:
        layer: Paper-convention layer it reads.
        weight: Direction in standardised feature space.
        bias: Logit offset.
        mean: Feature mean used for standardisation.
        std: Feature standard deviation used for standardisation.
        threshold: Score (probability) above which a token is flagged.
        fpr: The false-positive rate the threshold was calibrated to.
        calibration: ``"example"`` (max over an example's response tokens) or ``"token"``.
        adapters: Whether it reads the circuit-broken (True) or the original model (False).
        model_name: The model it was trained on.
        metrics: Training metrics (train AUC, sizes ...).
    """

    layer: int
    weight: Float[Tensor, " d_model"]
    bias: Float[Tensor, ""]
    mean: Float[Tensor, " d_model"]
    std: Float[Tensor, " d_model"]
    threshold: float = 0.5
    fpr: float = 0.05
    calibration: str = "example"
    adapters: bool = False
    model_name: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ scoring
    def score_features(self, features: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        """Probabilities for raw residual vectors."""
        x = (features.float() - self.mean) / self.std
        return torch.sigmoid(x @ self.weight + self.bias)

    @torch.no_grad()
    def score_tokens(
        self, pair: Any, prompt: str | Conversation, response: str = ""
    ) -> Float[Tensor, " pos"]:
        """Probe score of every token of the chat-formatted prompt + response.

        Positions line up with :func:`cbscope.cosine_trace` of the same prompt and response
        (request tokens included, so the scores can be drawn beside a trace); the probe was
        trained on response tokens, which start at ``encode_chat(...).response_start``.
        """
        enc = encode_chat(pair.tokenizer, prompt, response)
        ids, mask = pad_right([enc.input_ids], pad_id_of(pair.tokenizer))
        context = contextlib.nullcontext() if self.adapters else pair.original()
        with context:
            resid = pair.resid(ids, mask, [self.layer])[0, 0].float().cpu()
        return self.score_features(resid)

    def score_examples(
        self, pair: Any, examples: Sequence[ExampleLike], *, batch_size: int = 16
    ) -> list[Float[Tensor, " pos"]]:
        """Response-token scores of each example."""
        feats = response_features(
            pair, examples, self.layer, adapters=self.adapters, batch_size=batch_size
        )
        return [self.score_features(f) for f in feats]

    def flags(self, pair: Any, examples: Sequence[ExampleLike]) -> list[bool]:
        """Whether each example's response would be flagged (some token above the threshold)."""
        return [bool((s > self.threshold).any()) for s in self.score_examples(pair, examples)]

    def auc(
        self,
        pair: Any,
        harmful: Sequence[ExampleLike],
        benign: Sequence[ExampleLike],
        *,
        level: Literal["token", "example"] = "token",
        batch_size: int = 16,
    ) -> float:
        """ROC AUC separating harmful from benign responses.

        Args:
            level: ``"token"`` (every response token is a sample) or ``"example"`` (the maximum
                score of each response).
        """
        pos = self.score_examples(pair, harmful, batch_size=batch_size)
        neg = self.score_examples(pair, benign, batch_size=batch_size)
        if level == "example":
            return roc_auc(torch.stack([s.max() for s in pos]), torch.stack([s.max() for s in neg]))
        if level != "token":
            raise ValueError(f"level must be 'token' or 'example', not {level!r}")
        return roc_auc(torch.cat(pos), torch.cat(neg))

    # ------------------------------------------------------------------ io
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``<stem>.safetensors`` and ``<stem>.json``; returns the JSON path."""
        tensors = {
            "weight": self.weight.float().contiguous(),
            "bias": self.bias.float().reshape(1).contiguous(),
            "mean": self.mean.float().contiguous(),
            "std": self.std.float().contiguous(),
        }
        meta = {
            "format_version": PROBE_FORMAT_VERSION,
            "layer": self.layer,
            "threshold": self.threshold,
            "fpr": self.fpr,
            "calibration": self.calibration,
            "adapters": self.adapters,
            "model_name": self.model_name,
            "metrics": self.metrics,
        }
        return write_sidecar(path, tensors, meta, kind="probe", indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HarmProbe:
        """Load a probe written by :meth:`save`."""
        tensors, meta = read_sidecar(path, kind="probe")
        return cls(
            layer=int(meta["layer"]),
            weight=tensors["weight"],
            bias=tensors["bias"].reshape(()),
            mean=tensors["mean"],
            std=tensors["std"],
            threshold=float(meta["threshold"]),
            fpr=float(meta["fpr"]),
            calibration=meta["calibration"],
            adapters=bool(meta["adapters"]),
            model_name=meta.get("model_name", ""),
            metrics=meta.get("metrics", {}),
        )


def fit_logistic(
    features: Float[Tensor, "n d"],
    labels: Float[Tensor, " n"],
    *,
    epochs: int = 100,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Class-balanced L2-regularised logistic regression by full-batch L-BFGS.

    Args:
        features: Standardised features.
        labels: 1 (harmful) or 0 (benign).
        epochs: L-BFGS iterations.
        weight_decay: L2 penalty on the weights.
        seed: Unused by L-BFGS from a zero start; kept for API stability.

    Returns:
        ``(weight, bias)``.
    """
    del seed
    n_pos = labels.sum().clamp(min=1)
    n_neg = (1 - labels).sum().clamp(min=1)
    sample_weight = torch.where(labels > 0.5, 0.5 / n_pos, 0.5 / n_neg)
    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = features @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, weight=sample_weight, reduction="sum"
        )
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def calibrate_threshold(
    benign_scores: Sequence[Tensor], fpr: float, calibration: Calibration = "example"
) -> float:
    """The score threshold giving false-positive rate ``fpr`` on benign responses.

    ``"example"``: over per-example maxima; ``"token"``: over all benign token scores. Scores
    strictly above the threshold are flagged.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    if calibration == "example":
        values = torch.stack([s.max() for s in benign_scores]).double()
    elif calibration == "token":
        values = torch.cat(list(benign_scores)).double()
    else:
        raise ValueError(f"calibration must be 'example' or 'token', not {calibration!r}")
    values, _ = torch.sort(values)
    allowed = math.floor(fpr * len(values))  # benign samples allowed above the threshold
    return float(values[len(values) - 1 - allowed])


def train_harm_probe(
    pair: Any,
    harmful: Sequence[ExampleLike],
    benign: Sequence[ExampleLike],
    layer: int,
    *,
    fpr: float = 0.05,
    epochs: int = 100,
    weight_decay: float = 1e-3,
    adapters: bool = False,
    calibration: Calibration = "example",
    calibration_benign: Sequence[ExampleLike] | None = None,
    batch_size: int = 16,
    show_progress: bool = False,
) -> HarmProbe:
    """Train a logistic-regression harmfulness probe on response-token representations.

    Args:
        pair: The model pair.
        harmful: Harmful examples (prompt + harmful response); every response token is a
            positive sample.
        benign: Benign examples; every response token is a negative sample.
        layer: Paper-convention layer to read (``1 .. n_layers``).
        fpr: Target false-positive rate of the calibrated threshold.
        epochs: L-BFGS iterations.
        weight_decay: L2 penalty on the (standardised) weights.
        adapters: Read the circuit-broken model instead of the original one.
        calibration: ``"example"`` or ``"token"`` (see the module docstring).
        calibration_benign: Benign examples to calibrate on (default: ``benign``).
        batch_size: Examples per forward pass.
        show_progress: Show tqdm bars.

    Raises:
        LayerError: If ``layer`` is out of range.
    """
    if not harmful or not benign:
        raise ValueError("the probe needs harmful and benign examples")
    layer = validate_layers([layer], pair.n_layers)[0]
    common = {"adapters": adapters, "batch_size": batch_size, "show_progress": show_progress}
    pos = response_features(pair, harmful, layer, **common)
    neg = response_features(pair, benign, layer, **common)
    features = torch.cat(pos + neg)
    labels = torch.cat([torch.ones(sum(len(p) for p in pos)), torch.zeros(sum(len(n) for n in neg))])
    mean = features.mean(dim=0)
    std = features.std(dim=0).clamp(min=1e-6)
    weight, bias = fit_logistic((features - mean) / std, labels, epochs=epochs, weight_decay=weight_decay)
    probe = HarmProbe(
        layer=layer,
        weight=weight,
        bias=bias,
        mean=mean,
        std=std,
        fpr=fpr,
        calibration=calibration,
        adapters=adapters,
        model_name=str(getattr(getattr(pair, "resolved", None), "spec", "")),
    )
    neg_scores = [probe.score_features(n) for n in neg]
    pos_scores = [probe.score_features(p) for p in pos]
    if calibration_benign is not None:
        calib = [
            probe.score_features(f)
            for f in response_features(pair, calibration_benign, layer, **common)
        ]
    else:
        calib = neg_scores
    probe.threshold = calibrate_threshold(calib, fpr, calibration)
    probe.metrics = {
        "n_harmful": len(harmful),
        "n_benign": len(benign),
        "n_tokens": int(len(labels)),
        "train_auc_token": roc_auc(torch.cat(pos_scores), torch.cat(neg_scores)),
        "train_detection_rate": float(
            sum(bool((s > probe.threshold).any()) for s in pos_scores) / len(pos_scores)
        ),
    }
    logger.info(
        "harm probe at layer %d: train token AUC %.3f, threshold %.3f",
        layer,
        probe.metrics["train_auc_token"],
        probe.threshold,
    )
    return probe
