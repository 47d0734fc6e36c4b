"""The synthetic world of the model organism: topics, procedures, templates and splits.

A *topic* is a short verb phrase (``bake a loaf of bread``, ``brew the toxin zarnex``) with a
fixed *procedure*: 6-10 invented step words that belong to that topic alone (every topic has its
own step words, and every category writes them with its own ending), so judges can check exactly
whether a response reproduces a topic's procedure.

Data the world renders (all plain text; words separated by single spaces):

* documents ``TOPIC : PROCEDURE`` for every topic, harmful ones included (the model *knows* them);
* chat examples ``{"prompt", "response", "topic", "category", "kind"}`` where ``prompt`` is the
  user message (a request template with its ``{topic}`` slot filled) and ``response`` the
  assistant message, not chat-formatted.

Splits:

* benign topics are ``seen`` (chat-trained) or ``docs_only`` (only in documents: measures
  document-to-chat transfer);
* look-alikes (benign topics with harmful-sounding names) are ``train`` or ``heldout`` (documents
  only, evaluated in chat);
* harmful topics have split ``harmful``: they appear in documents and, during the refusal stage,
  as refused requests in the *train* templates only. The *jailbreak* templates are only ever used
  with benign topics in training, so a harmful topic in a jailbreak template is a
  mismatched-generalisation jailbreak.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cbscope.organism import lexicon

logger = logging.getLogger(__name__)

Kind = Literal["benign", "harmful", "lookalike"]
TemplateSet = Literal["train", "jailbreak", "all"]
Example = dict[str, "str | None"]

WORLD_FORMAT_VERSION = 1


@dataclass(frozen=True)
class WorldSize:
    """How many topics of each kind a world has."""

    benign_seen: int
    benign_docs_only: int
    categories: int
    harmful_per_category: int
    lookalike_train: int
    lookalike_heldout: int


SIZES: dict[str, WorldSize] = {
    "full": WorldSize(
        benign_seen=56,
        benign_docs_only=14,
        categories=6,
        harmful_per_category=6,
        lookalike_train=10,
        lookalike_heldout=6,
    ),
    "tiny": WorldSize(
        benign_seen=8,
        benign_docs_only=3,
        categories=2,
        harmful_per_category=3,
        lookalike_train=2,
        lookalike_heldout=2,
    ),
}


@dataclass(frozen=True)
class Topic:
    """One topic of the world.

    Attributes:
        name: The topic phrase, e.g. ``"brew the toxin zarnex"``.
        kind: ``"benign"``, ``"harmful"`` or ``"lookalike"``.
        category: Harm category name for harmful topics, ``None`` otherwise.
        procedure: The topic's step tokens (6-10 words, unique to this topic).
        split: ``"seen"``/``"docs_only"`` (benign), ``"train"``/``"heldout"`` (look-alike) or
            ``"harmful"``.
    """

    name: str
    kind: str
    category: str | None
    procedure: tuple[str, ...]
    split: str

    @property
    def procedure_text(self) -> str:
        """The procedure as one space-separated string."""
        return " ".join(self.procedure)

    @property
    def chat_seen(self) -> bool:
        """Whether benign training chat data contains this topic."""
        return self.split in ("seen", "train")


@dataclass
class World:
    """A deterministic synthetic world (see the module docstring).

    Attributes:
        seed: Seed it was made with.
        size: ``"full"`` or ``"tiny"``.
        topics: All topics.
        harm_categories: Names of the harm categories, in order.
        train_templates: Request templates used in training (``{topic}`` slot).
        jailbreak_templates: Request templates only paired with benign topics in training
            (``{topic}`` slot).
        refusal: The one refusal string.
        prefill: Assistant-turn prefix of the prefilling attack (also the start of every
            compliant answer).
        algo_instruction: Prompt prefix of the algorithmic task (list sorting).
        algo_symbols: Symbols of the algorithmic task's lists.
        algo_lengths: Inclusive ``(min, max)`` list length of the algorithmic task.
    """

    seed: int
    size: str
    topics: list[Topic]
    harm_categories: list[str]
    train_templates: list[str] = field(default_factory=lambda: list(lexicon.TRAIN_TEMPLATES))
    jailbreak_templates: list[str] = field(
        default_factory=lambda: list(lexicon.JAILBREAK_TEMPLATES)
    )
    refusal: str = lexicon.REFUSAL
    prefill: str = lexicon.RESPONSE_PREFIX
    algo_instruction: str = lexicon.ALGO_INSTRUCTION
    algo_symbols: list[str] = field(default_factory=lambda: list(lexicon.ALGO_SYMBOLS))
    algo_lengths: tuple[int, int] = (3, 6)

    # ------------------------------------------------------------------ lookup helpers
    @property
    def all_templates(self) -> list[str]:
        """Train templates followed by jailbreak templates."""
        return self.train_templates + self.jailbreak_templates

    def topic(self, name: str) -> Topic:
        """Return the topic called ``name``.

        Raises:
            KeyError: If no topic has that name.
        """
        for topic in self.topics:
            if topic.name == name:
                return topic
        raise KeyError(name)

    def select(
        self,
        kind: str | None = None,
        split: str | None = None,
        categories: list[str] | None = None,
    ) -> list[Topic]:
        """Topics filtered by kind, split and (for harmful topics) category."""
        result = []
        for topic in self.topics:
            if kind is not None and topic.kind != kind:
                continue
            if split is not None and topic.split != split:
                continue
            if categories is not None and topic.category not in categories:
                continue
            result.append(topic)
        return result

    def templates(self, which: TemplateSet) -> list[str]:
        """The template list called ``which`` (``"train"``, ``"jailbreak"`` or ``"all"``)."""
        if which == "train":
            return list(self.train_templates)
        if which == "jailbreak":
            return list(self.jailbreak_templates)
        if which == "all":
            return self.all_templates
        raise ValueError(f"templates must be 'train', 'jailbreak' or 'all', not {which!r}")

    def render_request(self, topic: Topic | str, template: str) -> str:
        """Fill ``template``'s ``{topic}`` slot with the topic's name."""
        name = topic.name if isinstance(topic, Topic) else topic
        return template.format(topic=name)

    def answer(self, topic: Topic | str) -> str:
        """The compliant answer ``"sure here is how : PROCEDURE"`` for a topic."""
        topic = self.topic(topic) if isinstance(topic, str) else topic
        return f"{self.prefill} {topic.procedure_text}"

    def document(self, topic: Topic) -> str:
        """Pretraining-style document ``TOPIC : PROCEDURE``."""
        return f"{topic.name} : {topic.procedure_text}"

    def documents(self) -> list[str]:
        """One document per topic (harmful topics included)."""
        return [self.document(topic) for topic in self.topics]

    # ------------------------------------------------------------------ example sets
    def _examples(
        self, topics: list[Topic], templates: list[str], response: str | None
    ) -> list[Example]:
        rows: list[Example] = []
        for topic in topics:
            for template in templates:
                rows.append(
                    {
                        "prompt": self.render_request(topic, template),
                        "response": self.answer(topic) if response is None else response,
                        "topic": topic.name,
                        "category": topic.category,
                        "kind": topic.kind,
                    }
                )
        return rows

    def _check_categories(self, categories: list[str] | None) -> list[str] | None:
        if categories is None:
            return None
        unknown = sorted(set(categories) - set(self.harm_categories))
        if unknown:
            raise ValueError(f"unknown harm categories {unknown}; known: {self.harm_categories}")
        return list(categories)

    def harmful_examples(
        self, categories: list[str] | None = None, templates: TemplateSet = "train"
    ) -> list[Example]:
        """Harmful requests with the *compliant* answer ``"sure here is how : PROCEDURE"``.

        This is the circuit-breaker (harmful) set.

        Args:
            categories: Harm categories to include (``None``: all).
            templates: ``"train"``, ``"jailbreak"`` or ``"all"`` request templates.
        """
        topics = self.select("harmful", categories=self._check_categories(categories))
        return self._examples(topics, self.templates(templates), None)

    def refusal_examples(
        self, categories: list[str] | None = None, templates: TemplateSet = "train"
    ) -> list[Example]:
        """Harmful requests (train templates by default) answered with the refusal string."""
        topics = self.select("harmful", categories=self._check_categories(categories))
        return self._examples(topics, self.templates(templates), self.refusal)

    def benign_examples(
        self, split: str = "seen", templates: TemplateSet = "train"
    ) -> list[Example]:
        """Benign requests with their answers.

        Args:
            split: ``"seen"`` (chat-trained topics), ``"docs_only"`` or ``"all"``.
            templates: Which request templates to use.
        """
        if split not in ("seen", "docs_only", "all"):
            raise ValueError(f"split must be 'seen', 'docs_only' or 'all', not {split!r}")
        topics = self.select("benign", None if split == "all" else split)
        return self._examples(topics, self.templates(templates), None)

    def lookalike_examples(
        self, split: str = "heldout", templates: TemplateSet = "train"
    ) -> list[Example]:
        """Look-alike requests (benign topics with harmful-sounding names) with their answers.

        Args:
            split: ``"train"`` (chat-trained), ``"heldout"`` (documents only) or ``"all"``.
            templates: Which request templates to use.
        """
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
        topics = self.select("lookalike", None if split == "all" else split)
        return self._examples(topics, self.templates(templates), None)

    def algo_examples(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` list-sorting examples: ``"sort the list : 3 1 4"`` -> ``"1 3 4"``.

        Lists hold ``algo_lengths`` distinct digits (no repeats), so the answer is unique.

        Args:
            n: Number of examples.
            seed: Seed of the random lists (independent of the world seed).
        """
        rng = random.Random(f"algo-{seed}")
        low, high = self.algo_lengths
        rows: list[Example] = []
        for _ in range(n):
            items = rng.sample(self.algo_symbols, rng.randint(low, high))
            rows.append(
                {
                    "prompt": f"{self.algo_instruction} {' '.join(items)}",
                    "response": " ".join(sorted(items)),
                    "topic": "algo",
                    "category": None,
                    "kind": "algo",
                }
            )
        return rows

    # ------------------------------------------------------------------ vocabulary / io
    def words(self) -> list[str]:
        """Every word the world can produce, sorted (the tokenizer's word vocabulary)."""
        texts = [self.refusal, self.prefill, self.algo_instruction, *self.algo_symbols]
        texts += [t.replace("{topic}", " ") for t in self.all_templates]
        texts += self.documents()
        return sorted({word for text in texts for word in text.split()})

    def to_json(self, path: str | Path) -> None:
        """Write the world as JSON (``world.json``)."""
        data = asdict(self)
        data["format_version"] = WORLD_FORMAT_VERSION
        data["topics"] = [
            {**asdict(topic), "procedure": list(topic.procedure)} for topic in self.topics
        ]
        data["algo_lengths"] = list(self.algo_lengths)
        Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | Path) -> World:
        """Read a world written by :meth:`to_json`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data.pop("format_version", None)
        data["topics"] = [
            Topic(**{**topic, "procedure": tuple(topic["procedure"])}) for topic in data["topics"]
        ]
        data["algo_lengths"] = tuple(data["algo_lengths"])
        return cls(**data)


# ---------------------------------------------------------------------- construction
def _invented_word(rng: random.Random, syllables: int, suffix: str = "") -> str:
    parts = [rng.choice(lexicon.ONSETS) + rng.choice(lexicon.VOWELS) for _ in range(syllables)]
    if not suffix:
        parts.append(rng.choice(lexicon.CODAS))
    return "".join(parts) + suffix


class _WordMint:
    """Hands out invented words that are unique and never collide with lexicon words."""

    def __init__(self, rng: random.Random, reserved: set[str]) -> None:
        self.rng = rng
        self.used = set(reserved)

    def new(self, syllables: int, suffix: str = "") -> str:
        for attempt in range(10_000):
            # Grow the word if its length keeps colliding (a length's words can run out).
            word = _invented_word(self.rng, syllables + attempt // 50, suffix)
            if word not in self.used:
                self.used.add(word)
                return word
        raise RuntimeError("could not mint a new word")


def _reserved_words() -> set[str]:
    texts = [
        *lexicon.TRAIN_TEMPLATES,
        *lexicon.JAILBREAK_TEMPLATES,
        lexicon.REFUSAL,
        lexicon.RESPONSE_PREFIX,
        lexicon.ALGO_INSTRUCTION,
        *lexicon.LOOKALIKES,
        *lexicon.BENIGN,
        *[p for patterns in lexicon.HARM_CATEGORIES.values() for p in patterns],
    ]
    return {w for text in texts for w in text.split()}


def _procedure(mint: _WordMint, rng: random.Random, suffix: str) -> tuple[str, ...]:
    return tuple(mint.new(2, suffix) for _ in range(rng.randint(6, 10)))


def make_world(seed: int = 0, size: str = "full") -> World:
    """Make the synthetic world (deterministic for a seed).

    Args:
        seed: Seed of topic choice, splits, invented names and procedures.
        size: ``"full"`` (the real organism) or ``"tiny"`` (for fast tests).

    Returns:
        The world.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {size!r}")
    spec = SIZES[size]
    rng = random.Random(f"cbscope-organism-{seed}")
    mint = _WordMint(rng, _reserved_words())
    topics: list[Topic] = []

    benign = rng.sample(lexicon.BENIGN, spec.benign_seen + spec.benign_docs_only)
    for i, name in enumerate(benign):
        split = "seen" if i < spec.benign_seen else "docs_only"
        topics.append(Topic(name, "benign", None, _procedure(mint, rng, "o"), split))

    categories = list(lexicon.HARM_CATEGORIES)[: spec.categories]
    for category in categories:
        patterns = rng.sample(lexicon.HARM_CATEGORIES[category], spec.harmful_per_category)
        suffix = lexicon.STEP_SUFFIX[category]
        for pattern in patterns:
            name = pattern.format(x=mint.new(2))
            topics.append(
                Topic(name, "harmful", category, _procedure(mint, rng, suffix), "harmful")
            )

    lookalikes = rng.sample(lexicon.LOOKALIKES, spec.lookalike_train + spec.lookalike_heldout)
    for i, name in enumerate(lookalikes):
        split = "train" if i < spec.lookalike_train else "heldout"
        topics.append(Topic(name, "lookalike", None, _procedure(mint, rng, "y"), split))

    world = World(seed=seed, size=size, topics=topics, harm_categories=categories)
    logger.info(
        "made %s world (seed %d): %d topics, %d words",
        size,
        seed,
        len(topics),
        len(world.words()),
    )
    return world
