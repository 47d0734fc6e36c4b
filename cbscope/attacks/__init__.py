"""Attacks on a circuit-broken model, each runnable against the base (adapters off) or CB model.

One module per attack:

* :mod:`~cbscope.attacks.direct`: the request as it is;
* :mod:`~cbscope.attacks.prefill`: an affirmative assistant prefix (custom, AdvBench ``target``,
  the organism's ``world.prefill``);
* :mod:`~cbscope.attacks.template`: jailbreak templates (``{request}`` wrappers; the organism's
  ``{topic}`` jailbreak templates);
* :mod:`~cbscope.attacks.multiturn`: a benign first exchange, then the harmful request (direct,
  or with its answer prefilled);
* :mod:`~cbscope.attacks.soft_prompt`: optimised input embeddings after the request (signed
  gradient descent toward a target completion);
* :mod:`~cbscope.attacks.repe`: difference-of-means steering through forward hooks;
* :mod:`~cbscope.attacks.finetune`: LoRA fine-tuning of a merged copy on harmful examples, and
  its worst case over a learning-rate x steps x seeds grid under a capability bound;
* :mod:`~cbscope.attacks.gcg`: GCG through nanoGCG, the string in a template's slot;
* :mod:`~cbscope.attacks.embedding`: the Schwinn-Geisler embedding attack (signed gradient from a
  meaningful string, best-of-n sampled answers) and obfuscated activations on top of it;
* :mod:`~cbscope.attacks.refusal_ablation`: the refusal direction projected out of every layer;
* :mod:`~cbscope.attacks.escalation`: multi-turn escalation and many-shot conversations.

The strong, slow ones (gcg, embedding, obfuscation, refusal_ablation, escalation, many_shot,
finetune_worst) run when named (or with ``all``). Optimising attacks keep their solutions along
the way (:class:`~cbscope.attacks.base.Checkpoint`), so the report has ASR against budget.

Every attack but fine-tuning returns an :class:`AttackRun` (prompts, prefills, responses,
metadata) for a judge (:mod:`cbscope.judges`); :func:`cbscope.evaluate.evaluate_pair` runs them all
and writes the report.

Each module also registers its attack (an :class:`~cbscope.attacks.protocol.Attack`: a name, an
options dataclass, ``run`` on a pair and an :class:`EvalSuite` with the shared
:class:`GenerationSettings`) in :mod:`cbscope.attacks.registry`; ``cbscope eval`` dispatches
through it. Importing this package imports every module in it, so a new attack is one module.
The shared pieces: :mod:`~cbscope.attacks.protocol` (the protocol), :mod:`~cbscope.attacks.registry`,
:mod:`~cbscope.attacks.options` (options from JSON, their ``--help`` lines),
:mod:`~cbscope.attacks.generate` (decoding, and the base of attacks that only choose prompts),
:mod:`~cbscope.attacks.suite` (what attacks run on) and :mod:`~cbscope.attacks.rows` (report rows).
"""

import importlib as _importlib
import pkgutil as _pkgutil
from typing import Any as _Any

from cbscope.attacks.base import MODES, AttackRun, model_mode
from cbscope.attacks.direct import direct_attack, generate_responses
from cbscope.attacks.finetune import (
    FinetuneAttackConfig,
    FinetuneCurve,
    attack_copy,
    finetune_attack,
)
from cbscope.attacks.generate import GenerationAttack, Requests, generation_attack
from cbscope.attacks.multiturn import (
    CHAT_FIRST_TURN,
    MULTITURN_ATTACKS,
    default_multiturn,
    multiturn_attack,
    with_history,
)
from cbscope.attacks.options import NoOptions, describe_options, options_from_dict
from cbscope.attacks.prefill import DEFAULT_PREFILL, prefill_attack, prefills_for
from cbscope.attacks.protocol import Attack, AttackContext, AttackOutcome, GenerationSettings
from cbscope.attacks.registry import (
    attack_names,
    default_attack_names,
    get_attack,
    register_attack,
    registered_attacks,
    unregister_attack,
)
from cbscope.attacks.repe import (
    RepeConfig,
    difference_of_means,
    mean_representations,
    refusal_compliance_sets,
    repe_attack,
    steering,
)
from cbscope.attacks.rows import AttackRow, FinetuneRow, attack_rows
from cbscope.attacks.soft_prompt import (
    SoftPromptConfig,
    SoftPromptResult,
    greedy_generate_embeds,
    optimise_soft_prompts,
    soft_prompt_attack,
    target_loss,
)
from cbscope.attacks.suite import EvalSuite, Item
from cbscope.attacks.template import (
    REQUEST_TEMPLATES,
    TemplateError,
    template_attack,
    wrap_requests,
)

for _module in _pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module.name}")

#: Attack names, in report order: every registered attack (see :func:`attack_names` for
#: attacks registered later).
ATTACK_NAMES: tuple[str, ...] = attack_names()

_ORGANISM_PROMPTS = (
    "organism_first_turns",
    "organism_multiturn_prompts",
    "organism_template_prompts",
)


def __getattr__(name: str) -> _Any:
    # the organism's prompt generators live in cbscope.organism.prompts; re-exported lazily, as
    # importing the organism package loads transformers
    if name in _ORGANISM_PROMPTS:
        from cbscope.organism import prompts

        return getattr(prompts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ATTACK_NAMES",
    "CHAT_FIRST_TURN",
    "DEFAULT_PREFILL",
    "MODES",
    "MULTITURN_ATTACKS",
    "REQUEST_TEMPLATES",
    "Attack",
    "AttackContext",
    "AttackOutcome",
    "AttackRow",
    "AttackRun",
    "EvalSuite",
    "FinetuneAttackConfig",
    "FinetuneCurve",
    "FinetuneRow",
    "GenerationAttack",
    "GenerationSettings",
    "Item",
    "NoOptions",
    "RepeConfig",
    "Requests",
    "SoftPromptConfig",
    "SoftPromptResult",
    "TemplateError",
    "attack_copy",
    "attack_names",
    "attack_rows",
    "default_attack_names",
    "default_multiturn",
    "describe_options",
    "difference_of_means",
    "direct_attack",
    "finetune_attack",
    "generate_responses",
    "generation_attack",
    "get_attack",
    "greedy_generate_embeds",
    "mean_representations",
    "model_mode",
    "multiturn_attack",
    "optimise_soft_prompts",
    "options_from_dict",
    "prefill_attack",
    "prefills_for",
    "refusal_compliance_sets",
    "register_attack",
    "registered_attacks",
    "repe_attack",
    "soft_prompt_attack",
    "steering",
    "target_loss",
    "template_attack",
    "unregister_attack",
    "with_history",
    "wrap_requests",
]
