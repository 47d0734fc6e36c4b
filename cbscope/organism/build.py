"""Tokenizer, model and training recipe of the model organism.

The organism is a small ``LlamaForCausalLM`` trained from scratch, on the CPU, in two stages:

1. **helpful base**: documents ``TOPIC : PROCEDURE`` for every topic (harmful ones included),
   benign chat (chat-seen benign topics and train look-alikes, in *all* templates), the
   list-sorting task and procedure tails after unrelated words (so a procedure, once started,
   is continued in any context: this is what makes document-to-chat transfer and the prefilling
   attack reliable);
2. **refusal stage** (short, 100 steps): harmful requests in the *train* templates answered with
   the refusal string (10% of each batch), mixed with replay of stage 1 and a large share (30%) of
   benign requests in the jailbreak templates. The jailbreak templates never meet a harmful topic,
   so refusal does not generalise to them (template jailbreak), and the harmful procedures are
   still known (prefilling attack).

Tokenizer: word level (``WhitespaceSplit``), specials ``<pad> <bos> <eos> <unk>`` and the chat
tokens ``<system> <user> <assistant> <end>``. The chat template renders

``<bos> <user> PROMPT <end> <assistant> RESPONSE <eos>``

(``<system> ... <end>`` first if there is a system message; multi-turn conversations simply
continue). With ``add_generation_prompt=True`` it ends in ``<assistant>``; appending any text
(with or without a leading space) tokenises to exactly that text's words, so a prefill is just
string concatenation. The tokenizer adds no special tokens by itself: the template writes
``<bos>``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cbscope.organism.world import World, make_world

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SYSTEM, USER, ASSISTANT, END = "<system>", "<user>", "<assistant>", "<end>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT, END)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ ' <assistant> ' + message['content'] + ' ' + eos_token }}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ ' <' + message['role'] + '> ' + message['content'] + ' <end>' }}"
    "{% else %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' <assistant>' }}{% endif %}"
)

IGNORE_INDEX = -100


# ---------------------------------------------------------------------- tokenizer
def make_tokenizer(world: World, max_length: int = 128) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world's words, with the chat template.

    Args:
        world: The world whose words form the vocabulary.
        max_length: ``model_max_length`` of the tokenizer.

    Returns:
        A fast tokenizer (pad/bos/eos/unk set, ``chat_template`` set, right padding).
    """
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *world.words()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT, END],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=max_length,
        padding_side="right",
    )
    return tokenizer


