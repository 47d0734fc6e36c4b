"""Evaluate a circuit breaker: attacks (base vs circuit-broken), capability, over-refusal, firing.

:func:`evaluate_pair` runs every attack of :mod:`cbscope.attacks` against both states of a
:class:`~cbscope.pair.ModelPair` (adapters off = ``base``, on = ``cb``), judges every response, and
returns a :class:`Report`; :meth:`Report.save` writes ``report.json``, ``report.md`` and
``report.html`` (plotly, JavaScript inline, works offline).

Two data suites:

* **organism** (the model folder has a ``world.json``): harmful topics in the train templates
  (direct, prefill with ``world.prefill``, RepE, soft prompt toward ``world.answer(topic)``), the
  jailbreak templates (template), the same requests after a benign first exchange (multiturn,
  multiturn_prefill: :mod:`cbscope.attacks.multiturn`), exact judges; capability = the
  organism's exact-match tasks (:func:`cbscope.organism.evaluate_behaviour`) plus KL /
  perplexity on benign chat; over-refusal = held-out look-alikes (refused, or the breaker fired). The harm category the breaker never saw
  (``train_info.json``'s ``holdout_category``) is reported as split ``heldout``.
* **chat** (any other model, e.g. SmolLM2): AdvBench held-out prompts (``target`` column as prefill
  and soft-prompt target), :data:`~cbscope.attacks.REQUEST_TEMPLATES`, the compliance judge
  (fluent, non-degenerate, non-refusal), the multi-turn attacks after
  :data:`~cbscope.attacks.CHAT_FIRST_TURN`; capability = KL / perplexity of the CB model on the base
  model's answers to harmless instructions; over-refusal = XSTest safe prompts. Data come from
  ``../shared/data`` (or ``$CBSCOPE_DATA``) when present.

Every number in the report is a mean over per-example ``rows`` (kept in ``report.json``), computed
by :func:`summarise`; re-running it on the rows reproduces the report.

The package's modules, one job each:

* :mod:`~cbscope.evaluate.config`: :class:`EvalConfig` and :func:`parse_attacks`;
* :mod:`~cbscope.evaluate.suites`, :mod:`~cbscope.evaluate.organism_suite`,
  :mod:`~cbscope.evaluate.chat_suite`: the data of the two suites;
* :mod:`~cbscope.evaluate.runner`: :func:`evaluate_pair`, which runs each attack through the
  registry (:mod:`cbscope.attacks.registry`), then the measurements of
  :mod:`~cbscope.evaluate.measures`;
* :mod:`~cbscope.evaluate.rows` and :mod:`~cbscope.evaluate.summary`: the typed rows and
  :func:`summarise`;
* :mod:`~cbscope.evaluate.report` and :mod:`~cbscope.evaluate.render`: :class:`Report` and its
  Markdown, HTML and plotly renderings.
"""

from __future__ import annotations

from cbscope.attacks import (
    ATTACK_NAMES,
    CHAT_FIRST_TURN,
    DEFAULT_PREFILL,
    MULTITURN_ATTACKS,
    REQUEST_TEMPLATES,
    AttackRun,
    FinetuneAttackConfig,
    GenerationSettings,
    RepeConfig,
    SoftPromptConfig,
    direct_attack,
    finetune_attack,
    generate_responses,
    model_mode,
    multiturn_attack,
    prefill_attack,
    refusal_compliance_sets,
    repe_attack,
    soft_prompt_attack,
    template_attack,
    with_history,
    wrap_requests,
)
from cbscope.attacks.rows import attack_rows
from cbscope.attacks.suite import EvalSuite, Item
from cbscope.data import encode_chat as encode_chat
from cbscope.data import pad_id_of as pad_id_of
from cbscope.data import pad_right as pad_right
from cbscope.evaluate.chat_suite import chat_suite
from cbscope.evaluate.config import (
    CHAT_DEFAULT_LIMIT,
    CHAT_HELDOUT_DEFAULT,
    CHAT_MAX_NEW_TOKENS,
    CHAT_SOFT_PROMPT_LIMIT,
    ORGANISM_MAX_NEW_TOKENS,
    SOFT_PROMPT_TARGETS,
    SOURCE_ROWS,
    EvalConfig,
    parse_attacks,
)
from cbscope.evaluate.measures import CAPABILITY_METRICS, retain_divergence
from cbscope.evaluate.organism_suite import heldout_categories_of, organism_suite, organism_world
from cbscope.evaluate.report import REPORT_FORMAT_VERSION, Report, check_report_dir
from cbscope.evaluate.rows import Row
from cbscope.evaluate.runner import evaluate_pair
from cbscope.evaluate.suites import (
    BUILTIN_HARMLESS,
    BUILTIN_LOOKALIKES,
    CHAT_REFUSAL,
    adapter_info,
    spread,
)
from cbscope.evaluate.summary import Summary, summarise
from cbscope.io import atomic_write_text as atomic_write_text
from cbscope.judges import ComplianceJudge as ComplianceJudge
from cbscope.judges import DegenerateJudge as DegenerateJudge
from cbscope.judges import ExactJudge as ExactJudge
from cbscope.judges import RefusalKeywordJudge as RefusalKeywordJudge
from cbscope.judges import Verdict as Verdict
from cbscope.judges import off_topic_words as off_topic_words
from cbscope.judges import run_judge as run_judge
from cbscope.organism.prompts import organism_multiturn_prompts as organism_multiturn_prompts
from cbscope.organism.prompts import organism_template_prompts as organism_template_prompts

# The "X as X" imports above keep names importable from here that the single module had.
__all__ = [
    "ATTACK_NAMES",
    "BUILTIN_HARMLESS",
    "BUILTIN_LOOKALIKES",
    "CAPABILITY_METRICS",
    "CHAT_DEFAULT_LIMIT",
    "CHAT_FIRST_TURN",
    "CHAT_HELDOUT_DEFAULT",
    "CHAT_MAX_NEW_TOKENS",
    "CHAT_REFUSAL",
    "CHAT_SOFT_PROMPT_LIMIT",
    "DEFAULT_PREFILL",
    "MULTITURN_ATTACKS",
    "ORGANISM_MAX_NEW_TOKENS",
    "REPORT_FORMAT_VERSION",
    "REQUEST_TEMPLATES",
    "SOFT_PROMPT_TARGETS",
    "SOURCE_ROWS",
    "AttackRun",
    "EvalConfig",
    "EvalSuite",
    "FinetuneAttackConfig",
    "GenerationSettings",
    "Item",
    "RepeConfig",
    "Report",
    "Row",
    "SoftPromptConfig",
    "Summary",
    "adapter_info",
    "attack_rows",
    "chat_suite",
    "check_report_dir",
    "direct_attack",
    "evaluate_pair",
    "finetune_attack",
    "generate_responses",
    "heldout_categories_of",
    "model_mode",
    "multiturn_attack",
    "organism_suite",
    "organism_world",
    "parse_attacks",
    "prefill_attack",
    "refusal_compliance_sets",
    "repe_attack",
    "retain_divergence",
    "soft_prompt_attack",
    "spread",
    "summarise",
    "template_attack",
    "with_history",
    "wrap_requests",
]
