"""Batched greedy generation from chat prompts (with optional prefills), for any chat model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from cbscope.data import Conversation, encode_chat, pad_id_of

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_text(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | Conversation],
    *,
    prefills: Sequence[str] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    max_length: int | None = None,
    show_progress: bool = False,
) -> list[str]:
    """Greedy-decode the assistant turn for each prompt.

    Prompts are chat-formatted, the prefill (if any) is appended to the assistant turn, and the
    batch is left-padded with an attention mask. Returns only the newly generated text (the
    prefill is not repeated).

    Args:
        model: A Hugging Face causal LM or a ``peft.PeftModel``.
        tokenizer: Its tokenizer (with a chat template).
        prompts: Prompt strings or role/content conversations.
        prefills: Assistant text to force before generating, one per prompt.
        max_new_tokens: Tokens generated after the prefill.
        batch_size: Prompts per generate call.
        max_length: Truncate prompt + prefill to this many tokens (left side first).
        show_progress: Show a tqdm bar.
    """
    if prefills is not None and len(prefills) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prefills)} prefills")
    pad_id = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    encoded = [
        encode_chat(tokenizer, prompt, prefills[i] if prefills else "", max_length=max_length).input_ids
        for i, prompt in enumerate(prompts)
    ]
    outputs: list[str] = []
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc="generate", disable=not show_progress):
        batch = encoded[start : start + batch_size]
        width = max(len(seq) for seq in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, width:]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [text.strip() for text in outputs]
