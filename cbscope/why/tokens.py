"""What every part of :mod:`cbscope.why` works on: one tokenised example, its residual streams
in both models, and the point where the breaker fires.

:class:`TokenSeq` is the exact token ids analysed (request, then response), with the response
start; :func:`encode` makes one from a prompt and a response or prefill, :func:`from_trace` from
a traced example (a generation included). :func:`capture` runs the bridge once in the pair's
current adapter state and keeps, through TransformerLens hook points, the residual stream's
summands: ``blocks.0.hook_resid_pre`` (the embedding, scaled where the model scales it) and every
block's ``hook_attn_out`` and ``hook_mlp_out``, plus ``blocks.{l-1}.hook_resid_post`` (paper
layer ``l``). Hooks always come off, and the forward stops after the last block needed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from cbscope.data import Conversation, as_messages, encode_chat
from cbscope.errors import ExplainError
from cbscope.layers import validate_layers

COS_EPS = 1e-8
FocusKind = Literal["response", "request", "lowest"]



@dataclass(frozen=True)
class TokenSeq:
    """One example as the exact token ids analysed.

    Attributes:
        ids: Token ids of request + response.
        response_start: Index of the first response token (``len(ids)`` without a response).
        tokens: The text of each token.
        prompt: The prompt (string or conversation), for the record.
        response: The response text, for the record.
        prefill_end: Where a prefill ends and generated tokens start (None: no generation).
    """

    ids: list[int]
    response_start: int
    tokens: list[str]
    prompt: str | Conversation = ""
    response: str = ""
    prefill_end: int | None = None

    def __post_init__(self) -> None:
        if not self.ids:
            raise ExplainError("the example has no tokens")
        if len(self.tokens) != len(self.ids):
            raise ExplainError(f"{len(self.ids)} token ids but {len(self.tokens)} token texts")
        if not 0 <= self.response_start <= len(self.ids):
            raise ExplainError(f"response_start {self.response_start} is outside 0..{len(self.ids)}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_response(self) -> bool:
        """True when there is at least one response token."""
        return self.response_start < len(self.ids)

    def segment(self, pos: int) -> str:
        """``"request"`` or ``"response"``."""
        return "response" if pos >= self.response_start else "request"

    def tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """The ids as a ``[1, pos]`` tensor."""
        return torch.tensor([self.ids], dtype=torch.long, device=device)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Text of each token on its own (special tokens kept)."""
    return list(tokenizer.batch_decode([[int(i)] for i in ids], skip_special_tokens=False))


def encode(pair: Any, prompt: str | Conversation, response: str = "") -> TokenSeq:
    """Chat-format a prompt and a response (or prefill) exactly as :func:`cbscope.cosine_trace`.

    Raises:
        ExplainError: An empty prompt.
    """
    if isinstance(prompt, str) and not prompt.strip():
        raise ExplainError("the prompt is empty: give a request")
    encoded = encode_chat(pair.tokenizer, prompt, response or "")
    return TokenSeq(
        ids=list(encoded.input_ids),
        response_start=encoded.response_start,
        tokens=token_texts(pair.tokenizer, encoded.input_ids),
        prompt=prompt if isinstance(prompt, str) else as_messages(prompt),
        response=response or "",
    )


def from_trace(trace: Any, example: int = 0) -> TokenSeq:
    """The exact tokens of one example of a :class:`~cbscope.trace.CosineTrace`."""
    if not trace.token_ids:
        raise ExplainError("this trace has no token ids (saved by an old cbscope?)")
    ids = list(trace.token_ids[example])
    return TokenSeq(
        ids=ids,
        response_start=int(trace.response_start[example]),
        tokens=list(trace.tokens[example]),
        prompt=trace.prompts[example] if trace.prompts else "",
        response=trace.responses[example] if trace.responses else "",
        prefill_end=trace.prefill_end[example] if trace.prefill_end else None,
    )


