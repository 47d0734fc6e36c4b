"""Chat formatting, tokenisation with segment boundaries, right padding, and dataset files.

Every example is a conversation rendered through the tokenizer's own chat template. The request
(everything up to and including the assistant header) and the response are tokenised so that
``response_start`` is the index of the first response token; this is the boundary that the
trainer's token masks and the cosine traces use.

A base model without a chat template gets :data:`PLAIN_CHAT_TEMPLATE` (the ``gemma3-270m`` spec
saves it with its converted tokenizer), so every tool renders it the same way.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from cbscope.errors import DatasetError, PromptError

Message = dict[str, str]
Conversation = list[Message]

DEFAULT_MAX_PROMPT_CHARS = 8000

#: A plain prompt template for base models (Jinja, for ``tokenizer.chat_template``)::
#:
#:     <bos>Question: {user turn}
#:     Answer:
#:     {assistant turn}
#:
#:     Question: {next user turn}
#:     Answer:
#:
#: A system message is written first as plain text followed by a blank line. The generation
#: prompt ends in a newline, so a response starts a new line and is tokenised on its own exactly as
#: it is inside the whole rendered text (with ``"Answer:"`` and a response starting with a space,
#: a stripped response would not be); :func:`encode_chat`'s boundary then falls between the
#: tokens the model itself sees. "Question/Answer" rather than "User/Assistant": on 31 AdvBench and
#: Alpaca prompts, Gemma-3-270M (base) gave 15 greedy answers that pass the degenerate-output
#: judge's repetition and entropy checks with it, 6 with "User:/Assistant:" (which it often
#: continues with more empty turns).
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Question: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Answer:\n{{ message['content'] }}\n\n"
    "{% else %}{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:\n{% endif %}"
)




@dataclass
class ChatExample:
    """One example: a conversation ending in a user turn, plus an optional assistant response.

    Attributes:
        messages: The conversation up to the final user turn.
        response: Assistant text (a full response or a prefill); may be empty.
        meta: Free-form fields carried along (topic, category, source ...).
    """

    messages: Conversation
    response: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """Text of the last user turn."""
        return self.messages[-1]["content"]


@dataclass
class Encoded:
    """A tokenised example.

    Attributes:
        input_ids: Token ids of request + response.
        response_start: Index of the first response token (== len when there is no response).
        turn_starts: Start index of each message's rendering (multi-turn boundaries).
    """

    input_ids: list[int]
    response_start: int
    turn_starts: list[int] = field(default_factory=list)


def as_messages(prompt: str | Conversation) -> Conversation:
    """A prompt string or a list of role/content messages -> a list of messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = [dict(message) for message in prompt]
    for index, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise PromptError(f"message {index} needs 'role' and 'content' keys, got {message}")
    if not messages:
        raise PromptError("empty conversation")
    return messages


