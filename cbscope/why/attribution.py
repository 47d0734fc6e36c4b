"""Input attribution: which prompt and prefill tokens drive the firing?

The target is the cosine between the original and the circuit-broken residual stream at one
token and layer (the firing point). Each earlier token (and the target token itself) is scored
two ways, both signed so that **a positive score means the token pushes the breaker to fire**
(its presence lowers the cosine):

- ``grad_x_input``: ``-<d cos / d e_t, e_t>`` for the token's embedding ``e_t`` (read and
  replaced at ``hook_embed``, the same leaf in both models' forwards): the first-order estimate
  of what removing the embedding does;
- ``occlusion``: ``cos(token replaced by a neutral one) - cos``, re-traced exactly (both models
  re-run; the sequences are cut after the target token, which later tokens cannot reach, and
  batched).

Only the user's words and the response are scored by default
(:func:`~cbscope.why.tokens.content_positions`): replacing the chat template's own tokens
(markers, a default system prompt) breaks the format rather than the request. Other tokens, and
tokens after the target (causal attention cannot carry them back), are NaN. On the organism
:func:`organism_labels` marks each request token as the harmful topic's own word or the request
template's, and :func:`topic_vs_template` measures how often the topic's words outrank the
template's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from cbscope.layers import resid_hook_name
from cbscope.why.tokens import (
    ExplainError,
    TokenSeq,
    check_layers,
    content_positions,
    cosine,
    encode,
    find_focus,
    require_adapter,
    resid_at,
    run_hooked,
    special_positions,
    token_texts,
)

METHODS = ("grad_x_input", "occlusion")


def _floats(t: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 6) for v in t.tolist()]


@dataclass
class Attribution:
    """Per-token attribution of the cosine at one (layer, token).

    Attributes:
        tokens: Token texts.
        token_ids: The ids.
        response_start: First response token.
        layer: Paper-convention layer of the target.
        pos: Token position of the target.
        cos: The cosine there.
        grad_x_input: ``[pos]`` gradient x input score (positive: drives the firing).
        occlusion: ``[pos]`` occlusion score (positive: drives the firing).
        neutral: The token occluded tokens are replaced by.
        labels: Per token ``"topic"``, ``"template"``, ``"special"``, ``"scaffold"``,
            ``"response"`` or ``"other"`` (organism only; empty otherwise).
    """

    tokens: list[str]
    token_ids: list[int]
    response_start: int
    layer: int
    pos: int
    cos: float
    grad_x_input: Float[Tensor, " pos"]
    occlusion: Float[Tensor, " pos"]
    neutral: str = ""
    labels: list[str] = field(default_factory=list)

    def scores(self, method: str = "occlusion") -> Float[Tensor, " pos"]:
        """The scores of one method."""
        if method not in METHODS:
            raise ExplainError(f"method must be one of {METHODS}, not {method!r}")
        return getattr(self, method)

    def top(self, k: int = 3, method: str = "occlusion") -> list[tuple[int, str, float]]:
        """The ``k`` tokens that drive the firing most: ``(pos, token, score)``."""
        values = torch.nan_to_num(self.scores(method), nan=-math.inf)
        order = torch.argsort(values, descending=True)[:k]
        return [(int(i), self.tokens[int(i)], float(self.scores(method)[int(i)]))
                for i in order if not math.isinf(float(values[int(i)]))]

    def spread(self, method: str = "occlusion") -> float:
        """The largest absolute score (how far from flat the attribution is)."""
        values = self.scores(method)
        values = values[~torch.isnan(values)]
        return float(values.abs().max()) if values.numel() else 0.0

    def to_dataframe(self) -> pd.DataFrame:
        """One row per token: pos, token, segment, label, grad_x_input, occlusion."""
        return pd.DataFrame({
            "pos": range(len(self.tokens)),
            "token": self.tokens,
            "segment": ["response" if p >= self.response_start else "request"
                        for p in range(len(self.tokens))],
            "label": self.labels or [""] * len(self.tokens),
            "grad_x_input": self.grad_x_input.numpy(),
            "occlusion": self.occlusion.numpy(),
        })

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (NaN as null)."""
        return {
            "tokens": self.tokens, "token_ids": self.token_ids,
            "response_start": self.response_start, "layer": self.layer, "pos": self.pos,
            "cos": self.cos, "grad_x_input": _floats(self.grad_x_input),
            "occlusion": _floats(self.occlusion), "neutral": self.neutral, "labels": self.labels,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attribution:
        """Inverse of :meth:`to_dict`."""
        def tensor(values: list[Any]) -> Tensor:
            return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)

        return cls(
            tokens=list(data["tokens"]), token_ids=[int(i) for i in data["token_ids"]],
            response_start=int(data["response_start"]), layer=int(data["layer"]),
            pos=int(data["pos"]), cos=float(data["cos"]),
            grad_x_input=tensor(data["grad_x_input"]), occlusion=tensor(data["occlusion"]),
            neutral=data.get("neutral", ""), labels=list(data.get("labels", [])),
        )


