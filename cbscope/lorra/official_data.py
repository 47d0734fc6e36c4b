"""The official circuit-breakers data, read from user-given files (``llama3-8b-rr``,
``mistral-7b-rr``).

Files (nothing is downloaded; give the paths with ``--data-options``):

* ``cb_file``: ``circuit_breakers_train.json``, a JSON list of objects with ``prompt``,
  ``output`` (the harmful answer), ``llama3_output`` (Llama-3's refusal) and ``category``.
* ``ultrachat``: UltraChat-style chats (``ultrachat_200k``'s ``test_sft`` split saved as JSON
  Lines or a JSON list), each row with ``messages``: ``[{"role", "content"}, ...]``.
* ``xstest``: ``xstest_v2_completions_gpt4_gpteval.csv`` (``prompt``, ``completion``,
  ``final_label``); only ``1_full_compliance`` rows are used, each 50 times, as the official
  dataset does.
* ``val_file`` (optional): ``circuit_breakers_val.json`` (``prompt``, ``output``).

What the official ``CircuitBreakerDataset`` does, and this reader does too:

* circuit-breaker examples: every ``(prompt, output)``;
* retain pool: ``num_examples`` UltraChat chats with at least two messages, the XSTest rows and,
  when ``refusal_retain`` (Llama-3), 2,000 shuffled circuit-breaker prompts with their
  ``llama3_output``, twice. One pool, sampled uniformly (cbscope's ``benign`` source);
* each example's request is dropped (an empty user turn) with probability ``drop`` (1/2 for
  Llama-3, 0 for Mistral), once, when the data is built; a kept UltraChat example is its
  messages' texts joined by spaces, as plain text; a dropped one is the first answer after an
  empty request.

The official code renders examples with its own string template and tokenises each as one
string; cbscope renders them with the model's chat template (``docs/recipe.md``).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cbscope.data import ChatExample, DatasetError
from cbscope.errors import MissingFileError
from cbscope.lorra.data import LorraData, check_utf8, text_example

CB_FIELDS = ("prompt", "output", "llama3_output", "category")
VAL_FIELDS = ("prompt", "output")
XSTEST_FIELDS = ("prompt", "completion", "final_label")
XSTEST_REPEAT = 50
REFUSAL_EXAMPLES = 2000


def _require_file(path: str | os.PathLike[str] | None, option: str) -> Path:
    if path is None:
        raise MissingFileError(f"the official data needs --data-options '{{\"{option}\": PATH}}'")
    return check_utf8(path)


def read_records(path: str | os.PathLike[str], fields: Sequence[str]) -> list[dict[str, str]]:
    """A JSON list (or JSON Lines) of objects, each with string ``fields``.

    Raises:
        MissingFileError: No such file.
        DatasetError: Not JSON, not a list of objects, or a record missing a field (or with a
            non-string one); the message names the file, the record and the field.
    """
    path = check_utf8(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if data is None:
        data = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}, line {number}: not JSON ({err.msg}); give a JSON list "
                                   "or JSON Lines") from err
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a JSON list of records is expected, not {type(data).__name__}")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}, record {index}: an object is expected, not "
                               f"{type(record).__name__}")
        for name in fields:
            if name not in record:
                raise DatasetError(f"{path}, record {index}: missing field {name!r} (each record "
                                   f"needs {', '.join(fields)})")
            if not isinstance(record[name], str):
                raise DatasetError(f"{path}, record {index}: field {name!r} must be a string, not "
                                   f"{type(record[name]).__name__}")
    if not data:
        raise DatasetError(f"{path}: no records")
    return data


def read_ultrachat(path: str | os.PathLike[str], limit: int) -> list[list[dict[str, str]]]:
    """The first ``limit`` chats with at least two messages (each a list of role/content)."""
    path = check_utf8(path)
    rows = read_records(path, ())
    chats = []
    for index, row in enumerate(rows):
        messages = row.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise DatasetError(f"{path}, record {index}: field 'messages' must be a list of "
                               "{role, content} objects")
        if len(messages) >= 2:
            chats.append(messages)
        if len(chats) >= limit:
            break
    return chats


def read_xstest(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The ``1_full_compliance`` rows of an XSTest completions CSV."""
    path = check_utf8(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in XSTEST_FIELDS if name not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: missing column {missing[0]!r} (needs "
                               f"{', '.join(XSTEST_FIELDS)})")
        return [row for row in reader if row["final_label"] == "1_full_compliance"]


def _chat(prompt: str, response: str, dropped: bool, **meta: Any) -> ChatExample:
    return ChatExample([{"role": "user", "content": "" if dropped else prompt}], response,
                       {**meta, "request_dropped": dropped})


def official_data(
    pair: Any = None,
    *,
    cb_file: str | None = None,
    ultrachat: str | None = None,
    xstest: str | None = None,
    val_file: str | None = None,
    refusal_retain: bool = True,
    drop: float = 0.5,
    num_examples: int = 10000,
    seed: int = 0,
    **_: Any,
) -> LorraData:
    """The official training data (see the module docstring).

    Args:
        pair: Unused (the official data has its answers); kept for the preset interface.
        cb_file: ``circuit_breakers_train.json``.
        ultrachat: UltraChat chats (JSON Lines or a JSON list with ``messages``).
        xstest: ``xstest_v2_completions_gpt4_gpteval.csv``.
        val_file: ``circuit_breakers_val.json`` (optional).
        refusal_retain: Add 2,000 circuit-breaker prompts with ``llama3_output``, twice.
        drop: Probability that an example's request is dropped.
        num_examples: UltraChat chats read.
        seed: Seed of the shuffles and of the request drops.

    Raises:
        MissingFileError: A file not given or not there.
        DatasetError: A record missing a field, naming the file, the record and the field.
    """
    cb_path = _require_file(cb_file, "cb_file")
    chat_path = _require_file(ultrachat, "ultrachat")
    xs_path = _require_file(xstest, "xstest")
    records = read_records(cb_path, CB_FIELDS)
    rng = random.Random(seed)
    chats = read_ultrachat(chat_path, num_examples)
    borderline = read_xstest(xs_path)
    val_records = read_records(val_file, VAL_FIELDS) if val_file is not None else []

    def dropped() -> bool:
        return rng.random() < drop

    pool: list[ChatExample] = []
    for messages in chats:
        if dropped():
            pool.append(_chat("", messages[1]["content"], True, origin="ultrachat"))
        else:
            pool.append(text_example(" ".join(m["content"] for m in messages), origin="ultrachat"))
    for row in borderline * XSTEST_REPEAT:
        pool.append(_chat(row["prompt"], row["completion"], dropped(), origin="xstest"))
    if refusal_retain:
        shuffled = list(records)
        rng.shuffle(shuffled)
        for record in shuffled[:REFUSAL_EXAMPLES] * 2:
            pool.append(_chat(record["prompt"], record["llama3_output"], dropped(),
                              origin="refusal", category=record["category"]))
    cb = [_chat(r["prompt"], r["output"], dropped(), category=r["category"]) for r in records]
    val = [_chat(r["prompt"], r["output"], False) for r in val_records]
    if not pool:
        raise DatasetError(f"{chat_path}: no chat with at least two messages, and no retain rows")
    return LorraData(
        cb=cb,
        retain={"benign": pool},
        val=val,
        info={
            "official_data": {
                "cb_file": str(cb_path), "ultrachat": str(chat_path), "xstest": str(xs_path),
                "val_file": None if val_file is None else str(val_file),
                "ultrachat_chats": len(chats), "xstest_rows": len(borderline),
                "refusal_retain": refusal_retain, "drop": drop, "seed": seed,
            },
        },
    )
