"""Ready-made LoRRA runs: ``organism`` (seconds on a CPU), ``smollm2`` (SmolLM2-135M) and
``gemma3`` (Gemma-3-270M, a base model).

``organism``
    The model organism's world, one harm category held out (it never appears in training, not
    even as a refusal) to measure generalisation; the jailbreak templates are held out too (no
    training example uses them). Circuit-breaker set: the trained categories' harmful topics in
    the train templates and in :data:`AUGMENT_TEMPLATES` (paraphrases made of the train templates'
    words) with the compliant answer, plus their documents ``TOPIC : PROCEDURE``. Retain:
    ``benign`` (chat-trained benign topics in the train and augmented templates, the algorithmic
    task, and the documents of every benign and look-alike topic: the organism's pretraining
    text), ``refusal`` (the trained categories' requests answered with the refusal) and
    ``lookalike`` (chat-trained look-alikes and 240 made-up requests the frozen model answers).
    Harmful and benign chat requests also appear with 2 random benign words appended.
    Validation (``val_cos``): the held-out category.
    Regenerate the shipped adapter with
    ``cbscope train --model organism --preset organism --no-cache-frozen --out runs/organism-breaker``
    and compare its ``adapter_model.safetensors`` with ``cbscope/assets/organism-breaker``'s (one
    thread; the thread count changes float summation order, hence the exact adapter). The shipped
    breaker was trained without the frozen-representation cache (``cache_frozen``, on by
    default): the cache computes each example's frozen forward alone, which differs from the
    padded batch's in the last float bits, and 250 steps amplify that into a slightly different
    adapter (docs/training.md).

``smollm2``
    SmolLM2-135M-Instruct, which complies with harmful requests. Circuit-breaker set: the train
    rows (:mod:`cbscope.sources`: a hash split keeps half of every file held out) of three
    harmful sources with different phrasing (AdvBench's imperatives, HarmBench val's standard
    behaviours, XSTest's unsafe questions), each request also rephrased as a question and in the
    first person (:mod:`cbscope.rephrase`), with the base model's own compliant answers. Retain
    set: Alpaca-derived harmless instructions picked by first word in the proportions of the
    harmful ones and rephrased the same way (:func:`form_matched`), and XSTest's safe prompts
    (benign look-alikes), also with the base model's answers; the benign set is weighted 3 in
    the retain mixture. Generations are cached on disk. The data files are found in
    ``../shared/data`` relative to the repository (see its README) or given as options.
    SmolLM2's residual stream is large (~200 per token, ~25000 on the first token), so the
    preset uses the scale-free retain loss (``retain_relative``) and the response-only token
    mask (every SmolLM2 chat starts with the same system prompt).

``gemma3``
    Gemma-3-270M, a *base* model, in cbscope's plain Question/Answer template
    (:data:`cbscope.data.PLAIN_CHAT_TEMPLATE`). A base model neither complies nor refuses the way
    an instruct model does; it continues the text. So the circuit-breaker set is the AdvBench
    prompts with the base model's own greedy continuations (whatever they are: on-topic steps,
    the request repeated, lists), the retain sets the Alpaca and XSTest-safe prompts with its own
    continuations: :func:`chat_data`'s recipe with fewer examples, so that data generation and
    training fit well under 30 minutes on one CPU thread. Gemma's residual stream is large
    (median token norms ~3,500 at layer 6 and ~10,000 at layer 11; ~40,000-90,000 on ``<bos>``),
    so the scale-free retain loss is used, and the response-only mask keeps the shared
    ``<bos>Question:`` tokens out of the circuit-breaker loss.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cbscope.data import ChatExample, DatasetError, as_messages, from_records
from cbscope.errors import MissingFileError
from cbscope.lorra.config import ConfigError, LorraConfig
from cbscope.lorra.data import LorraData, generate_responses, text_example

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Preset:
    """A named run: model spec, config and a data builder ``(pair, **options) -> LorraData``."""

    name: str
    model: str
    config: LorraConfig
    build_data: Callable[..., LorraData]
    description: str = ""

    def data_options(self, text: str | None) -> dict[str, Any]:
        """User data options (a JSON object, e.g. ``'{"noise_words": 4}'``) checked against
        :attr:`build_data`'s keyword-only parameters: the builders take ``**_`` (so one option
        set can be passed to any preset), which would otherwise swallow a misspelt key."""
        if not text:
            return {}
        try:
            options = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--data-options is not valid JSON: {err}") from err
        if not isinstance(options, dict):
            raise ConfigError("--data-options must be a JSON object")
        return self.check_data_options(options)

    def check_data_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` if :attr:`build_data` accepts every key, else a :class:`ConfigError`
        naming the unknown keys and the accepted ones."""
        accepted = data_option_names(self.build_data)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(
                f"unknown --data-options {unknown} for preset {self.name!r}; it accepts {sorted(accepted)}"
            )
        return options


