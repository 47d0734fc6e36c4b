"""Harmful-prompt sources: built-in public benchmarks, user files, deterministic splits.

A breaker trained on one benchmark and evaluated on held-out rows of the same benchmark measures
how well it learned that benchmark's *phrasing*. cbscope therefore names every harmful prompt by
its **source** and evaluates per source:

* ``advbench``: AdvBench harmful behaviours (imperative: "Write a tutorial on how to ..."), with
  its ``target`` column as the prefill;
* ``harmbench``: HarmBench validation behaviours, ``standard`` functional category only
  (imperative, more specific: "Give detailed step-by-step instructions for ...");
* ``xstest_unsafe``: XSTest's ``unsafe`` prompts (questions: "How can I kill a person?").

Built-ins are read from the data folder (:func:`data_dir`: ``$CBSCOPE_DATA`` or
``../shared/data``). A user source is ``NAME=PATH`` (a CSV with a prompt column, or JSONL with
``prompt``; an optional ``target``/``prefill`` field is used as the prefill).

Every source splits into *train* and *held-out* rows by a hash of the normalised prompt
(:func:`is_heldout`): the split does not depend on file order or on which other sources are used,
so a training run and a later evaluation agree without talking to each other. What a breaker was
trained on is recorded as prompt keys (:func:`prompt_key`) in its ``train_info.json``
(``data_sources``); :func:`overlap` tells an evaluation which of its prompts were trained on.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbscope.data import ChatExample, DatasetError, load_examples

DATA_ENV = "CBSCOPE_DATA"
#: Percent of each source's rows held out from training (by prompt hash).
DEFAULT_HELDOUT_PERCENT = 50
SPLIT_SALT = "cbscope-split-v1"


@dataclass(frozen=True)
class SourceSpec:
    """Where a source's prompts are and which rows count.

    Attributes:
        name: Short name (report rows, matrix columns).
        path: File, relative to the data folder (built-ins) or absolute / relative to the
            working folder (user sources).
        column: Prompt column of a CSV (``None``: the first known prompt column).
        where: Keep only rows whose fields equal these values.
        prefill_column: Field holding a per-prompt prefill (AdvBench's ``target``).
        heldout_percent: Percent of rows held out from training (by prompt hash).
        description: One line for reports.
        builtin: A built-in source (read from the data folder).
    """

    name: str
    path: str
    column: str | None = None
    where: tuple[tuple[str, str], ...] = ()
    prefill_column: str | None = None
    heldout_percent: int = DEFAULT_HELDOUT_PERCENT
    description: str = ""
    builtin: bool = False


BUILTIN_SOURCES: dict[str, SourceSpec] = {
    "advbench": SourceSpec(
        "advbench", "advbench/harmful_behaviors.csv", "goal", prefill_column="target",
        description="AdvBench harmful behaviours (imperative requests)", builtin=True,
    ),
    "harmbench": SourceSpec(
        "harmbench", "harmbench/harmbench_behaviors_text_val.csv", "Behavior",
        where=(("FunctionalCategory", "standard"),),
        description="HarmBench validation, standard behaviours (specific imperative requests)",
        builtin=True,
    ),
    "xstest_unsafe": SourceSpec(
        "xstest_unsafe", "xstest/xstest_prompts.csv", "prompt", where=(("label", "unsafe"),),
        description="XSTest unsafe prompts (question-form requests)", builtin=True,
    ),
}
#: Benign sources the presets and evaluations use (same loading and split rules).
BENIGN_SOURCES: dict[str, SourceSpec] = {
    "xstest_safe": SourceSpec(
        "xstest_safe", "xstest/xstest_prompts.csv", "prompt", where=(("label", "safe"),),
        description="XSTest safe prompts (benign look-alikes)", builtin=True,
    ),
}
DEFAULT_SOURCES: tuple[str, ...] = tuple(BUILTIN_SOURCES)


@dataclass
class Source:
    """A loaded source: its spec, the file it came from and its prompts.

    Attributes:
        spec: The :class:`SourceSpec`.
        path: The file read.
        examples: One :class:`ChatExample` per kept row; ``meta["source"]`` is the name and
            ``meta["prefill"]`` the row's prefill when the source has one.
    """

    spec: SourceSpec
    path: Path
    examples: list[ChatExample] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The source's name."""
        return self.spec.name

    def train(self) -> list[ChatExample]:
        """Rows a breaker may train on (file order)."""
        return [ex for ex in self.examples if not is_heldout(ex.prompt, self.spec.heldout_percent)]

    def heldout(self) -> list[ChatExample]:
        """Rows kept out of training (file order)."""
        return [ex for ex in self.examples if is_heldout(ex.prompt, self.spec.heldout_percent)]


def data_dir() -> Path | None:
    """``$CBSCOPE_DATA``, else ``../shared/data`` beside the repository or the working folder."""
    env = os.environ.get(DATA_ENV)
    candidates = [Path(env)] if env else []
    candidates += [
        Path(__file__).resolve().parents[1].parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
    ]
    return next((c for c in candidates if c.is_dir()), None)


_SPACE = re.compile(r"\s+")


def normalise_prompt(text: str) -> str:
    """Lower case, single spaces, no surrounding space or final punctuation."""
    return _SPACE.sub(" ", str(text)).strip().rstrip(".?!").strip().lower()


def prompt_key(text: str) -> str:
    """A 16-hex-digit key of a normalised prompt (what ``train_info.json`` records)."""
    return hashlib.sha256(normalise_prompt(text).encode("utf-8")).hexdigest()[:16]


def is_heldout(text: str, percent: int = DEFAULT_HELDOUT_PERCENT) -> bool:
    """Whether a prompt is on the held-out side of its source's split (``percent`` of rows)."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{normalise_prompt(text)}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 < percent


def parse_source(text: str) -> SourceSpec:
    """``"advbench"`` (a built-in) or ``"NAME=PATH"`` (a user file) -> a :class:`SourceSpec`.

    Raises:
        DatasetError: An unknown built-in name, an empty name or path, or a name with
            characters other than letters, digits, ``_`` and ``-``.
    """
    text = str(text).strip()
    if "=" in text:
        name, _, path = text.partition("=")
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise DatasetError(f"source {text!r}: give NAME=PATH")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise DatasetError(f"source name {name!r}: use letters, digits, '_' and '-' only")
        return SourceSpec(name, path, description=f"user source {path}")
    known = {**BUILTIN_SOURCES, **BENIGN_SOURCES}
    if text not in known:
        raise DatasetError(
            f"unknown source {text!r}: use one of {sorted(BUILTIN_SOURCES)} or NAME=PATH"
        )
    return known[text]


def parse_sources(value: str | Sequence[str] | None) -> list[SourceSpec]:
    """A comma-separated string or a list of source arguments -> specs (names unique).

    ``None`` gives the default sources (:data:`DEFAULT_SOURCES`).
    """
    if value is None:
        items: list[str] = list(DEFAULT_SOURCES)
    elif isinstance(value, str):
        items = [part for part in value.split(",") if part.strip()]
    else:
        items = [str(part) for part in value]
    specs = [parse_source(item) for item in items]
    if not specs:
        raise DatasetError("no sources given")
    names = [spec.name for spec in specs]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise DatasetError(f"sources named twice: {doubled}")
    return specs


def source_path(spec: SourceSpec, data: Path | None = None) -> Path:
    """The file of a source (built-ins relative to the data folder).

    Raises:
        FileNotFoundError: The file is missing (naming the data folder and ``$CBSCOPE_DATA``).
    """
    if spec.builtin:
        root = data or data_dir()
        if root is None:
            raise FileNotFoundError(
                f"source {spec.name!r} reads {spec.path} from the data folder, but there is none: "
                f"set ${DATA_ENV} or put ../shared/data beside the repository"
            )
        path = Path(root) / spec.path
    else:
        path = Path(spec.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"source {spec.name!r}: {path} not found")
    return path


def load_source(spec: SourceSpec | str, data: Path | None = None) -> Source:
    """Read a source's prompts (see :class:`Source`).

    Raises:
        FileNotFoundError: The file is missing.
        DatasetError: A malformed file, or no rows left after the ``where`` filter.
    """
    spec = parse_source(spec) if isinstance(spec, str) else spec
    path = source_path(spec, data)
    if path.suffix.lower() == ".csv" and spec.column is not None:
        from cbscope.data import load_prompt_csv

        rows = load_prompt_csv(path, column=spec.column)
    else:
        rows = load_examples(path, require_response=False)
    kept = [ex for ex in rows if all(str(ex.meta.get(k)) == v for k, v in spec.where)]
    if not kept:
        raise DatasetError(f"source {spec.name!r}: no rows in {path} match {dict(spec.where)}")
    examples = []
    for ex in kept:
        prefill = ex.meta.get(spec.prefill_column) if spec.prefill_column else None
        prefill = prefill or ex.meta.get("target") or ex.meta.get("prefill")
        meta = {"source": spec.name, **({"prefill": str(prefill)} if prefill else {})}
        examples.append(ChatExample(list(ex.messages), ex.response, meta))
    return Source(spec, path, examples)


def file_digest(path: Path) -> str:
    """A short SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def training_record(
    source: Source, trained: Iterable[ChatExample], *, portable_path: str | None = None
) -> dict[str, Any]:
    """What ``train_info.json`` records of a source a breaker trained on: the file, its digest,
    the split rule and the trained prompts' keys (:func:`prompt_key`)."""
    keys = sorted({prompt_key(ex.meta.get("rephrased_from") or ex.prompt) for ex in trained})
    return {
        "file": portable_path or str(source.path),
        "sha256": file_digest(source.path),
        "heldout_percent": source.spec.heldout_percent,
        "n_rows": len(source.examples),
        "n_trained": len(keys),
        "prompt_keys": keys,
    }


def trained_keys(info: Mapping[str, Any]) -> dict[str, set[str]]:
    """``{source: prompt keys}`` a breaker trained on, from its ``train_info.json`` content.

    Older adapters record AdvBench only through ``advbench`` (the file) and ``heldout_prompts``
    (the rows *not* trained on); those give no keys and are handled by :func:`overlap`.
    """
    recorded = info.get("data_sources") or {}
    return {
        name: set(entry.get("prompt_keys") or [])
        for name, entry in recorded.items()
        if isinstance(entry, Mapping)
    }


def overlap(
    info: Mapping[str, Any], source: str, prompts: Sequence[str]
) -> dict[str, Any]:
    """How an evaluated source relates to a breaker's training data.

    Returns:
        ``{"trained_on_source": bool, "n_overlap": prompts trained on, "n": len(prompts),
        "known": whether the adapter records its training data}``. A source counts as trained on
        when any training prompt came from it; ``n_overlap`` counts evaluated prompts whose key
        is among *any* source's trained keys (a user file may repeat a benchmark's rows).
    """
    keys = trained_keys(info)
    every = set().union(*keys.values()) if keys else set()
    n_overlap = sum(prompt_key(p) in every for p in prompts)
    trained_on = bool(keys.get(source)) or n_overlap > 0
    legacy = not keys and bool(info.get("heldout_prompts"))
    if legacy and source == "advbench":
        heldout = {prompt_key(p) for p in info["heldout_prompts"]}
        trained_on = True
        n_overlap = sum(prompt_key(p) not in heldout for p in prompts)
    return {
        "trained_on_source": trained_on,
        "n_overlap": int(n_overlap),
        "n": len(prompts),
        "known": bool(keys) or legacy,
    }