def neutral_token(tokenizer: Any, token: str | int | None = None) -> int:
    """The id occluded tokens are replaced by.

    Default: the tokenizer's unknown token when it is one (named like ``<unk>``; SmolLM2's
    ``unk_token`` is its ``<|endoftext|>`` document separator, which is not neutral), else a
    single space, else the last token of ``" ."``.

    Raises:
        ExplainError: ``token`` is not one token of the vocabulary.
    """
    if isinstance(token, int):
        if not 0 <= token < len(tokenizer):
            raise ExplainError(f"neutral token id {token} is outside the vocabulary")
        return token
    if isinstance(token, str):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ExplainError(f"neutral token {token!r} is {len(ids)} tokens, not one")
        return int(ids[0])
    unk = getattr(tokenizer, "unk_token", None)
    if tokenizer.unk_token_id is not None and unk and "unk" in str(unk).lower():
        return int(tokenizer.unk_token_id)
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(space) == 1:
        return int(space[0])
    return int(tokenizer(" .", add_special_tokens=False)["input_ids"][-1])


def _grad_x_input(pair: Any, seq: TokenSeq, layer: int, pos: int) -> tuple[Tensor, float]:
    """``-<d cos / d e, e>`` per token, and the cosine."""
    ids = torch.tensor([seq.ids[: pos + 1]], dtype=torch.long, device=pair.device)
    leaf: dict[str, Tensor] = {}
    resid: dict[str, Tensor] = {}

    def embed(activation: Tensor, hook: Any) -> Tensor:
        if "e" not in leaf:
            leaf["e"] = activation.detach().clone().requires_grad_(True)
        return leaf["e"]

    def keep(which: str):
        def hook(activation: Tensor, hook: Any) -> None:
            resid[which] = activation[0, pos]

        return hook

    name = resid_hook_name(layer)
    with torch.enable_grad():
        with pair.original():
            run_hooked(pair, ids, [("hook_embed", embed), (name, keep("orig"))], name)
        run_hooked(pair, ids, [("hook_embed", embed), (name, keep("cb"))], name)
        a, b = resid["orig"].double(), resid["cb"].double()
        cos = (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-8)
        (grad,) = torch.autograd.grad(cos, leaf["e"])
    scores = -(grad[0].double() * leaf["e"][0].detach().double()).sum(-1)
    return scores.float().cpu(), float(cos.detach())


@torch.no_grad()
def _occlusion(
    pair: Any, seq: TokenSeq, layer: int, pos: int, positions: list[int], neutral: int,
    batch_size: int, show_progress: bool,
) -> tuple[Tensor, float]:
    """Occluded cosine minus the plain one, per position in ``positions``."""
    from cbscope.trace import pair_cosines

    base = seq.ids[: pos + 1]
    rows = [list(base)]
    for p in positions:
        row = list(base)
        row[p] = neutral
        rows.append(row)
    values: list[float] = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="occlusion", disable=not show_progress):
        ids = torch.tensor(rows[start : start + batch_size], dtype=torch.long)
        cos, _, _ = pair_cosines(pair, ids, torch.ones_like(ids), [layer])
        values += [float(v) for v in cos[:, 0, pos]]
    plain = values[0]
    scores = torch.full((len(seq),), math.nan)
    for p, value in zip(positions, values[1:], strict=True):
        scores[p] = value - plain
    return scores, plain


def attribute(
    pair: Any,
    seq: TokenSeq,
    layer: int,
    pos: int,
    *,
    methods: Sequence[str] = METHODS,
    neutral: str | int | None = None,
    include_scaffold: bool = False,
    world: Any | None = None,
    batch_size: int = 32,
    show_progress: bool = False,
) -> Attribution:
    """Score every token up to ``pos`` by how much it drives the cosine at ``(layer, pos)`` down.

    Args:
        pair: The model pair.
        seq: The example.
        layer: Paper-convention layer of the target cosine.
        pos: Token position of the target cosine (e.g. the firing point's).
        methods: ``"grad_x_input"`` and/or ``"occlusion"`` (the other is NaN).
        neutral: The occluding token (text or id; default :func:`neutral_token`).
        include_scaffold: Also score the chat template's tokens (markers, system prompt).
        world: The organism's world, to label topic and template words.
        batch_size: Occluded sequences per forward.
        show_progress: Show a tqdm bar.

    Raises:
        ExplainError: No adapter, an unknown method, or ``pos`` outside the sequence.
        LayerError: A layer outside the model.
    """
    require_adapter(pair)
    check_layers(pair, [layer])
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ExplainError(f"methods must be among {METHODS}, got {list(methods)}")
    if not 0 <= pos < len(seq):
        raise ExplainError(f"position {pos} is outside the sequence (0..{len(seq) - 1})")
    if batch_size < 1:
        raise ExplainError(f"batch_size must be >= 1, got {batch_size}")
    neutral_id = neutral_token(pair.tokenizer, neutral)
    special = special_positions(pair.tokenizer, seq)
    content = content_positions(pair.tokenizer, seq)
    positions = [p for p in range(pos + 1) if content[p] or (include_scaffold and not special[p])]
    n = len(seq)
    gxi = torch.full((n,), math.nan)
    occ = torch.full((n,), math.nan)
    cos = math.nan
    if "grad_x_input" in methods:
        scores, cos = _grad_x_input(pair, seq, layer, pos)
        gxi[positions] = scores[positions]
    if "occlusion" in methods:
        occ, cos = _occlusion(pair, seq, layer, pos, positions, neutral_id, batch_size,
                              show_progress)
    return Attribution(
        tokens=list(seq.tokens), token_ids=list(seq.ids), response_start=seq.response_start,
        layer=layer, pos=pos, cos=cos, grad_x_input=gxi, occlusion=occ,
        neutral=token_texts(pair.tokenizer, [neutral_id])[0],
        labels=organism_labels(world, seq, special, content) if world is not None else [],
    )


