"""Batched generation from chat prompts (with optional prefills) or input embeddings.

* :func:`generate_text`: greedy answers through the model's own ``generate`` (KV cache);
* :func:`decode_embeds`: greedy or seeded sampled answers from input embeddings (optimised soft
  prompts, exact token sequences), ``n`` samples per prompt for best-of-n attacks.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
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


def _cache_kwarg(model: Any) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _next_tokens(
    logits: Tensor, temperature: float | None, generator: torch.Generator | None
) -> Tensor:
    """Greedy (``temperature`` None) or sampled next tokens from last-position logits."""
    if temperature is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def _decode_batch(
    model: Any,
    tokenizer: Any,
    sequences: Sequence[Float[Tensor, "pos d_model"]],
    max_new_tokens: int,
    temperature: float | None,
    generator: torch.Generator | None,
) -> list[str]:
    """One left-padded batch decoded from input embeddings with a KV cache."""
    table = model.get_input_embeddings()
    device = table.weight.device
    eos = tokenizer.eos_token_id
    width = max(seq.shape[0] for seq in sequences)
    d = sequences[0].shape[-1]
    embeds = torch.zeros((len(sequences), width, d), dtype=table.weight.dtype, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
    for i, seq in enumerate(sequences):
        embeds[i, width - seq.shape[0] :] = seq.to(device, table.weight.dtype)
        mask[i, width - seq.shape[0] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache_arg = _cache_kwarg(model)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    past = _returned_cache(out)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(len(sequences), dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    for step in range(max_new_tokens):
        token = _next_tokens(out.logits[:, -1], temperature, generator)
        if eos is not None:
            token = torch.where(done, torch.full_like(token, eos), token)
            done |= token == eos
        generated.append(token)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            inputs_embeds=table(token)[:, None],
            attention_mask=mask,
            position_ids=next_pos,
            use_cache=True,
            **{cache_arg: past},
        )
        past = _returned_cache(out)
        next_pos = next_pos + 1
    tokens = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in sequences]
    texts = []
    for row in tokens:
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def decode_embeds(
    model: Any,
    tokenizer: Any,
    sequences: Sequence[Float[Tensor, "pos d_model"]],
    *,
    max_new_tokens: int = 32,
    temperature: float | None = None,
    n: int = 1,
    seed: int = 0,
    batch_size: int | None = None,
) -> list[list[str]]:
    """Decode from input embeddings: greedy (``temperature=None``) or ``n`` seeded samples.

    Each sequence is one example's prompt as embeddings (``[pos, d_model]``, e.g. a chat prompt
    with an optimised soft prompt inside). Batches are left-padded and decoded with the model's
    KV cache. Sampling draws from ``softmax(logits / temperature)`` over the whole vocabulary (no
    top-k or top-p), with a ``torch.Generator`` seeded with ``seed``, so the same call gives the
    same samples. Greedy decoding returns one answer per sequence whatever ``n`` is.

    Args:
        model: A Hugging Face causal LM (peft-injected LoRA layers are fine) in the state to
            decode with.
        tokenizer: Its tokenizer (``eos_token_id`` and decoding).
        sequences: Prompt embeddings, one ``[pos, d_model]`` tensor per example.
        max_new_tokens: Generation budget.
        temperature: ``None``: greedy; else a sampling temperature ``> 0``.
        n: Samples per sequence (sampling only).
        seed: Seed of the sampling.
        batch_size: Rows per forward pass (``None``: all at once); a sequence's ``n`` samples
            are rows of the same batch.

    Returns:
        Per sequence, its answers (new text, special tokens skipped, stripped).

    Raises:
        ValueError: ``n < 1`` or a temperature that is not a finite positive number.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, not {temperature}")
    if not sequences:
        return []
    copies = 1 if temperature is None else n
    rows = [seq for seq in sequences for _ in range(copies)]
    generator = None
    if temperature is not None:
        device = model.get_input_embeddings().weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
    size = batch_size or len(rows)
    texts: list[str] = []
    for begin in range(0, len(rows), size):
        texts += _decode_batch(
            model, tokenizer, rows[begin : begin + size], max_new_tokens, temperature, generator
        )
    return [texts[i * copies : (i + 1) * copies] for i in range(len(sequences))]