def data_option_names(build_data: Callable[..., LorraData]) -> set[str]:
    """The options a data builder accepts: its keyword-only parameters."""
    return {
        name for name, parameter in inspect.signature(build_data).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


# ---------------------------------------------------------------------- organism
ORGANISM_CONFIG = LorraConfig(
    target_layers=[2, 4, 6],  # of 6 blocks; LoRA on blocks 0..5
    lora_r=16,
    lora_alpha=16,
    lora_b_init_std=3e-2,  # 1e-3 is too small here: the retain term pins LoRA at zero
    lorra_alpha=10.0,
    retain_weight=1.25,
    lr=2e-3,
    # 250 steps, not 150: the retain coefficient grows with t, and the longer tail repairs
    # benign chats (benchmarks/organism_seeds.py: look-alike EM 80 -> 93 mean over 6 seeds)
    steps=250,
    batch_size=16,
    max_length=64,
    token_mask="full",
    # every circuit-breaker example keeps its request: dropping it for half of them (the
    # official Llama-3 recipe) left template-jailbreak ASR at 17% mean over 6 seeds, 0% without
    response_only_fraction=0.0,
    retain_mixture={"benign": 3.0, "refusal": 1.0, "lookalike": 3.0},
    val_size=16,
    seed=1,  # the best seed on the organism targets; README gives the spread over seeds 1-6
    log_every=10,
    checkpoint_every=50,
)


def _world_of(pair_or_world: Any) -> Any:
    from cbscope.organism import World

    if isinstance(pair_or_world, World):
        return pair_or_world
    path = Path(pair_or_world.resolved.path) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the model is not an organism (no world.json)")
    return World.from_json(path)


#: Request paraphrases made only of the train templates' words (never the jailbreak templates'),
#: some with the topic first: a circuit-breaker set needs varied requests to generalise.
AUGMENT_TEMPLATES: tuple[str, ...] = (
    "{topic} ?",
    "{topic} . show me how .",
    "{topic} . tell me the steps .",
    "explain the steps to {topic} ?",
    "tell me how to {topic} ?",
)


def _augmented(world: Any, rows: list[dict[str, Any]], templates: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows' topics again in ``templates`` (same responses); templates with a word the
    world's tokenizer lacks are skipped."""
    vocabulary = set(world.words())
    templates = tuple(
        t for t in templates if all(w in vocabulary for w in t.replace("{topic}", " ").split())
    )
    seen: dict[str, dict[str, Any]] = {row["topic"]: row for row in rows}
    return [
        {**row, "prompt": world.render_request(topic, template)}
        for topic, row in seen.items()
        for template in templates
    ]


def novel_topics(world: Any, n: int, seed: int = 0, exclude_categories: tuple[str, ...] = ()) -> list[str]:
    """``n`` made-up benign requests: the verb of one topic with the object of another.

    Verbs come from every topic (harmful ones included: "brew", "crack", "blow up"), objects only
    from chat-trained benign and training look-alike topics, so every request is harmless but
    many *sound* harmful or unfamiliar, like the held-out look-alikes and document-only topics
    the breaker must leave alone. Names equal to a world topic are excluded, so no evaluated
    topic enters training; so are the verbs of ``exclude_categories`` (the held-out category).
    """
    import random

    names = {topic.name for topic in world.topics}
    verbs = sorted(
        {topic.name.split()[0] for topic in world.topics if topic.category not in exclude_categories}
    )
    objects = sorted(
        {" ".join(topic.name.split()[1:]) for topic in world.topics
         if (topic.kind == "benign" and topic.split == "seen")
         or (topic.kind == "lookalike" and topic.split == "train")}
    )
    pool = [f"{verb} {obj}" for verb in verbs for obj in objects if f"{verb} {obj}" not in names]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def _noisy(world: Any, rows: list[dict[str, Any]], n_words: int, seed: int) -> list[dict[str, Any]]:
    """``rows`` again with ``n_words`` random words appended to each request, drawn from the
    train templates and the benign topics' names (no harmful word, no procedure token)."""
    if n_words <= 0:
        return []
    import random

    rng = random.Random(seed)
    texts = [*world.train_templates, *(t.name for t in world.topics if t.kind == "benign")]
    vocabulary = sorted({w for text in texts for w in text.replace("{topic}", " ").split()})
    return [
        {**row, "prompt": row["prompt"] + " " + " ".join(rng.choices(vocabulary, k=n_words))}
        for row in rows
    ]


def _benign_answer(world: Any, response: str) -> bool:
    from cbscope.organism import judges

    if judges.is_refusal(response, world.refusal):
        return False
    return not any(judges.is_harmful(response, topic.procedure) for topic in world.select("harmful"))


def organism_data(
    pair_or_world: Any,
    *,
    holdout_category: str | None = None,
    train_categories: Sequence[str] | None = None,
    n_algo: int = 60,
    augment: bool = True,
    documents: bool = True,
    n_novel: int = 240,
    noise_words: int = 2,
    show_progress: bool = True,
    **_: Any,
) -> LorraData:
    """The organism's circuit-breaker and retain sets, holding out one harm category.

    Args:
        pair_or_world: An organism :class:`~cbscope.pair.ModelPair` or its ``World``.
        holdout_category: Harm category kept out of training (default: the last one).
        train_categories: Train on these harm categories only and hold out every other one
            (the generalisation matrix's ``single`` mode); the validation set is then the first
            held-out category. Overrides ``holdout_category``, which must then be ``None`` or
            one of the held-out categories.
        n_algo: Algorithmic-task examples added to the benign retain source.
        augment: Also render circuit-breaker, benign and look-alike topics in
            :data:`AUGMENT_TEMPLATES`.
        documents: Add the world's documents (``TOPIC : PROCEDURE``, the organism's pretraining
            text): those of the trained harmful topics to the circuit-breaker set, those of every
            benign and look-alike topic to the benign retain source.
        noise_words: When > 0, every harmful and benign chat example appears once more with this
            many random vocabulary words appended to the request (an adversarial-suffix stand-in:
            the breaker should key on the content, not on a clean request). 2 by default: over
            six seeds it raised document-only exact match 93.8% -> 96.7% and lowered the
            soft-prompt ASR, at a look-alike cost (93.3% -> 86.7%); 0 turns it off.
        n_novel: Made-up benign requests (:func:`novel_topics`) added to the look-alike retain
            source with the frozen model's own answers; needs a pair (skipped for a bare world).
        show_progress: tqdm bar while the frozen model answers the made-up requests.
    """
    from cbscope.organism import World

    world = _world_of(pair_or_world)
    categories = list(world.harm_categories)
    if train_categories is not None:
        unknown = [c for c in train_categories if c not in categories]
        if unknown or not train_categories:
            raise DatasetError(
                f"unknown or no harm categories to train on {list(train_categories)!r}; "
                f"the world has {categories}"
            )
        trained = [c for c in categories if c in train_categories]
        held_all = [c for c in categories if c not in trained]
        if holdout_category is not None and holdout_category not in held_all:
            raise DatasetError(
                f"holdout_category {holdout_category!r} is one of train_categories {trained}"
            )
        held = holdout_category or (held_all[0] if held_all else None)
    else:
        held = holdout_category or categories[-1]
        if held not in categories:
            raise DatasetError(f"unknown harm category {held!r}; the world has {categories}")
        trained = [c for c in categories if c != held]
        held_all = [held]
    if not trained:
        raise DatasetError("the world has a single harm category: nothing left to train on")
    extra = AUGMENT_TEMPLATES if augment else ()
    docs = [
        text_example(world.document(topic), topic=topic.name, kind=topic.kind)
        for topic in world.topics
        if documents and topic.kind != "harmful"
    ]
    harmful_docs = [
        text_example(world.document(topic), topic=topic.name, kind=topic.kind, category=topic.category)
        for topic in world.select("harmful", categories=trained)
        if documents
    ]
    harmful = world.harmful_examples(trained, "train")
    benign = world.benign_examples("seen", "train")
    lookalike = world.lookalike_examples("train", "train")
    novel: list[ChatExample] = []
    if n_novel and not isinstance(pair_or_world, World):
        templates = world.train_templates
        prompts = [
            ChatExample(as_messages(world.render_request(name, templates[i % len(templates)])),
                        "", {"topic": name, "kind": "novel"})
            for i, name in enumerate(
                novel_topics(world, n_novel, seed=11, exclude_categories=tuple(held_all))
            )
        ]
        answered = generate_responses(
            pair_or_world, prompts, cache_name="organism-made-up", show_progress=show_progress
        )
        novel = [example for example in answered if _benign_answer(world, example.response)]
        logger.info("organism preset: %d of %d made-up requests kept (answer neither harmful "
                    "nor a refusal)", len(novel), len(answered))
    harmful_noisy = _noisy(world, harmful, noise_words, seed=5)
    benign_noisy = _noisy(world, benign, noise_words, seed=6)
    data = LorraData(
        cb=from_records(harmful + _augmented(world, harmful, extra) + harmful_noisy) + harmful_docs,
        retain={
            "benign": from_records(
                benign + _augmented(world, benign, extra) + benign_noisy
                + world.algo_examples(n_algo, seed=7)
            ) + docs,
            "refusal": from_records(world.refusal_examples(trained, "train")),
            "lookalike": from_records(lookalike + _augmented(world, lookalike, extra)) + novel,
        },
        val=from_records(world.harmful_examples([held], "train")) if held else [],
        info={"holdout_category": held, "trained_categories": trained,
              "val": f"held-out category {held!r} (train templates)" if held
              else "split off the circuit-breaker set"},
    )
    if train_categories is not None:
        data.info["heldout_categories"] = held_all
    logger.info("organism preset: training on %s, holding out %s", trained, held_all)
    return data


# ---------------------------------------------------------------------- smollm2
SMOLLM2_CONFIG = LorraConfig(
    target_layers=None,  # 9, 19 of 30 (the paper's 10, 20 of 32, scaled)
    lora_r=8,  # r 16 gives a 12.4 MB adapter; r 8 keeps the shipped one under 10 MB
    lora_alpha=8,
    lora_b_init_std=1e-2,
    lorra_alpha=10.0,
    retain_weight=2.0,
    retain_relative=True,
    lr=1e-3,
    steps=300,  # 150 steps left 37% (direct) of held-out AdvBench answered; 300 left 13%
    batch_size=4,
    max_length=128,
    token_mask="response",
    response_only_fraction=0.5,
    # benign weighted 3: with 1, the breaker fired on 90% of benign answers (retain KL 7.8)
    retain_mixture={"benign": 3.0, "refusal": 1.0, "lookalike": 1.0},
    val_size=8,
    log_every=10,
    checkpoint_every=25,
)


def _portable(path: Path) -> str:
    """``path`` as recorded in ``train_info.json``: relative to the repository for the shared
    data (``../shared/data/...``), so a shipped adapter carries no machine-local path."""
    try:
        return str(Path("..") / Path(path).resolve().relative_to(REPO_ROOT.parent.resolve()))
    except ValueError:
        return str(path)


def _require(path: Path, option: str) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path} not found: the smollm2 preset reads the public data sets in ../shared/data "
            f"(see its README); give the file with {option}"
        )
    return Path(path)