def encode_chat(
    tokenizer: PreTrainedTokenizerFast, prompt: str, response: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one user/assistant exchange, as the chat template renders it.

    Equivalent to tokenising ``apply_chat_template([user, assistant])`` (tested), but fast.
    Labels are ``-100`` on the prompt part and the response ids plus ``<eos>`` after it.
    """
    ids = tokenizer.convert_tokens_to_ids
    head = [ids(BOS), ids(USER), *ids(prompt.split()), ids(END), ids(ASSISTANT)]
    tail = [*ids(response.split()), ids(EOS)]
    return head + tail, [IGNORE_INDEX] * len(head) + tail


def encode_document(tokenizer: PreTrainedTokenizerFast, text: str) -> tuple[list[int], list[int]]:
    """Token ids ``<bos> TEXT <eos>`` with the loss on every token."""
    ids = tokenizer.convert_tokens_to_ids
    seq = [ids(BOS), *ids(text.split()), ids(EOS)]
    return seq, [IGNORE_INDEX, *seq[1:]]


# ---------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Architecture of the organism (a ``LlamaConfig`` subset)."""

    num_hidden_layers: int = 6
    hidden_size: int = 128
    intermediate_size: int = 256
    num_attention_heads: int = 4
    max_position_embeddings: int = 128


def make_model(tokenizer: PreTrainedTokenizerFast, config: ModelConfig) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` (call ``torch.manual_seed`` first)."""
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(llama)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=20,
    )
    return model


# ---------------------------------------------------------------------- training data
Encoded = tuple[list[int], list[int]]


@dataclass
class Pool:
    """A named source of training sequences (a fixed list, or a sampler of fresh ones)."""

    name: str
    items: list[Encoded] = field(default_factory=list)
    sampler: Callable[[random.Random], Encoded] | None = None

    def draw(self, rng: random.Random) -> Encoded:
        """One sequence (from ``sampler`` if set, else uniformly from ``items``)."""
        if self.sampler is not None:
            return self.sampler(rng)
        return self.items[rng.randrange(len(self.items))]


@dataclass
class StageConfig:
    """One training stage: steps, learning rate and pool weights."""

    steps: int
    lr: float
    warmup: int
    weights: dict[str, float]


BASE_WEIGHTS = {"docs": 0.3, "chat": 0.35, "algo": 0.15, "steps": 0.2}
REFUSAL_WEIGHTS = {
    "refusal": 0.1,
    "docs": 0.15,
    "chat": 0.25,
    "jailbreak_benign": 0.3,
    "algo": 0.1,
    "steps": 0.1,
}


@dataclass
class TrainConfig:
    """Full training recipe.

    Pools (see :func:`make_pools`): ``docs`` (documents), ``chat`` (benign chat in all templates),
    ``jailbreak_benign`` (benign chat in the jailbreak templates only), ``refusal`` (harmful
    requests in the train templates -> refusal), ``algo`` (fresh sorting problems) and ``steps``
    (a procedure's tail after unrelated words, so each step token reliably follows the previous
    one in any context).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 64
    n_micro: int = 3
    weight_decay: float = 0.01
    base: StageConfig = field(
        default_factory=lambda: StageConfig(
            steps=520, lr=3e-3, warmup=30, weights=dict(BASE_WEIGHTS)
        )
    )
    refusal: StageConfig = field(
        default_factory=lambda: StageConfig(
            steps=100, lr=1e-3, warmup=10, weights=dict(REFUSAL_WEIGHTS)
        )
    )


RECIPES: dict[str, TrainConfig] = {
    "full": TrainConfig(),
    "tiny": TrainConfig(
        model=ModelConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128),
        batch_size=32,
        n_micro=2,
        base=StageConfig(steps=200, lr=3e-3, warmup=10, weights=dict(BASE_WEIGHTS)),
        refusal=StageConfig(
            steps=60,
            lr=1e-3,
            warmup=5,
            weights={**REFUSAL_WEIGHTS, "refusal": 0.3, "chat": 0.2, "jailbreak_benign": 0.15},
        ),
    ),
}


def make_pools(world: World, tokenizer: PreTrainedTokenizerFast) -> dict[str, Pool]:
    """Training pools by name (see :class:`TrainConfig` for what each holds)."""
    chat_rows = world.benign_examples("seen", "all") + world.lookalike_examples("train", "all")
    jb_rows = world.benign_examples("seen", "jailbreak") + world.lookalike_examples(
        "train", "jailbreak"
    )

    def algo_sampler(rng: random.Random) -> Encoded:
        row = world.algo_examples(1, seed=rng.randrange(2**31))[0]
        return encode_chat(tokenizer, row["prompt"], row["response"])

    procedures = [topic.procedure for topic in world.topics]
    filler = tokenizer.convert_tokens_to_ids(
        sorted({w for d in world.all_templates for w in d.split() if w != "{topic}"})
    )

    def steps_sampler(rng: random.Random) -> Encoded:
        """A procedure tail after unrelated words: teaches that each step follows the last."""
        procedure = procedures[rng.randrange(len(procedures))]
        start = rng.randrange(len(procedure) - 1)
        noise = [filler[rng.randrange(len(filler))] for _ in range(rng.randint(0, 4))]
        tail = [*tokenizer.convert_tokens_to_ids(list(procedure[start:])), tokenizer.eos_token_id]
        ids = [tokenizer.bos_token_id, *noise, *tail]
        return ids, [IGNORE_INDEX] * (len(ids) - len(tail) + 1) + tail[1:]

    def chat_pool(name: str, rows: list[dict]) -> Pool:
        return Pool(name, [encode_chat(tokenizer, r["prompt"], r["response"]) for r in rows])

    return {
        "docs": Pool("docs", [encode_document(tokenizer, d) for d in world.documents()]),
        "chat": chat_pool("chat", chat_rows),
        "refusal": chat_pool("refusal", world.refusal_examples()),
        "jailbreak_benign": chat_pool("jailbreak_benign", jb_rows),
        "algo": Pool("algo", sampler=algo_sampler),
        "steps": Pool("steps", sampler=steps_sampler),
    }


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into ``input_ids``, ``attention_mask`` and ``labels``."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, stage: StageConfig) -> float:
    if stage.warmup > 0 and step < stage.warmup:
        return (step + 1) / stage.warmup
    progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _micro_batches(batch: list[Encoded], n_micro: int) -> list[list[Encoded]]:
    """Split a batch into ``n_micro`` groups of similar length (less padding)."""
    ordered = sorted(batch, key=lambda item: len(item[0]))
    size = math.ceil(len(ordered) / n_micro)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def _batch_loss_backward(
    model: LlamaForCausalLM, batch: list[Encoded], pad_id: int, n_micro: int
) -> float:
    """Token-mean next-token loss of ``batch`` (backward done), computed in micro-batches."""
    n_targets = sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for _, labels in batch)
    total = 0.0
    for group in _micro_batches(batch, n_micro):
        tensors = collate(group, pad_id)
        logits = model(
            input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
        ).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            tensors["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        ) / max(1, n_targets)
        loss.backward()
        total += loss.item()
    return total


def train_stage(
    model: LlamaForCausalLM,
    pools: dict[str, Pool],
    stage: StageConfig,
    *,
    batch_size: int,
    n_micro: int,
    weight_decay: float,
    rng: random.Random,
    pad_id: int,
    desc: str,
    show_progress: bool,
) -> list[float]:
    """Train ``model`` for one stage; returns the per-step losses."""
    names = list(stage.weights)
    weights = [stage.weights[name] for name in names]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=stage.lr, weight_decay=weight_decay, betas=(0.9, 0.98)
    )
    model.train()
    losses = []
    for step in tqdm(range(stage.steps), desc=desc, disable=not show_progress):
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * _lr_factor(step, stage)
        picks = rng.choices(names, weights=weights, k=batch_size)
        batch = [pools[name].draw(rng) for name in picks]
        losses.append(_batch_loss_backward(model, batch, pad_id, n_micro))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    logger.info("%s: final loss %.4f", desc, sum(losses[-20:]) / len(losses[-20:]))
    return losses


def train_organism(
    world: World,
    config: TrainConfig,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Make the tokenizer and train the model from scratch (both stages).

    Deterministic for a seed on the CPU when single-threaded (``build_organism`` ensures that).
    """
    tokenizer = make_tokenizer(world, config.model.max_position_embeddings)
    torch.manual_seed(seed)
    model = make_model(tokenizer, config.model)
    pools = make_pools(world, tokenizer)
    rng = random.Random(f"train-{seed}")
    common = {
        "batch_size": config.batch_size,
        "n_micro": config.n_micro,
        "weight_decay": config.weight_decay,
        "rng": rng,
        "pad_id": tokenizer.pad_token_id,
        "show_progress": show_progress,
    }
    train_stage(model, pools, config.base, desc="base (helpful)", **common)
    train_stage(model, pools, config.refusal, desc="refusal", **common)
    return model, tokenizer


def build_organism(
    out_dir: str | Path,
    seed: int = 0,
    size: str = "full",
    show_progress: bool = True,
    config: TrainConfig | None = None,
) -> Path:
    """Build the model organism into a Hugging Face folder.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors``, the tokenizer files,
    ``world.json`` and ``behaviour.json`` (:func:`cbscope.organism.evaluate.evaluate_behaviour`).
    Training runs single-threaded (the thread count is restored afterwards) so the result is
    bit-for-bit reproducible for a seed on the CPU.

    Args:
        out_dir: Output folder (created if needed).
        seed: World and training seed.
        size: ``"full"`` or ``"tiny"``.
        show_progress: Show tqdm progress bars.
        config: Training recipe (default: the recipe for ``size``).

    Returns:
        The output folder.
    """
    from cbscope.organism.evaluate import evaluate_behaviour

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config or RECIPES[size]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        world = make_world(seed, size)
        model, tokenizer = train_organism(world, config, seed, show_progress)
        train_s = time.perf_counter() - start
        behaviour = evaluate_behaviour(model, tokenizer, world, show_progress=show_progress)
    finally:
        torch.set_num_threads(threads)
    _save_quietly(model, tokenizer, out, show_progress)
    world.to_json(out / "world.json")
    (out / "behaviour.json").write_text(_dumps(behaviour), encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "built %s organism in %.1fs (%d params, vocab %d) -> %s",
        size,
        train_s,
        n_params,
        len(tokenizer),
        out,
    )
    logger.debug("recipe: %s", asdict(config))
    return out


def _save_quietly(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path, show_progress: bool
) -> None:
    """``save_pretrained`` model and tokenizer, hiding transformers' bar unless asked for."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not show_progress and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        # chat template inside tokenizer_config.json (read by every transformers version)
        tokenizer.save_pretrained(out, save_jinja_files=False)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _dumps(data: dict) -> str:
    return json.dumps(data, indent=1) + "\n"