def special_positions(tokenizer: Any, seq: TokenSeq) -> list[bool]:
    """Whether each token is one of the tokenizer's special tokens (chat markers, BOS ...)."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
    return [int(i) in special for i in seq.ids]


def content_positions(tokenizer: Any, seq: TokenSeq) -> list[bool]:
    """Which tokens are the user's words or the response, not the chat template's scaffold.

    The request's last user message spans the positions that change when its content does:
    the request is re-rendered with other content, and the common prefix (chat markers, a
    default system prompt, earlier turns) and suffix (end of turn, assistant header) are
    scaffold. Every response token is content. Without a recorded prompt, every non-special
    token counts as content.
    """
    special = special_positions(tokenizer, seq)
    if not seq.prompt:
        return [not s for s in special]
    messages = as_messages(seq.prompt)
    other = [*messages[:-1], {**messages[-1], "content": "~ 0 ~"}]
    alt = encode_chat(tokenizer, other).input_ids
    request = seq.ids[: seq.response_start]
    prefix = 0
    while prefix < min(len(alt), len(request)) and alt[prefix] == request[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < min(len(alt), len(request)) - prefix
           and alt[-1 - suffix] == request[-1 - suffix]):
        suffix += 1
    return [(prefix <= p < len(request) - suffix or p >= seq.response_start) and not special[p]
            for p in range(len(seq))]


# ---------------------------------------------------------------------- the firing point
@dataclass(frozen=True)
class Focus:
    """The token and layer an explanation looks at.

    Attributes:
        pos: Token position.
        layer: Paper-convention layer.
        cos: Cosine there.
        token: The token's text.
        kind: ``"response"`` (the breaker fires there: the first response token below the
            threshold at one of the layers), ``"request"`` (it does not fire on the response,
            but the cosine dips below the threshold inside the request: the first such token)
            or ``"lowest"`` (neither: the lowest cosine, over the response if there is one).
        threshold: The threshold used.
    """

    pos: int
    layer: int
    cos: float
    token: str
    kind: FocusKind
    threshold: float

    @property
    def fires(self) -> bool:
        """True when the cosine is below the threshold there (on the response or the request)."""
        return self.kind != "lowest"

    def describe(self) -> str:
        """In words."""
        token = self.token.strip() or self.token
        where = f'token "{token}" (pos {self.pos}), layer {self.layer}, cosine {self.cos:.2f}'
        if self.kind == "response":
            return f"fires at {where}"
        if self.kind == "request":
            return f"does not fire on the response, but dips inside the request at {where}"
        return f"does not fire (threshold {self.threshold:g}); lowest cosine at {where}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"pos": self.pos, "layer": self.layer, "cos": self.cos, "token": self.token,
                "kind": self.kind, "threshold": self.threshold, "fires": self.fires}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Focus:
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["pos"]), int(data["layer"]), float(data["cos"]), str(data["token"]),
                   data["kind"], float(data["threshold"]))


def find_focus(
    cos: Float[Tensor, "layer pos"],
    traced_layers: Sequence[int],
    seq: TokenSeq,
    layers: Sequence[int],
    threshold: float,
) -> Focus:
    """The focus point (see :class:`Focus`) of cosines ``cos`` traced at ``traced_layers``.

    At the chosen position the lowest layer below the threshold is reported (as
    :meth:`cbscope.trace.CosineTrace.firing_point` does); for ``"lowest"`` the layer of the
    minimum.
    """
    index = [list(traced_layers).index(layer) for layer in layers]
    values = cos[index].float()
    start = seq.response_start
    for kind, lo, hi in (("response", start, len(seq)), ("request", 0, start)):
        below = values[:, lo:hi] < threshold
        if bool(below.any()):
            offset = int(below.any(dim=0).nonzero()[0, 0])
            row = int(below[:, offset].nonzero()[0, 0])
            pos = lo + offset
            return Focus(pos, layers[row], float(values[row, pos]), seq.tokens[pos], kind,
                         float(threshold))
    lo = start if seq.has_response else 0
    window = torch.nan_to_num(values[:, lo:], nan=2.0)
    flat = int(torch.argmin(window))
    row, offset = divmod(flat, window.shape[1])
    pos = lo + offset
    return Focus(pos, layers[row], float(values[row, pos]), seq.tokens[pos], "lowest",
                 float(threshold))


def check_threshold(threshold: float) -> float:
    """A cosine threshold in (-1, 1]."""
    value = float(threshold)
    if not -1.0 < value <= 1.0 or math.isnan(value):
        raise ExplainError(f"threshold must be a cosine in (-1, 1], got {threshold}")
    return value


def check_layers(pair: Any, layers: Sequence[int] | None) -> list[int]:
    """Paper-convention layers (default: the adapter's target layers), validated."""
    chosen = pair.target_layers if layers is None else list(layers)
    return validate_layers(chosen, pair.n_layers)


def require_adapter(pair: Any) -> None:
    """Raise :class:`ExplainError` when the pair has no circuit breaker to explain."""
    if not getattr(pair, "has_adapter", False):
        raise ExplainError("this pair has no adapter: load one with load_pair(spec, adapter=DIR)")


# ---------------------------------------------------------------------- hooked forwards
class _Stop(Exception):  # noqa: N818 - control flow, not an error
    """Raised from the last needed hook so the rest of the forward is skipped."""


def run_hooked(
    pair: Any,
    input_ids: Tensor,
    hooks: Sequence[tuple[str, Callable[..., Any]]],
    stop_at: str | None,
    attention_mask: Tensor | None = None,
) -> None:
    """One bridge forward with ``hooks``, stopped right after the hook point ``stop_at``."""
    fwd = list(hooks)
    if stop_at is not None:
        def stop(_activation: Tensor, hook: Any) -> None:
            raise _Stop

        fwd.append((stop_at, stop))
    input_ids = input_ids.to(pair.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(pair.device)
    with contextlib.suppress(_Stop), pair.bridge.hooks(fwd_hooks=fwd):
        pair.bridge(input_ids, attention_mask=attention_mask, return_type=None)


@torch.no_grad()
def resid_at(pair: Any, seq: TokenSeq, layers: Sequence[int]) -> list[Tensor]:
    """The residual stream at ``layers`` in the pair's current state (``[pos, d]`` each)."""
    store: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(activation: Tensor, hook: Any) -> None:
            store[layer] = activation[0].detach().clone()

        return hook

    hooks = [(f"blocks.{layer - 1}.hook_resid_post", keep(layer)) for layer in layers]
    run_hooked(pair, seq.tensor(pair.device), hooks, f"blocks.{max(layers) - 1}.hook_resid_post")
    return [store[layer] for layer in layers]


@dataclass
class Captured:
    """The residual stream of one forward, split into its summands (batch of one or more).

    ``resid[l - 1]`` is paper layer ``l`` (``blocks.{l-1}.hook_resid_post``); for Llama-style
    pre-norm blocks ``resid[L - 1] = embed + sum_{b < L} (attn[b] + mlp[b])``.
    """

    embed: Float[Tensor, "batch pos d_model"]
    attn: list[Float[Tensor, "batch pos d_model"]] = field(default_factory=list)
    mlp: list[Float[Tensor, "batch pos d_model"]] = field(default_factory=list)
    resid: list[Float[Tensor, "batch pos d_model"]] = field(default_factory=list)
    mid: list[Float[Tensor, "batch pos d_model"]] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        """Blocks captured."""
        return len(self.resid)

    def pre(self, block: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream entering ``block`` (``blocks.{block}.hook_resid_pre``)."""
        return self.embed if block == 0 else self.resid[block - 1]

    def added(self, kind: str, block: int) -> Float[Tensor, "batch pos d_model"]:
        """What ``block``'s attention (``kind="attn"``) or MLP added to the float32 residual
        stream, in float64: ``hook_resid_mid - hook_resid_pre`` or ``hook_resid_post -
        hook_resid_mid``. It equals ``hook_attn_out`` / ``hook_mlp_out`` up to the rounding of
        the model's own addition, and the increments telescope: ``embed + sum of increments``
        is ``resid`` to float64 precision."""
        if kind == "attn":
            return self.mid[block].double() - self.pre(block).double()
        return self.resid[block].double() - self.mid[block].double()


@torch.no_grad()
def capture(
    pair: Any,
    input_ids: Tensor,
    up_to_layer: int,
    *,
    attention_mask: Tensor | None = None,
    extra_hooks: Sequence[tuple[str, Callable[..., Any]]] = (),
) -> Captured:
    """Run the bridge in the pair's current adapter state and keep the residual summands of
    blocks ``0 .. up_to_layer - 1`` (see :class:`Captured`).

    ``extra_hooks`` run before the capturing hooks of the same hook point (a patch there is
    what gets captured).
    """
    store: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: Any) -> None:
        store[hook.name] = activation.detach().clone()

    names = ["blocks.0.hook_resid_pre"]
    for block in range(up_to_layer):
        names += [f"blocks.{block}.hook_attn_out", f"blocks.{block}.hook_mlp_out",
                  f"blocks.{block}.hook_resid_mid", f"blocks.{block}.hook_resid_post"]
    hooks = [*extra_hooks, *[(name, keep) for name in names]]
    run_hooked(pair, input_ids, hooks, f"blocks.{up_to_layer - 1}.hook_resid_post", attention_mask)
    hook_dict = pair.bridge.hook_dict  # a property that walks the module tree: read it once
    resolved = {name: hook_dict[name].name for name in names}
    got = {name: store[resolved[name]] for name in names if resolved[name] in store}
    missing = [name for name in names if name not in got]
    if missing:
        raise RuntimeError(f"hook points {missing[:3]} did not fire on this bridge")
    return Captured(
        embed=got["blocks.0.hook_resid_pre"],
        attn=[got[f"blocks.{b}.hook_attn_out"] for b in range(up_to_layer)],
        mlp=[got[f"blocks.{b}.hook_mlp_out"] for b in range(up_to_layer)],
        resid=[got[f"blocks.{b}.hook_resid_post"] for b in range(up_to_layer)],
        mid=[got[f"blocks.{b}.hook_resid_mid"] for b in range(up_to_layer)],
    )


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last axis (float32 out, computed in float64)."""
    a, b = a.double(), b.double()
    dot = (a * b).sum(-1)
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return (dot / norms.clamp_min(COS_EPS)).float()