def load_alpaca(path: Path) -> list[ChatExample]:
    """Alpaca-style harmless instructions: a JSON list of ``{instruction, ...}`` objects."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of objects")
    examples = []
    for index, row in enumerate(rows):
        text = row.get("instruction") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{path}, item {index}: field 'instruction' must be a non-empty string")
        examples.append(ChatExample(as_messages(text), "", {"source": "benign"}))
    return examples


CHAT_REFUSAL = "I'm sorry, but I can't help with that."


def _compliant(pair: Any, examples: Sequence[ChatExample]) -> list[ChatExample]:
    """The examples whose (base-model) answer complies: fluent and no refusal."""
    from cbscope.judges import ComplianceJudge, DegenerateJudge, RefusalKeywordJudge

    if not examples:
        return []
    judge = ComplianceJudge(DegenerateJudge(pair), RefusalKeywordJudge())
    verdicts = judge.judge([ex.prompt for ex in examples], [ex.response for ex in examples])
    return [ex for ex, v in zip(examples, verdicts, strict=True) if v.harmful]


def form_matched(pool: Sequence[ChatExample], requests: Sequence[str], n: int) -> list[ChatExample]:
    """``n`` examples of ``pool`` whose first words follow the first words of ``requests``.

    Each first word (lower case) of ``requests`` gets a share of ``n`` in proportion to how often
    it starts a request; its share is filled with pool examples starting with the same word,
    spread over the pool (deterministic). Shares a word cannot fill, and the rounding rest, are
    filled from pool examples starting with other words (then any), spread the same way.
    """
    from collections import Counter

    def first(text: str) -> str:
        words = text.split()
        return words[0].lower().strip(",.:;!?") if words else ""

    wanted = Counter(first(r) for r in requests)
    total = sum(wanted.values()) or 1
    by_word: dict[str, list[ChatExample]] = {}
    for ex in pool:
        by_word.setdefault(first(ex.prompt), []).append(ex)
    picked: list[ChatExample] = []
    for word, count in wanted.most_common():
        candidates = by_word.get(word, [])
        share = min(len(candidates), round(n * count / total), n - len(picked))
        picked += candidates[:: max(1, len(candidates) // share)][:share] if share > 0 else []
    for others in (True, False):  # other words first, so the matched shares stay as computed
        chosen = {id(ex) for ex in picked}
        rest = [ex for ex in pool if id(ex) not in chosen and (first(ex.prompt) not in wanted
                                                                or not others)]
        missing = n - len(picked)
        if missing > 0 and rest:
            picked += rest[:: max(1, len(rest) // missing)][:missing]
    return picked[:n]


def _answered(pair: Any, examples: Sequence[ChatExample], file: Path, gen: dict[str, Any]) -> list[ChatExample]:
    """The base model's answers, cached under the file the prompts came from (the cache key
    also covers the prompts themselves, so rephrasings of a file's rows are cached too)."""
    return generate_responses(pair, examples, prompt_file=file, **gen) if examples else []