# ---------------------------------------------------------------------- organism statistics
def organism_labels(
    world: Any, seq: TokenSeq, special: Sequence[bool] | None = None,
    content: Sequence[bool] | None = None,
) -> list[str]:
    """Label each token of an organism example: ``"topic"`` (a word of the topic named in the
    request), ``"template"`` (a word of one of the world's request templates), ``"special"``
    (chat markers), ``"scaffold"`` (other chat-template tokens), ``"response"`` or ``"other"``
    (e.g. appended noise words)."""
    words = [t.strip() for t in seq.tokens]
    special = list(special) if special is not None else [
        w.startswith("<") and w.endswith(">") for w in words]
    content = list(content) if content is not None else [not s for s in special]
    labels = ["response" if p >= seq.response_start else
              ("special" if special[p] else ("other" if content[p] else "scaffold"))
              for p in range(len(seq))]
    request = range(seq.response_start)
    names = sorted((t.name.split() for t in world.topics), key=len, reverse=True)
    for name in names:
        hit = next((p for p in request if words[p : p + len(name)] == name
                    and p + len(name) <= seq.response_start
                    and all(labels[q] == "other" for q in range(p, p + len(name)))), None)
        if hit is not None:
            for q in range(hit, hit + len(name)):
                labels[q] = "topic"
            break
    template_words = {w for template in world.all_templates for w in template.split()
                      if w != "{topic}"}
    for p in request:
        if labels[p] == "other" and words[p] in template_words:
            labels[p] = "template"
    return labels


def topic_vs_template(
    pair: Any,
    world: Any,
    examples: Sequence[dict[str, Any]] | None = None,
    *,
    layers: Sequence[int] | None = None,
    threshold: float = 0.5,
    methods: Sequence[str] = METHODS,
    show_progress: bool = False,
) -> dict[str, Any]:
    """How often the harmful topic's own words outrank the request template's words.

    Each example (default: every harmful topic in each train template, with the prefill
    ``world.prefill``) is attributed at its firing point (:func:`cbscope.why.find_focus` at
    ``layers``). Per method: ``pairwise`` is the share of (topic word, template word) pairs of
    the same example in which the topic word scores higher (ties count half), averaged over all
    pairs; ``top_is_topic`` the share of examples whose highest-scoring request word is a topic
    word.

    Returns:
        ``{"n_examples", "n_fired", "methods": {method: {"pairwise", "top_is_topic",
        "n_pairs"}}}``.
    """
    chosen = check_layers(pair, layers)
    if examples is None:
        examples = [{"prompt": row["prompt"], "response": world.prefill}
                    for row in world.harmful_examples(None, "train")]
    wins = {m: [0.0, 0] for m in methods}
    tops = {m: [0, 0] for m in methods}
    fired = 0
    for example in tqdm(examples, desc="attribution", disable=not show_progress):
        seq = encode(pair, example["prompt"], example.get("response", ""))
        with pair.original():
            orig = resid_at(pair, seq, chosen)
        cb = resid_at(pair, seq, chosen)
        cos = torch.stack([cosine(o, c) for o, c in zip(orig, cb, strict=True)])
        focus = find_focus(cos, chosen, seq, chosen, threshold)
        fired += focus.fires
        result = attribute(pair, seq, focus.layer, focus.pos, methods=methods, world=world)
        for method in methods:
            scores = result.scores(method)
            topic = [float(scores[p]) for p, lab in enumerate(result.labels)
                     if lab == "topic" and not math.isnan(float(scores[p]))]
            template = [float(scores[p]) for p, lab in enumerate(result.labels)
                        if lab == "template" and not math.isnan(float(scores[p]))]
            for a in topic:
                for b in template:
                    wins[method][0] += 1.0 if a > b else (0.5 if a == b else 0.0)
                    wins[method][1] += 1
            if topic and template:
                tops[method][0] += max(topic) > max(template)
                tops[method][1] += 1
    return {
        "n_examples": len(examples),
        "n_fired": fired,
        "methods": {m: {"pairwise": wins[m][0] / wins[m][1] if wins[m][1] else math.nan,
                        "top_is_topic": tops[m][0] / tops[m][1] if tops[m][1] else math.nan,
                        "n_pairs": wins[m][1]} for m in methods},
    }

