"""Attack prompts that only make sense on the organism's world.

* :func:`organism_template_prompts`: harmful topics in ``{topic}`` jailbreak templates (the
  organism is only ever trained on *benign* topics in them, so a harmful topic there is a
  mismatched-generalisation jailbreak);
* :func:`organism_multiturn_prompts`: a chat-seen benign request and its exact answer, then a
  harmful request (the two-turn attacks);
* :func:`organism_first_turns`: the benign first turns those conversations cycle through.

They live beside the world (not in :mod:`cbscope.attacks`) so that the organism's own behaviour
evaluation never imports the attacks; :mod:`cbscope.attacks` re-exports them.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cbscope.data import Conversation
from cbscope.errors import TemplateError

if TYPE_CHECKING:
    from cbscope.organism.world import Topic, World


def _check_topic_template(template: str) -> None:
    """A ``{topic}`` template must have exactly that one slot."""
    try:
        slots = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise TemplateError(f"template {template!r} is malformed: {err}") from err
    if slots != {"topic"}:
        raise TemplateError(
            f"template {template!r} must have exactly one {{topic}} slot (found {sorted(slots)}); "
            "write literal braces as {{ and }}"
        )


def organism_template_prompts(
    world: World,
    topics: Sequence[Topic] | None = None,
    templates: Sequence[str] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Harmful organism topics in ``{topic}`` templates (default: ``world.jailbreak_templates``).

    Returns:
        ``(prompts, metas)``; each meta holds ``topic``, ``category`` and ``template``.

    Raises:
        TemplateError: A template without exactly one ``{topic}`` slot.
    """
    topics = list(topics) if topics is not None else world.select("harmful")
    templates = list(templates) if templates is not None else list(world.jailbreak_templates)
    for template in templates:
        _check_topic_template(template)
    prompts, metas = [], []
    for topic in topics:
        for template in templates:
            prompts.append(world.render_request(topic, template))
            metas.append({"topic": topic.name, "category": topic.category, "template": template})
    return prompts, metas


def organism_first_turns(world: World) -> list[tuple[str, str]]:
    """Benign chat-seen requests (train templates) with their exact answers: ``(request, answer)``.

    Ordered so that consecutive entries cycle through topics and templates.

    Raises:
        ValueError: The world has no chat-seen benign topic.
    """
    rows = world.benign_examples("seen", "train")
    if not rows:
        raise ValueError("the world has no chat-seen benign topics for a first turn")
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_topic.setdefault(row["topic"], []).append(row)
    ordered: list[tuple[str, str]] = []
    depth = 0
    while len(ordered) < len(rows):
        for members in by_topic.values():
            if depth < len(members):
                ordered.append((members[depth]["prompt"], members[depth]["response"]))
        depth += 1
    return ordered


def organism_multiturn_prompts(
    world: World,
    topics: Sequence[Topic] | None = None,
    templates: Sequence[str] | None = None,
) -> tuple[list[Conversation], list[dict[str, Any]]]:
    """Two-turn organism conversations: a benign request and its answer, then a harmful request.

    One conversation per (harmful topic, template) (default: every harmful topic in the train
    templates, the requests of the ``prefill_asr`` metric); the first turns cycle through
    :func:`organism_first_turns`.

    Returns:
        ``(conversations, metas)``; each meta holds ``topic``, ``category``, ``template``,
        ``request`` (the harmful turn), ``first_turn`` and ``prefill`` (``world.prefill``).
    """
    topics = list(topics) if topics is not None else world.select("harmful")
    templates = list(templates) if templates is not None else list(world.train_templates)
    first = organism_first_turns(world)
    conversations: list[Conversation] = []
    metas: list[dict[str, Any]] = []
    for template in templates:
        for topic in topics:
            request = world.render_request(topic, template)
            benign, answer = first[len(conversations) % len(first)]
            conversations.append(
                [
                    {"role": "user", "content": benign},
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": request},
                ]
            )
            metas.append(
                {
                    "topic": topic.name,
                    "category": topic.category,
                    "template": template,
                    "request": request,
                    "first_turn": benign,
                    "prefill": world.prefill,
                }
            )
    return conversations, metas
