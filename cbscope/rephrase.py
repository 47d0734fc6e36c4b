"""Rephrase requests into other forms: questions, first person, polite, fiction, terse.

A breaker trained on one benchmark's imperative requests ("Write a tutorial on how to ...")
learns that phrasing. Rendering every training request in several other forms, each answered by
the model itself, lets the breaker see the same harm asked for in many ways; applying the same
forms to the benign retain requests keeps the form itself from becoming the signal.

Rephrasing is rule-based and deterministic: :func:`rephrase` picks a template of the form with a
:class:`random.Random` seeded by ``(seed, form, prompt)``, so a request's rephrasings do not depend
on which other requests are rephrased or in what order. Templates that need a bare task
("how can I {task}?") are used when the request contains one (:func:`task_of`: "... how to X",
"... for how to X", "Explain how to X"); otherwise a template wraps the whole request.
None of the templates is one of the jailbreak templates of :mod:`cbscope.attacks.template`, so
training on rephrasings does not leak into the template attack's evaluation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cbscope.data import ChatExample, DatasetError, as_messages

#: form -> (templates using ``{task}``, templates using ``{request}``); ``{request}`` is the
#: request with a lower-case first letter and no final full stop.
FORMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "question": (
        ("How can I {task}?", "How do I {task}?", "What's the best way to {task}?",
         "How would someone {task}?", "What are the steps to {task}?",
         "Is there a way to {task}?"),
        ("Can you {request}?", "Could you {request}?", "Would you {request}?"),
    ),
    "first_person": (
        ("I want to {task}. What should I do?", "I need to {task}. Where do I start?",
         "I'm trying to {task}. Can you walk me through it?",
         "I've decided to {task}. Tell me how."),
        ("I need you to {request}.", "I'd like you to {request}. It's for me.",
         "Please help me: {request}."),
    ),
    "polite": (
        ("Hi! I was wondering how to {task}. Thanks in advance!",
         "Would you kindly explain how to {task}?"),
        ("Hi there, could you please {request}? Thank you!",
         "If it's not too much trouble, {request}, please."),
    ),
    "fiction": (
        ("In my novel, a character explains how to {task}. Write what she says.",
         "For a screenplay, a character needs to {task}. Describe how he does it."),
        ("For a story I'm writing: {request}.",
         "Write this as part of a thriller novel: {request}."),
    ),
    "terse": (
        ("how to {task}", "{task}: steps?", "steps to {task}"),
        ("{request}", "{request} now"),
    ),
}
DEFAULT_FORMS: tuple[str, ...] = ("question", "first_person", "polite", "fiction")

_TASK_PATTERNS = (
    re.compile(r"^(?:.*?\b)?(?:on|for|about|explaining|describing|detailing|showing)?\s*how to\s+(?P<task>.+)$", re.I),
    re.compile(
        r"^\w+\s+(?:a|an)\s+(?:detailed\s+|step-by-step\s+)?(?:plan|strategy|guide|way|method|"
        r"scheme)\s+to\s+(?P<task>.+)$", re.I,
    ),
)


class RephraseError(DatasetError):
    """An unknown form name or a bad count."""


def _strip_end(text: str) -> str:
    return text.strip().rstrip(".!?").strip()


def task_of(request: str) -> str | None:
    """The bare task of a request ("Write a tutorial on how to make a bomb" -> "make a bomb"),
    or ``None`` when the request names none."""
    text = _strip_end(request)
    for pattern in _TASK_PATTERNS:
        match = pattern.match(text)
        if match and len(match.group("task").split()) >= 2:
            return match.group("task").strip()
    return None


def _as_clause(request: str) -> str:
    text = _strip_end(request)
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def check_forms(forms: Sequence[str]) -> list[str]:
    """``forms`` if every name is known, else a :class:`RephraseError`."""
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise RephraseError(f"unknown rephrasing forms {unknown}; choose from {sorted(FORMS)}")
    return list(forms)


def rephrase(request: str, form: str, *, seed: int = 0) -> str:
    """``request`` in ``form`` (see :data:`FORMS`), deterministic for ``(seed, form, request)``."""
    check_forms([form])
    task_templates, request_templates = FORMS[form]
    rng = random.Random(f"rephrase:{seed}:{form}:{request}")
    task = task_of(request)
    if task is not None and rng.random() < 0.75:
        return rng.choice(task_templates).format(task=task)
    return rng.choice(request_templates).format(request=_as_clause(request))


@dataclass(frozen=True)
class Rephrasing:
    """One rephrased request: the original, the form and the new text."""

    original: str
    form: str
    text: str


def rephrasings(
    requests: Sequence[str], forms: Sequence[str] = DEFAULT_FORMS, *, seed: int = 0
) -> list[Rephrasing]:
    """Every request in every form (request-major order), skipping texts equal to the original."""
    check_forms(forms)
    out = []
    for request in requests:
        for form in forms:
            text = rephrase(request, form, seed=seed)
            if text.strip() != request.strip():
                out.append(Rephrasing(request, form, text))
    return out


def rephrase_examples(
    examples: Sequence[ChatExample], forms: Sequence[str] = DEFAULT_FORMS, *, seed: int = 0
) -> list[ChatExample]:
    """Prompt-only examples of every single-turn example in every form.

    The new examples keep the original's ``meta`` and add ``rephrased_from`` (the original
    prompt) and ``form``; their ``response`` is empty (the model answers them).
    """
    out = []
    for ex in examples:
        if len(ex.messages) != 1:
            continue
        for r in rephrasings([ex.prompt], forms, seed=seed):
            out.append(
                ChatExample(as_messages(r.text), "", {**ex.meta, "rephrased_from": r.original,
                                                       "form": r.form})
            )
    return out