def check_prompt(text: str, *, max_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> str:
    """Reject an empty or over-long prompt with a message that says what to do."""
    if not text or not text.strip():
        raise PromptError("the prompt is empty: type a request")
    if len(text) > max_chars:
        raise PromptError(
            f"the prompt has {len(text)} characters; the limit is {max_chars}: shorten it"
        )
    return text


def context_length(model: Any) -> int | None:
    """The longest sequence ``model`` (a Hugging Face model, or anything with a ``model``
    attribute such as a :class:`~cbscope.pair.ModelPair`) takes: its config's
    ``max_position_embeddings`` (None when the config does not say)."""
    config = getattr(model, "config", None) or getattr(getattr(model, "model", None), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _prompt_chars(prompt: str | Conversation) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(str(message.get("content", ""))) for message in prompt)


def check_request_text(
    prompt: str | Conversation, prefill: str = "", *, max_chars: int = DEFAULT_MAX_PROMPT_CHARS
) -> None:
    """The character half of :func:`check_request_length`, which needs no tokenizer: run it
    before loading a model, so an over-long prompt or prefill is refused at once.

    Raises:
        PromptError: An empty or malformed prompt, or a prompt or prefill over ``max_chars``.
    """
    if isinstance(prompt, str):
        check_prompt(prompt, max_chars=max_chars)
    else:
        as_messages(prompt)
        if _prompt_chars(prompt) > max_chars:
            raise PromptError(
                f"the conversation has {_prompt_chars(prompt)} characters; the limit is "
                f"{max_chars}: shorten it"
            )
    if len(prefill) > max_chars:
        raise PromptError(
            f"the prefill has {len(prefill)} characters; the limit is {max_chars}: shorten it"
        )


def check_request_length(
    tokenizer: Any,
    prompt: str | Conversation,
    prefill: str = "",
    *,
    context: int | None,
    gen_tokens: int = 0,
    max_chars: int = DEFAULT_MAX_PROMPT_CHARS,
) -> Encoded:
    """Check one request before any model work; the check ``cbscope trace`` and the app share.

    The prompt (a string or a conversation) and the prefill are each limited to ``max_chars``
    characters, checked before tokenising (:func:`check_request_text`: a 100k-character
    prefill is refused at once); the chat-formatted prompt, the prefill and the ``gen_tokens``
    to generate must then fit in ``context`` tokens, since positions past a model's context
    give meaningless cosines.

    Args:
        tokenizer: The model's tokenizer (with its chat template).
        prompt: The request or conversation.
        prefill: Assistant text forced after the prompt.
        context: Most tokens allowed (:func:`context_length`; None: no token limit).
        gen_tokens: Tokens that will be generated after the prefill.
        max_chars: Most characters of the prompt, and of the prefill.

    Returns:
        The request's :class:`Encoded` tokens (prompt plus prefill).

    Raises:
        PromptError: An empty or over-long prompt or prefill, a negative ``gen_tokens``, or a
            request that does not fit in ``context`` (the message gives the counts).
    """
    check_request_text(prompt, prefill, max_chars=max_chars)
    if gen_tokens < 0:
        raise PromptError(f"the number of tokens to generate must be >= 0, not {gen_tokens}")
    encoded = encode_chat(tokenizer, prompt, prefill)
    n_tokens = len(encoded.input_ids)
    if context is not None and n_tokens + gen_tokens > context:
        generated = f" and {gen_tokens} more are generated" if gen_tokens else ""
        raise PromptError(
            f"the prompt and prefill are {n_tokens} tokens{generated}; the limit for this model "
            f"is {context} tokens: shorten the prompt or the prefill"
            + (", or generate fewer tokens" if gen_tokens else "")
        )
    return encoded


def template_ids(tokenizer: Any, messages: Conversation, *, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(
    tokenizer: Any,
    prompt: str | Conversation,
    response: str = "",
    *,
    max_length: int | None = None,
) -> Encoded:
    """Tokenise a chat prompt (with generation prompt) followed by a response or prefill.

    The response is tokenised on its own and appended, so the boundary is exact for any
    tokenizer. Truncation (``max_length``) cuts the response first, then the request's left side.
    """
    messages = as_messages(prompt)
    request_ids = template_ids(tokenizer, messages, add_generation_prompt=True)
    turn_starts = [
        len(template_ids(tokenizer, messages[:index], add_generation_prompt=False)) if index else 0
        for index in range(len(messages))
    ]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    if max_length is not None and len(request_ids) + len(response_ids) > max_length:
        keep_response = max(0, max_length - len(request_ids))
        response_ids = response_ids[:keep_response]
        if len(request_ids) > max_length:
            cut = len(request_ids) - max_length
            request_ids = request_ids[cut:]
            turn_starts = [max(0, start - cut) for start in turn_starts]
    return Encoded(request_ids + response_ids, len(request_ids), turn_starts)


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Right-pad token lists into ``input_ids`` and ``attention_mask``."""
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id (falling back to eos)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def _require_text(value: Any, path: Path, line: int, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{path}, line {line}: field {name!r} must be a non-empty string")
    return value


def load_jsonl(path: str | os.PathLike[str], *, require_response: bool = True) -> list[ChatExample]:
    """Load ``{"prompt": ..., "response": ...}`` lines (``prompt`` may be a message list).

    Raises:
        DatasetError: Naming the file, line and field of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise DatasetError(f"{path}, line {line_no}: expected a JSON object")
            if "prompt" not in record:
                raise DatasetError(f"{path}, line {line_no}: missing field 'prompt'")
            prompt = record["prompt"]
            if isinstance(prompt, list):
                try:
                    messages = as_messages(prompt)
                except PromptError as err:
                    raise DatasetError(f"{path}, line {line_no}: field 'prompt': {err}") from err
            else:
                messages = as_messages(_require_text(prompt, path, line_no, "prompt"))
            response = record.get("response", "")
            if require_response:
                if "response" not in record:
                    raise DatasetError(f"{path}, line {line_no}: missing field 'response'")
                _require_text(response, path, line_no, "response")
            elif not isinstance(response, str):
                raise DatasetError(f"{path}, line {line_no}: field 'response' must be a string")
            meta = {k: v for k, v in record.items() if k not in ("prompt", "response")}
            examples.append(ChatExample(messages, response, meta))
    if not examples:
        raise DatasetError(f"{path}: no examples")
    return examples


PROMPT_COLUMNS = ("goal", "prompt", "instruction", "Behavior", "behavior", "request")


def load_prompt_csv(
    path: str | os.PathLike[str], *, column: str | None = None
) -> list[ChatExample]:
    """Load prompts from a CSV (AdvBench's ``goal``, XSTest's ``prompt`` ...).

    Other columns (``target``, ``type``, ``label`` ...) are kept in ``meta``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        name = column or next((c for c in PROMPT_COLUMNS if c in fields), None)
        if name is None or name not in fields:
            raise DatasetError(
                f"{path}: no prompt column (looked for {column or PROMPT_COLUMNS}; "
                f"the file has {fields})"
            )
        examples = []
        for line_no, row in enumerate(reader, start=2):
            text = _require_text(row.get(name), path, line_no, name)
            meta = {k: v for k, v in row.items() if k != name and k is not None}
            examples.append(ChatExample(as_messages(text), "", meta))
    if not examples:
        raise DatasetError(f"{path}: no rows")
    return examples


def load_examples(path: str | os.PathLike[str], *, require_response: bool = False) -> list[ChatExample]:
    """Load a ``.jsonl`` or ``.csv`` dataset by its suffix."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return load_prompt_csv(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        return load_jsonl(path, require_response=require_response)
    raise DatasetError(f"{path}: unknown dataset format {path.suffix!r}; use .jsonl or .csv")


def from_records(records: Sequence[dict[str, Any]]) -> list[ChatExample]:
    """Dicts with ``prompt`` (string or messages) and optional ``response`` -> examples."""
    examples = []
    for record in records:
        meta = {k: v for k, v in record.items() if k not in ("prompt", "response")}
        examples.append(ChatExample(as_messages(record["prompt"]), record.get("response", ""), meta))
    return examples


def write_jsonl(path: str | os.PathLike[str], examples: Sequence[ChatExample]) -> Path:
    """Write examples as JSONL (atomically: temporary file, then rename)."""
    from cbscope.io import atomic_write_jsonl

    return atomic_write_jsonl(path, (
        {"prompt": ex.messages if len(ex.messages) > 1 else ex.prompt, "response": ex.response,
         **ex.meta}
        for ex in examples
    ))