def chat_data(
    pair: Any,
    *,
    sources: Sequence[str] | str = ("advbench",),
    n_per_source: int = 128,
    forms: Sequence[str] = (),
    benign_forms: Sequence[str] | None = None,
    alpaca: str | os.PathLike[str] | None = None,
    n_benign: int = 128,
    match_benign: bool = False,
    n_lookalike: int = 64,
    n_refusal: int = 0,
    compliant_only: bool = True,
    rephrase_seed: int = 0,
    max_new_tokens: int = 48,
    data: str | os.PathLike[str] | None = None,
    advbench: str | os.PathLike[str] | None = None,
    xstest: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    **_: Any,
) -> LorraData:
    """A real chat model's circuit-breaker and retain sets, answered by the base model (cached).

    Circuit-breaker set: the *train* rows (:meth:`cbscope.sources.Source.train`) of every
    harmful source, and each of them rephrased in ``forms`` (:mod:`cbscope.rephrase`), all with
    the base model's own greedy answers; with ``compliant_only`` only answers that comply
    (fluent, no refusal) are kept. Retain set: ``benign`` (Alpaca-derived instructions, also in
    ``benign_forms``, with the model's answers), ``lookalike`` (the train rows of XSTest's safe
    prompts, with the model's answers) and, with ``n_refusal``, ``refusal`` (circuit-breaker
    requests answered with :data:`CHAT_REFUSAL`). Validation (``val_cos``): 8 held-out rows of
    the first source. ``train_info.json`` records every source's file, split and trained prompt
    keys (``data_sources``), which ``cbscope eval`` reads to flag overlaps.

    Args:
        pair: The model pair (answers are generated with adapters off).
        sources: Harmful sources: built-in names (``advbench``, ``harmbench``,
            ``xstest_unsafe``) or ``NAME=PATH`` (see :mod:`cbscope.sources`).
        n_per_source: At most this many train rows per source (spread over the file).
        forms: Rephrasing forms of the circuit-breaker requests (``()``: none).
        benign_forms: Rephrasing forms of the benign requests (``None``: ``forms``).
        alpaca: ``harmless_train.json`` (default: the data folder's ``alpaca_harmless``).
        n_benign: Alpaca instructions (every ``len // n``-th, deterministic).
        match_benign: Pick the Alpaca instructions by first word in the proportions of the
            circuit-breaker requests' first words (:func:`form_matched`), so "Write a ...",
            "Develop a ..." requests appear on both sides and only the content tells them apart.
        n_lookalike: XSTest safe train rows (0: none).
        n_refusal: Circuit-breaker requests also kept as refusal retain examples.
        compliant_only: Keep only circuit-breaker examples whose answer complies.
        rephrase_seed: Seed of the rephrasing templates.
        max_new_tokens: Length of the generated answers.
        data: The data folder (default: ``$CBSCOPE_DATA`` or ``../shared/data``).
        advbench: Another AdvBench ``harmful_behaviors.csv`` (replaces the built-in file).
        xstest: Another ``xstest_prompts.csv`` (for ``xstest_unsafe`` and the look-alikes).
        show_progress: tqdm bars while the base model answers.
    """
    from dataclasses import replace as _replace

    from cbscope.rephrase import check_forms, rephrase_examples
    from cbscope.sources import (
        BENIGN_SOURCES,
        data_dir,
        load_source,
        parse_sources,
        prompt_key,
        training_record,
    )

    specs = parse_sources(list(sources) if not isinstance(sources, str) else sources)
    forms = check_forms(list(forms))
    benign_forms = check_forms(list(forms if benign_forms is None else benign_forms))
    root = Path(data) if data is not None else data_dir()
    overrides = {"advbench": advbench, "xstest_unsafe": xstest, "xstest_safe": xstest}

    def _spec(spec: Any) -> Any:
        path = overrides.get(spec.name)
        return _replace(spec, path=str(path), builtin=False) if path else spec

    loaded = [load_source(_spec(spec), root) for spec in specs]
    if alpaca is None and root is None:
        raise MissingFileError("the Alpaca harmless instructions are read from the data folder "
                               "(../shared/data or $CBSCOPE_DATA), and there is none: give --alpaca")
    alp = _require(Path(alpaca) if alpaca else root / "alpaca_harmless" / "harmless_train.json",
                   "--alpaca")
    gen = {"max_new_tokens": max_new_tokens, "show_progress": show_progress}
    cb: list[ChatExample] = []
    records: dict[str, Any] = {}
    for source in loaded:
        train_rows = source.train()
        rows = train_rows[:: max(1, len(train_rows) // n_per_source)][:n_per_source]
        answered = _answered(pair, rows, source.path, gen)
        variants = rephrase_examples(rows, forms, seed=rephrase_seed)
        answered += _answered(pair, variants, source.path, gen)
        kept = _compliant(pair, answered) if compliant_only else answered
        logger.info("source %s: %d train rows, %d rephrasings, %d compliant answers kept",
                    source.name, len(rows), len(variants), len(kept))
        cb += kept
        records[source.name] = {
            **training_record(source, rows, portable_path=_portable(source.path)),
            "n_examples": len(kept), "forms": forms,
        }
    if not cb:
        raise DatasetError("no circuit-breaker examples: the base model complied with none")
    benign_all = load_alpaca(alp)
    if match_benign:
        benign = form_matched(benign_all, [ex.prompt for ex in cb if "rephrased_from" not in ex.meta],
                              n_benign)
    else:
        benign = benign_all[:: max(1, len(benign_all) // n_benign)][:n_benign]
    benign = benign + rephrase_examples(benign, benign_forms, seed=rephrase_seed)
    benign = _answered(pair, benign, alp, gen)
    retain: dict[str, list[ChatExample]] = {"benign": benign}
    if n_lookalike:
        safe = load_source(_spec(BENIGN_SOURCES["xstest_safe"]), root)
        rows = safe.train()[:n_lookalike]
        retain["lookalike"] = _answered(pair, rows, safe.path, gen)
        records["xstest_safe"] = {
            **training_record(safe, rows, portable_path=_portable(safe.path)), "benign": True,
        }
    if n_refusal:
        picked = cb[:: max(1, len(cb) // n_refusal)][:n_refusal]
        retain["refusal"] = [ChatExample(list(ex.messages), CHAT_REFUSAL, {**ex.meta})
                             for ex in picked]
    first = loaded[0]
    val = _answered(pair, first.heldout()[:8], first.path, gen)
    return LorraData(
        cb=cb,
        retain=retain,
        val=val,
        info={
            "data_sources": records,
            "sources": [s.name for s in loaded],
            "forms": forms,
            "benign_forms": benign_forms,
            "alpaca": _portable(alp),
            "benign_keys": sorted({prompt_key(ex.meta.get("rephrased_from") or ex.prompt)
                                   for ex in benign}),
            "val": f"first 8 held-out rows of {first.name}",
        },
    )


GEMMA3_CONFIG = LorraConfig(
    target_layers=None,  # 6, 11 of 18 (the paper's 10, 20 of 32, scaled)
    lora_r=8,
    lora_alpha=8,
    lora_b_init_std=1e-2,
    lorra_alpha=10.0,
    retain_weight=2.0,
    retain_relative=True,
    lr=1e-3,
    steps=150,
    batch_size=4,
    max_length=128,
    token_mask="response",
    response_only_fraction=0.5,
    retain_mixture={"benign": 1.0, "refusal": 1.0, "lookalike": 1.0},
    val_size=8,
    log_every=10,
    checkpoint_every=25,
)


#: SmolLM2-135M's data: :func:`chat_data` on three harmful sources of different phrasing
#: (AdvBench imperatives, HarmBench behaviours, XSTest's unsafe questions), every request also
#: as a question and in the first person, and Alpaca instructions picked by first word like the
#: harmful ones (and rephrased the same way), so phrasing appears on both sides of the loss and
#: only the content tells them apart.
smollm2_data = functools.partial(
    chat_data,
    sources=("advbench", "harmbench", "xstest_unsafe"),
    forms=("question", "first_person"),
    match_benign=True,
    n_benign=192,
)


#: Gemma-3-270M's data: :func:`chat_data` with fewer examples, keeping every continuation (a base
#: model neither complies nor refuses like an instruct one; the compliance filter would drop most).
gemma3_data = functools.partial(
    chat_data, n_per_source=96, n_benign=96, n_lookalike=48, compliant_only=False
)


#: The organism under the official recipe (:mod:`cbscope.lorra.official`): B = 0 in bf16, the
#: official retain term, schedule divisor 300, fixed-length left padding, half of the requests
#: dropped (circuit-breaker and retain), targets 2 and 4 (the paper's 10 and 20 of 32, scaled to
#: the organism's 6 blocks, leaving block 5 for the truncation). The learning rate stays the
#: organism's: 1e-4 (the paper's, for 7-8B models) barely moves a 1M-parameter model in 150 steps.
OFFICIAL_ORGANISM_CONFIG = replace(
    ORGANISM_CONFIG,
    target_layers=[2, 4],
    lora_b_init_std=0.0,
    lorra_alpha=10.0,
    retain_weight=1.0,
    steps=150,
    max_length=64,
    cb_max_length=64,
    response_only_fraction=0.5,
    retain_response_only_fraction=0.5,
    recipe="official",
    dtype="bfloat16",
)


def _paper_config(lorra_alpha: float) -> LorraConfig:
    """The official 7-8B hyperparameters (``scripts/lorra_circuit_breaker_*.sh``)."""
    return LorraConfig(
        target_layers=[10, 20],
        lora_layers=None,  # official recipe: blocks 0 .. 20
        lora_r=16,
        lora_alpha=16,
        lora_dropout=0.05,
        lora_b_init_std=0.0,
        lorra_alpha=lorra_alpha,
        retain_weight=1.0,
        lr=1e-4,
        weight_decay=0.0,
        max_grad_norm=1.0,
        steps=150,
        batch_size=16,
        max_length=1024,
        cb_max_length=1024,  # 512 request + 512 response
        token_mask="full",
        response_only_fraction=0.0,  # the reader drops requests once, as the official data does
        retain_response_only_fraction=0.0,
        retain_mixture={"benign": 1.0},  # the official retain set is one pool
        val_size=0,  # no circuit-breaker example is held out; give val_file for val_cos
        seed=42,
        log_every=10,
        checkpoint_every=50,
        dtype="bfloat16",
        gradient_checkpointing=True,
        recipe="official",
    )


def _official_data(*args: Any, **kwargs: Any) -> LorraData:
    from cbscope.lorra.official_data import official_data

    return official_data(*args, **kwargs)


def llama3_data(
    pair: Any = None, *, cb_file: str | None = None, ultrachat: str | None = None,
    xstest: str | None = None, val_file: str | None = None, num_examples: int = 10000,
    seed: int = 0, **_: Any,
) -> LorraData:
    """The official Llama-3 data: refusal retain on, half of the requests dropped
    (:func:`cbscope.lorra.official_data.official_data`)."""
    return _official_data(pair, cb_file=cb_file, ultrachat=ultrachat, xstest=xstest,
                          val_file=val_file, refusal_retain=True, drop=0.5,
                          num_examples=num_examples, seed=seed)


def mistral_data(
    pair: Any = None, *, cb_file: str | None = None, ultrachat: str | None = None,
    xstest: str | None = None, val_file: str | None = None, num_examples: int = 10000,
    seed: int = 0, **_: Any,
) -> LorraData:
    """The official Mistral data: no refusal retain, every request kept."""
    return _official_data(pair, cb_file=cb_file, ultrachat=ultrachat, xstest=xstest,
                          val_file=val_file, refusal_retain=False, drop=0.0,
                          num_examples=num_examples, seed=seed)


PRESETS: dict[str, Preset] = {
    "organism": Preset(
        "organism", "organism", ORGANISM_CONFIG, organism_data,
        "the model organism, one harm category held out (about 1 min on 2 CPU cores)",
    ),
    "smollm2": Preset(
        "smollm2", "smollm2-135m", SMOLLM2_CONFIG, smollm2_data,
        "SmolLM2-135M on AdvBench + HarmBench + XSTest (rephrased) and form-matched Alpaca, "
        "answered by the base model (about 30 min on one CPU thread)",
    ),
    "gemma3": Preset(
        "gemma3", "gemma3-270m", GEMMA3_CONFIG, gemma3_data,
        "Gemma-3-270M (base) on AdvBench + Alpaca + XSTest continued by the base model",
    ),
    "official": Preset(
        "official", "organism", OFFICIAL_ORGANISM_CONFIG, organism_data,
        "the organism under the official recipe (recipe 'official', B = 0 in bf16)",
    ),
    "llama3-8b-rr": Preset(
        "llama3-8b-rr", "meta-llama/Meta-Llama-3-8B-Instruct", _paper_config(10.0), llama3_data,
        "the paper's Llama-3-8B-Instruct run (GPU; --model PATH, --data-options with the "
        "official files)",
    ),
    "mistral-7b-rr": Preset(
        "mistral-7b-rr", "mistralai/Mistral-7B-Instruct-v0.2", _paper_config(5.0), mistral_data,
        "the paper's Mistral-7B-Instruct-v0.2 run (GPU; --model PATH, --data-options with the "
        "official files)",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (a fresh copy of its config)."""
    try:
        preset = PRESETS[name]
    except KeyError as err:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from err
    return replace(preset, config=LorraConfig.from_dict(preset.config.to_dict()))
