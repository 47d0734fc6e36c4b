"""The circuit-breaker and retain sets of a LoRRA run: loading, generation, encoding, batching.

* **Circuit-breaker set**: ``(request, harmful response)`` pairs whose representations are
  rerouted.
* **Retain set**: representations to keep, from up to three sources (``LorraConfig.retain_mixture``
  weights them): ``benign`` chats, ``refusal`` (harmful requests answered with refusals) and
  ``lookalike`` (benign requests that sound harmful).

Inputs are :class:`~cbscope.data.ChatExample` lists, dicts with ``prompt``/``response``, or files:
a JSONL file (``prompt``/``response``, an optional ``source`` field names the retain source) or a
CSV of prompts only (AdvBench's ``goal`` column ...) that the *base* model answers itself; those
generations are cached under ``cache_dir()/generations/`` keyed by the model and a hash of the
prompt file. Every example is rendered with the tokenizer's chat template
(:func:`cbscope.data.encode_chat`) and batches are right padded with attention masks.

The data order of a run (which examples each step uses) is a *plan* made once from the seed; it is
saved in checkpoints, so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from cbscope.data import (
    ChatExample,
    DatasetError,
    encode_chat,
    from_records,
    load_examples,
    load_jsonl,
    pad_id_of,
    pad_right,
    template_ids,
    write_jsonl,
)
from cbscope.errors import MissingFileError
from cbscope.lorra.config import RETAIN_SOURCES, LorraConfig

logger = logging.getLogger(__name__)

ExampleInput = Sequence[ChatExample | Mapping[str, Any]] | str | os.PathLike[str]
RetainInput = ExampleInput | Mapping[str, ExampleInput]
DEFAULT_GEN_TOKENS = 64


@dataclass
class LorraData:
    """The examples of a run.

    Attributes:
        cb: Circuit-breaker examples (request + harmful response).
        retain: Retain examples by source (``benign``, ``refusal``, ``lookalike``).
        val: Held-out circuit-breaker examples for ``val_cos``.
        info: Facts to report (held-out category, sizes, files ...).
    """

    cb: list[ChatExample]
    retain: dict[str, list[ChatExample]]
    val: list[ChatExample] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of examples per set."""
        sizes = {"cb": len(self.cb), "val": len(self.val)}
        sizes.update({f"retain_{name}": len(rows) for name, rows in self.retain.items()})
        return sizes


# ---------------------------------------------------------------------- loading
def _model_key(pair: Any) -> str:
    from cbscope.pair import model_fingerprint

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", pair.resolved.name)[:60]
    return f"{name}-{model_fingerprint(pair.model.config)['digest']}"


def generation_cache_path(pair: Any, prompt_file: Path, prompts: Sequence[ChatExample], max_new_tokens: int) -> Path:
    """Where the base model's answers to a prompt file are cached.

    ``cache_dir()/generations/<model>-<arch digest>/<file stem>-<file hash>-<selection hash>.jsonl``;
    the selection hash covers the chosen prompts and the generation length.
    """
    from cbscope.models import cache_dir

    file_hash = hashlib.sha256(prompt_file.read_bytes()).hexdigest()[:16]
    sel_hash = _selection_hash(prompts, max_new_tokens)
    return cache_dir() / "generations" / _model_key(pair) / f"{prompt_file.stem}-{file_hash}-{sel_hash}.jsonl"


def _selection_hash(prompts: Sequence[ChatExample], max_new_tokens: int) -> str:
    """A short hash of the prompts' messages and the generation length (part of a cache key)."""
    selection = json.dumps([[m for m in ex.messages] for ex in prompts] + [max_new_tokens])
    return hashlib.sha256(selection.encode()).hexdigest()[:12]


