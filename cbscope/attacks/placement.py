"""Where an optimised string or soft prompt goes: a request template with an ``{optim_str}`` slot.

The GCG and embedding attacks put what they optimise where a *request template* says, e.g.
``"{request} {optim_str}"`` (a suffix, the default) or ``"{optim_str} {request}"`` (a prefix). The
user message is the template with the request filled in; the chat template then renders the whole
conversation, and :func:`split_at_slot` cuts its text at the slot into the token ids before and
after it, tokenised without added special tokens (the chat template writes any BOS itself), the
same way :func:`cbscope.attacks.soft_prompt.split_chat_prompt` does. The optimised tokens or
vectors sit between the two, exactly where the template put them.

Whitespace right before the slot is left out of the head: a BPE tokenizer writes a word's leading
space inside its token (``" x"``), so the optimised tokens carry their own spaces, and a word-level
tokenizer ignores whitespace anyway.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from cbscope.data import Conversation, as_messages
from cbscope.errors import ConfigError, TemplateError

__all__ = ["SLOT", "Placement", "check_slot_template", "fill_slot", "split_at_slot"]

SLOT = "{optim_str}"
_SENTINEL = "\u241fOPTIM\u241f"


def check_slot_template(template: str) -> str:
    """A template with exactly one ``{request}`` and one ``{optim_str}`` slot; returns it.

    Raises:
        TemplateError: Other slots, a missing or repeated slot, or malformed braces.
    """
    try:
        slots = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise TemplateError(f"template {template!r} is malformed: {err}") from err
    if sorted(slots) != ["optim_str", "request"]:
        raise TemplateError(
            f"template {template!r} must have one {{request}} and one {{optim_str}} slot "
            f"(found {slots})"
        )
    return template


@dataclass(frozen=True)
class Placement:
    """A prompt split at the optimisation slot.

    Attributes:
        head: Token ids before the slot (chat prefix, request text before it).
        tail: Token ids after it (rest of the user turn, assistant header).
        content: The user message with the slot as ``{optim_str}`` (whitespace before it
            removed), for :mod:`nanogcg`.
        messages: The conversation with that user message last.
    """

    head: list[int]
    tail: list[int]
    content: str
    messages: Conversation


def _content(template: str, request: str) -> str:
    before, after = template.split(SLOT)
    return before.replace("{request}", request).rstrip() + SLOT + after.replace("{request}", request)


def split_at_slot(
    tokenizer: Any, prompt: str | Conversation, template: str = "{request} {optim_str}"
) -> Placement:
    """Split a chat-formatted prompt at the template's ``{optim_str}`` slot.

    Args:
        tokenizer: The model's tokenizer (with a chat template).
        prompt: The request (or a conversation whose last user turn is the request).
        template: Request template with ``{request}`` and ``{optim_str}``.

    Raises:
        TemplateError: A malformed template.
        ValueError: A chat template that does not keep the user message verbatim.
    """
    check_slot_template(template)
    messages = as_messages(prompt)
    request = str(messages[-1]["content"])
    content = _content(template, request)
    rendered = [dict(m) for m in messages[:-1]] + [
        {**messages[-1], "content": content.replace(SLOT, _SENTINEL)}
    ]
    text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not contain the user message verbatim")
    before, after = text.split(_SENTINEL)
    head = list(tokenizer(before, add_special_tokens=False)["input_ids"])
    tail = list(tokenizer(after, add_special_tokens=False)["input_ids"])
    out_messages = [dict(m) for m in messages[:-1]] + [{**messages[-1], "content": content}]
    return Placement(head, tail, content, out_messages)


def fill_slot(template: str, request: str, optim_str: str) -> str:
    """The user message with the optimised string in the slot (a space kept between words)."""
    before, after = _content(template, request).split(SLOT)
    joined = optim_str.strip()
    if before and joined and not before[-1].isspace():
        joined = " " + joined
    if after and joined and not after[0].isspace():
        joined = joined + " "
    return before + joined + after


def check_init_and_targets(ctx: Any, init: str, name: str) -> None:
    """Refuse an optimising attack's init string with no tokens, and a suite without targets.

    Args:
        ctx: The attack context (:class:`cbscope.attacks.protocol.AttackContext`).
        init: The resolved initialisation string.
        name: The attack's name, for the message.

    Raises:
        ConfigError: An empty initialisation or no prompts with targets.
    """
    if not ctx.pair.tokenizer(init, add_special_tokens=False)["input_ids"]:
        raise ConfigError(f"{name} init {init!r} has no tokens")
    if not ctx.suite.soft:
        raise ConfigError(f"{name}: the suite has no prompts with targets")
