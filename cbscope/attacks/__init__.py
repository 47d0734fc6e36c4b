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
* :mod:`~cbscope.attacks.finetune`: LoRA fine-tuning of a merged copy on harmful examples.

Every attack but fine-tuning returns an :class:`AttackRun` (prompts, prefills, responses,
metadata) for a judge (:mod:`cbscope.judges`); :func:`cbscope.evaluate.evaluate_pair` runs them all
and writes the report.
"""

from cbscope.attacks.base import MODES, AttackRun, model_mode
from cbscope.attacks.direct import direct_attack, generate_responses
from cbscope.attacks.finetune import (
    FinetuneAttackConfig,
    FinetuneCurve,
    attack_copy,
    finetune_attack,
)
from cbscope.attacks.multiturn import (
    CHAT_FIRST_TURN,
    MULTITURN_ATTACKS,
    multiturn_attack,
    organism_multiturn_prompts,
    with_history,
)
from cbscope.attacks.prefill import DEFAULT_PREFILL, prefill_attack, prefills_for
from cbscope.attacks.repe import (
    RepeConfig,
    difference_of_means,
    mean_representations,
    refusal_compliance_sets,
    repe_attack,
    steering,
)
from cbscope.attacks.soft_prompt import (
    SoftPromptConfig,
    SoftPromptResult,
    greedy_generate_embeds,
    optimise_soft_prompts,
    soft_prompt_attack,
    target_loss,
)
from cbscope.attacks.template import (
    REQUEST_TEMPLATES,
    TemplateError,
    organism_template_prompts,
    template_attack,
    wrap_requests,
)

#: Attack names, in report order.
ATTACK_NAMES: tuple[str, ...] = (
    "direct",
    "prefill",
    "template",
    *MULTITURN_ATTACKS,
    "soft_prompt",
    "repe",
    "finetune",
)

__all__ = [
    "ATTACK_NAMES",
    "CHAT_FIRST_TURN",
    "DEFAULT_PREFILL",
    "MODES",
    "MULTITURN_ATTACKS",
    "REQUEST_TEMPLATES",
    "AttackRun",
    "FinetuneAttackConfig",
    "FinetuneCurve",
    "RepeConfig",
    "SoftPromptConfig",
    "SoftPromptResult",
    "TemplateError",
    "attack_copy",
    "difference_of_means",
    "direct_attack",
    "finetune_attack",
    "generate_responses",
    "greedy_generate_embeds",
    "mean_representations",
    "model_mode",
    "multiturn_attack",
    "optimise_soft_prompts",
    "organism_multiturn_prompts",
    "organism_template_prompts",
    "prefill_attack",
    "prefills_for",
    "refusal_compliance_sets",
    "repe_attack",
    "soft_prompt_attack",
    "steering",
    "target_loss",
    "template_attack",
    "with_history",
    "wrap_requests",
]