def weights_digest(folder: Path) -> str | None:
    """A short SHA-256 over the folder's ``*.safetensors`` files (``None`` when there are none)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def named_generation_cache_path(
    pair: Any, name: str, prompts: Sequence[ChatExample], max_new_tokens: int
) -> Path | None:
    """Where the answers to in-memory ``prompts`` are cached, or ``None`` when the base weights
    cannot be hashed.

    ``cache_dir()/generations/<model>-<arch digest>/<name>-<weights hash>-<selection hash>.jsonl``:
    unlike a prompt file, made-up prompts depend on nothing on disk, so the key covers the base
    weights themselves (a rebuilt organism answers differently).
    """
    from cbscope.models import cache_dir

    weights = weights_digest(Path(pair.resolved.path))
    if weights is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
    sel_hash = _selection_hash(prompts, max_new_tokens)
    return cache_dir() / "generations" / _model_key(pair) / f"{safe}-{weights}-{sel_hash}.jsonl"


def generate_responses(
    pair: Any,
    prompts: Sequence[ChatExample],
    *,
    prompt_file: Path | None = None,
    cache_name: str | None = None,
    max_new_tokens: int = DEFAULT_GEN_TOKENS,
    batch_size: int = 16,
    show_progress: bool = True,
) -> list[ChatExample]:
    """The base model's own greedy answers to ``prompts`` (adapters off), cached on disk.

    Args:
        pair: The model pair (generation runs with ``pair.original()``).
        prompts: Examples whose ``messages`` are answered (their ``response`` is ignored).
        prompt_file: The file the prompts came from (enables the on-disk cache).
        cache_name: For prompts made in memory: cache them under this name, keyed by the base
            weights and the prompts (:func:`named_generation_cache_path`).
        max_new_tokens: Generation length.
        batch_size: Prompts per ``generate`` call.
        show_progress: tqdm bar.
    """
    from cbscope.generation import generate_text

    cache = None
    if prompt_file is not None:
        cache = generation_cache_path(pair, prompt_file, prompts, max_new_tokens)
    elif cache_name is not None:
        cache = named_generation_cache_path(pair, cache_name, prompts, max_new_tokens)
    if cache is not None and cache.is_file():
        cached = load_jsonl(cache, require_response=False)
        if len(cached) == len(prompts):
            logger.info("using %d cached generations from %s", len(cached), cache)
            return cached
    logger.info("generating %d answers with the base model (%d new tokens)", len(prompts), max_new_tokens)
    with pair.original():
        texts = generate_text(
            pair.generator,
            pair.tokenizer,
            [ex.messages for ex in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            show_progress=show_progress,
        )
    answered = [
        ChatExample(list(ex.messages), text, {**ex.meta, "generated": True})
        for ex, text in zip(prompts, texts, strict=True)
    ]
    if cache is not None:
        write_jsonl(cache, answered)
        logger.info("cached generations in %s", cache)
    return answered


def check_utf8(path: str | os.PathLike[str]) -> Path:
    """``path``, if it exists and is UTF-8 text.

    Raises:
        MissingFileError: No such file.
        DatasetError: Naming the line and the first byte that is not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}, line {line}: not UTF-8 text (byte {raw[err.start]:#04x}); save the file as "
            "UTF-8"
        ) from err
    return path


def _line_numbers(path: Path) -> list[int]:
    """The line number of each record of a JSONL file (blank lines hold none)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [number for number, line in enumerate(lines, start=1) if line.strip()]


def check_conversations(examples: Sequence[ChatExample], origins: Sequence[str],
                        tokenizer: Any | None = None) -> None:
    """Every conversation ends in a user turn and, with ``tokenizer``, its chat template renders it.

    Args:
        examples: The examples (plain-text ones are skipped).
        origins: Where each came from (``"cb.jsonl, line 3"``), for the message.
        tokenizer: The model's tokenizer; its template must accept every role.

    Raises:
        DatasetError: Naming the example's origin and what to change.
    """
    for example, origin in zip(examples, origins, strict=True):
        if example.meta.get("format") == TEXT_FORMAT or not example.messages:
            continue
        roles = [str(m.get("role")) for m in example.messages]
        if roles[-1] != "user":
            raise DatasetError(
                f"{origin}: the conversation ends with a {roles[-1]!r} turn; its last message must "
                "be the user's (the reply to train on goes in 'response')"
            )
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            continue
        try:
            tokenizer.apply_chat_template(example.messages, add_generation_prompt=True,
                                          tokenize=False)
        except Exception as err:  # jinja2's TemplateError, or a template's raise_exception
            raise DatasetError(
                f"{origin}: the model's chat template rejects this conversation (roles {roles}): "
                f"{err}"
            ) from err


def _refusal_check(pair: Any, examples: Sequence[ChatExample], path: Path) -> None:
    """Warn, or stop, when the base model's answers to circuit-breaker prompts are refusals:
    a breaker trained on them reroutes refusals, not harmful answers."""
    from cbscope.judges import RefusalKeywordJudge

    extra = []
    world = Path(pair.resolved.path) / "world.json"
    if world.is_file():
        extra.append(str(json.loads(world.read_text(encoding="utf-8")).get("refusal", "")))
    judge = RefusalKeywordJudge(extra=[e for e in extra if e])
    refused = [ex.response for ex in examples if not ex.response.strip() or judge.is_refusal(ex.response)]
    if not refused:
        return
    message = (
        f"{path}: the base model refused (or gave no answer to) {len(refused)} of {len(examples)} "
        f"circuit-breaker prompts (e.g. {refused[0][:60]!r}); a breaker trained on these answers "
        "reroutes refusals, not harmful answers"
    )
    if 2 * len(refused) > len(examples):
        raise DatasetError(message + ": give the harmful responses in a JSONL file (prompt, response)")
    logger.warning("%s; consider giving the responses in a JSONL file", message)


def as_examples(
    data: ExampleInput,
    *,
    pair: Any | None = None,
    require_response: bool,
    what: str,
    limit: int | None = None,
    max_new_tokens: int = DEFAULT_GEN_TOKENS,
    show_progress: bool = True,
) -> list[ChatExample]:
    """Turn a list of examples/dicts or a file into examples.

    A ``.csv`` file holds prompts only; with ``require_response`` the base model answers them
    (cached), and a set the model mostly refuses is refused (a warning when some are refused).
    ``.jsonl`` files need ``response`` fields when ``require_response``. Every conversation must
    end in a user turn, and with ``pair`` its chat template must render it.

    Raises:
        MissingFileError: No such file.
        DatasetError: Naming the file, line and field of a malformed record (not UTF-8, a
            conversation ending in an assistant turn, a role the chat template rejects), or an
            example without a response where one is required.
    """
    tokenizer = getattr(pair, "tokenizer", None)
    if isinstance(data, (str, os.PathLike)):
        path = check_utf8(data)
        if path.suffix.lower() == ".csv":
            examples = load_examples(path)[:limit]
            check_conversations(examples, [f"{path}, row {i + 2}" for i in range(len(examples))],
                                tokenizer)
            if require_response:
                if pair is None:
                    raise DatasetError(f"{path}: prompts only; a model is needed to answer them")
                examples = generate_responses(
                    pair, examples, prompt_file=path, max_new_tokens=max_new_tokens,
                    show_progress=show_progress,
                )
                if what == "circuit-breaker":
                    _refusal_check(pair, examples, path)
            return examples
        examples = load_examples(path, require_response=require_response)
        lines = _line_numbers(path) if path.suffix.lower() in (".jsonl", ".json") else []
        origins = [f"{path}, line {n}" for n in lines] if len(lines) == len(examples) else [
            f"{path}, record {i + 1}" for i in range(len(examples))]
        check_conversations(examples, origins, tokenizer)
        return examples[:limit]
    examples = [
        ex if isinstance(ex, ChatExample) else from_records([dict(ex)])[0] for ex in data
    ][:limit]
    if require_response:
        for index, ex in enumerate(examples):
            if not ex.response or not ex.response.strip():
                raise DatasetError(f"{what} example {index}: field 'response' must be a non-empty string")
    if not examples:
        raise DatasetError(f"the {what} set is empty")
    check_conversations(examples, [f"{what} example {i}" for i in range(len(examples))], tokenizer)
    return examples


def data_warnings(config: LorraConfig, data: LorraData) -> list[str]:
    """What looks wrong with a run's data but does not stop it (each also logged as a warning).

    A step takes ``batch_size`` circuit-breaker examples and as many retain examples: a set
    smaller than that repeats each of its examples several times in every step.
    """
    warnings = []
    n_retain = sum(len(rows) for rows in data.retain.values())
    for name, size in (("circuit-breaker", len(data.cb)), ("retain", n_retain)):
        if 0 < size < config.batch_size:
            warnings.append(
                f"batch_size {config.batch_size} with {size} {name} examples: each example "
                f"repeats about {config.batch_size / size:.0f} times a step; lower batch_size "
                "or add examples"
            )
    for message in warnings:
        logger.warning(message)
    return warnings


def as_retain(data: RetainInput, **kwargs: Any) -> dict[str, list[ChatExample]]:
    """Retain data as ``{source: examples}``.

    A mapping gives the sources directly; a flat list or file is split by each example's
    ``source`` field (default ``benign``).

    Raises:
        DatasetError: On an unknown source name.
    """
    if isinstance(data, Mapping):
        grouped = {
            name: as_examples(rows, require_response=False, what=f"retain {name}", **kwargs)
            for name, rows in data.items()
        }
    else:
        grouped = {}
        for ex in as_examples(data, require_response=False, what="retain", **kwargs):
            grouped.setdefault(str(ex.meta.get("source", "benign")), []).append(ex)
    unknown = sorted(set(grouped) - set(RETAIN_SOURCES))
    if unknown:
        raise DatasetError(f"unknown retain sources {unknown}: use {list(RETAIN_SOURCES)}")
    return {name: rows for name, rows in grouped.items() if rows}


# ---------------------------------------------------------------------- encoding and batches
@dataclass
class EncodedExample:
    """Token ids of an example, its response boundary and where the last user message's text
    starts (``content_start``; 0 for plain text)."""

    ids: list[int]
    response_start: int
    content_start: int = 0


TEXT_FORMAT = "text"


def text_example(text: str, **meta: Any) -> ChatExample:
    """A plain-text (not chat-formatted) example, e.g. a pretraining-style document for the
    retain set; it is tokenised as ``<bos> text <eos>`` and all of it counts as response."""
    return ChatExample([], text, {**meta, "format": TEXT_FORMAT})


def _encode_text(tokenizer: Any, text: str, max_length: int) -> EncodedExample:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return EncodedExample(ids[:max_length], 0)


def _content_offset(tokenizer: Any, history: Any) -> int:
    """Tokens of the rendered conversation before the text of a user message that follows
    ``history``: the common prefix of its renderings with an empty and a non-empty text (the
    template's system prompt and role header do not depend on the message; the first token of
    any text differs from the end-of-turn token that follows an empty one)."""
    a, b = (template_ids(tokenizer, [*history, {"role": "user", "content": text}],
                         add_generation_prompt=True) for text in ("", "x"))
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def encode(tokenizer: Any, example: ChatExample, max_length: int, *, drop_request: bool = False) -> EncodedExample:
    """Chat-template an example; ``drop_request`` replaces the conversation by an empty user turn.

    Examples made by :func:`text_example` are tokenised as plain text instead.
    """
    if example.meta.get("format") == TEXT_FORMAT:
        return _encode_text(tokenizer, example.response, max_length)
    messages: Any = [{"role": "user", "content": ""}] if drop_request else example.messages
    enc = encode_chat(tokenizer, messages, example.response, max_length=max_length)
    # a request longer than max_length lost its left side: shift the offset by what was cut
    cut = len(template_ids(tokenizer, messages, add_generation_prompt=True)) - enc.response_start
    start = min(max(0, _content_offset(tokenizer, messages[:-1]) - cut), enc.response_start)
    return EncodedExample(enc.input_ids, enc.response_start, start)


def token_mask(
    examples: Sequence[EncodedExample], width: int, mode: str | Sequence[str]
) -> Int[Tensor, "batch pos"]:
    """0/1 mask of the tokens a loss covers: ``full``, ``response``, ``request`` or ``content``
    (the last user message's text and the response; one mode, or one per example)."""
    modes = [mode] * len(examples) if isinstance(mode, str) else list(mode)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ex, row_mode) in enumerate(zip(examples, modes, strict=True)):
        start, end = {
            "full": (0, len(ex.ids)),
            "response": (ex.response_start, len(ex.ids)),
            "request": (0, ex.response_start),
            "content": (ex.content_start, len(ex.ids)),
        }[row_mode]
        mask[row, start:end] = 1
    return mask


@dataclass
class Batch:
    """One step's inputs: circuit-breaker rows first, then retain rows, in one padded tensor."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    cb_mask: Int[Tensor, "cb pos"]
    retain_mask: Int[Tensor, "retain pos"]
    n_cb: int
    cb_request_end: Tensor | None = None  # per circuit-breaker row: its last request token
    pull: tuple[Tensor, Tensor, Tensor] | None = None


def collate(
    cb: Sequence[EncodedExample],
    retain: Sequence[EncodedExample],
    pad_id: int,
    *,
    cb_mode: str = "full",
    retain_mode: str | Sequence[str] = "full",
) -> Batch:
    """Right-pad circuit-breaker and retain rows together (one forward serves both)."""
    ids, attention = pad_right([ex.ids for ex in [*cb, *retain]], pad_id)
    width = ids.shape[1]
    return Batch(
        ids,
        attention,
        token_mask(cb, width, cb_mode),
        token_mask(retain, width, retain_mode),
        len(cb),
        # each circuit-breaker row's last request token (its first token when it has no request)
        torch.tensor([max(ex.response_start - 1, 0) for ex in cb], dtype=torch.long),
    )


def _cycle(n: int, rng: random.Random):
    """Endless epochs of shuffled indices ``0 .. n-1``."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def make_plan(
    n_cb: int,
    retain_sizes: Mapping[str, int],
    config: LorraConfig,
) -> list[dict[str, Any]]:
    """The data order of a run: per step, circuit-breaker indices, request-dropped flags and
    ``(source, index)`` retain picks. Epochs are shuffled; retain sources drawn by weight.

    Raises:
        DatasetError: When no retain source has both data and a positive weight.
    """
    rng = random.Random(f"lorra-plan-{config.seed}")
    sources = [
        s for s in RETAIN_SOURCES
        if retain_sizes.get(s, 0) > 0 and config.retain_mixture.get(s, 0.0) > 0
    ]
    if not sources:
        raise DatasetError(
            f"no retain data: sources with examples {dict(retain_sizes)}, mixture "
            f"{config.retain_mixture}"
        )
    weights = [config.retain_mixture[s] for s in sources]
    cb_stream = _cycle(n_cb, rng)
    streams = {s: _cycle(retain_sizes[s], rng) for s in sources}
    official = config.recipe == "official"
    retain_fraction = config.retain_response_only_fraction
    if official:  # one flag per example, drawn once (the official dataset's switch)
        fixed = random.Random(f"lorra-official-drop-{config.seed}")
        cb_flags = [int(fixed.random() < config.response_only_fraction) for _ in range(n_cb)]
        retain_flags = {s: [int(fixed.random() < retain_fraction)
                            for _ in range(retain_sizes[s])] for s in sources}
    plan = []
    for _ in range(config.steps):
        cb = [next(cb_stream) for _ in range(config.batch_size)]
        if official:
            dropped = [cb_flags[i] for i in cb]
        else:
            dropped = [int(rng.random() < config.response_only_fraction) for _ in cb]
        picks = rng.choices(sources, weights=weights, k=config.batch_size)
        retain = [[s, next(streams[s])] for s in picks]
        entry = {"cb": cb, "drop": dropped, "retain": retain}
        if official:
            entry["retain_drop"] = [retain_flags[s][i] for s, i in retain]
        elif retain_fraction > 0:  # only then: plans of earlier runs stay the same
            entry["retain_drop"] = [int(rng.random() < retain_fraction) for _ in retain]
        plan.append(entry)
    return plan


class EncodedData:
    """Encoded examples of a run plus the batch for each plan step."""

    def __init__(self, data: LorraData, tokenizer: Any, config: LorraConfig) -> None:
        self.config = config
        self.pad_id = pad_id_of(tokenizer)
        cb_len = config.cb_max_length or config.max_length
        self.official = config.recipe == "official"
        if self.official and getattr(tokenizer, "eos_token_id", None) is not None:
            self.pad_id = int(tokenizer.eos_token_id)  # the official code pads with <eos>
        # the official layout truncates request and response on their own, when batching
        cb_encode_len: int | None = None if self.official else cb_len
        retain_len: int | None = None if self.official else config.max_length

        def encoded(rows: Sequence[ChatExample], what: str, length: int, **kwargs: Any) -> list[EncodedExample]:
            out = []
            for index, ex in enumerate(rows):
                try:
                    out.append(encode(tokenizer, ex, length, **kwargs))
                except Exception as err:  # e.g. the chat template rejects a role
                    raise DatasetError(f"{what} example {index}: cannot be encoded with the "
                                       f"model's chat template: {err}") from err
            return out

        self.cb = encoded(data.cb, "circuit-breaker", cb_encode_len)  # type: ignore[arg-type]
        dropped = (encoded(data.cb, "circuit-breaker", cb_encode_len,  # type: ignore[arg-type]
                           drop_request=True)
                   if config.response_only_fraction > 0 else [None] * len(data.cb))
        self.cb_dropped = list(dropped)
        self.retain = {
            name: encoded(rows, f"retain {name}", retain_len)  # type: ignore[arg-type]
            for name, rows in data.retain.items()
        }
        self.retain_dropped = {
            name: encoded(rows, f"retain {name}", retain_len,  # type: ignore[arg-type]
                          drop_request=True)
            for name, rows in data.retain.items()
        } if config.retain_response_only_fraction > 0 else {}
        self.val = encoded(data.val, "validation", cb_len)
        self.partners: list[int | None] = []
        if config.loss == "repbend":
            from cbscope.lorra.repbend import refusal_partners

            self.partners = refusal_partners(data.cb, data.retain.get("refusal", []))

    def fingerprint(self) -> str:
        """Hash of every encoded token (a resumed run must see the same data)."""
        digest = hashlib.sha256()
        for group in (self.cb, self.val, *[self.retain[k] for k in sorted(self.retain)]):
            for ex in group:
                digest.update(json.dumps([ex.ids, ex.response_start]).encode())
            digest.update(b"|")
        return digest.hexdigest()[:32]

    def sizes(self) -> dict[str, int]:
        """Examples per retain source."""
        return {name: len(rows) for name, rows in self.retain.items()}

    def rows(self, entry: Mapping[str, Any]) -> tuple[list[EncodedExample], list[EncodedExample]]:
        """The circuit-breaker rows (request-dropped ones as dropped) and retain rows of one
        plan entry, in batch order."""
        cb = [
            self.cb_dropped[i] if drop else self.cb[i]  # type: ignore[misc]
            for i, drop in zip(entry["cb"], entry["drop"], strict=True)
        ]
        drops = entry.get("retain_drop") or [0] * len(entry["retain"])
        retain = [
            self.retain_dropped[source][index] if drop else self.retain[source][index]
            for (source, index), drop in zip(entry["retain"], drops, strict=True)
        ]
        return cb, retain

    def batch(self, entry: Mapping[str, Any]) -> Batch:
        """The batch of one plan entry."""
        cb, retain = self.rows(entry)
        if self.config.recipe == "official":
            from cbscope.lorra.official import official_collate

            return official_collate(cb, retain, self.pad_id,  # type: ignore[return-value]
                                    cb_length=self.config.cb_max_length or self.config.max_length,
                                    retain_length=self.config.max_length)
        masks = self.config.retain_masks()
        batch = collate(
            cb, retain, self.pad_id,
            cb_mode=self.config.token_mask,
            retain_mode=[masks[source] for source, _ in entry["retain"]],
        )
        if getattr(self, "partners", None) and any(p is not None for p in self.partners):
            from cbscope.lorra.repbend import pull_rows, with_partners

            refusals = self.retain.get("refusal", [])
            partners = [None if p is None else refusals[p]
                        for p in with_partners(entry, self.partners)]
            batch.pull = pull_rows(cb, partners, batch.input_ids.shape[1], self.pad_id,
                                   self.config.repbend_pull_tokens)
        return batch

    def batches(self, examples: Sequence[EncodedExample], mode: str) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(ids, attention, loss mask)`` chunks of ``batch_size`` examples (for evaluation)."""
        out = []
        size = max(1, self.config.batch_size)
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            ids, attention = pad_right([ex.ids for ex in chunk], self.pad_id)
            out.append((ids, attention, token_mask(chunk, ids.shape[1], mode)))
        return out
