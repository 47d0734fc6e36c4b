"""The evaluation suite of a real chat model: harmful prompts per source, XSTest, Alpaca.

AdvBench-style harmful sources (:mod:`cbscope.sources`; each row's ``target`` is the prefill and
the soft-prompt target), :data:`~cbscope.attacks.REQUEST_TEMPLATES`, the compliance judge
(fluent, non-degenerate, non-refusal), the multi-turn attacks after
:data:`~cbscope.attacks.CHAT_FIRST_TURN`; capability = KL / perplexity of the CB model on the base
model's answers to harmless instructions; over-refusal = XSTest safe prompts. Data come from
``../shared/data`` (or ``$CBSCOPE_DATA``) when present.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbscope.attacks.multiturn import default_multiturn
from cbscope.attacks.prefill import DEFAULT_PREFILL
from cbscope.attacks.suite import EvalSuite, Item
from cbscope.attacks.template import REQUEST_TEMPLATES, wrap_requests
from cbscope.errors import MissingFileError
from cbscope.evaluate.config import CHAT_SOFT_PROMPT_LIMIT, EvalConfig
from cbscope.evaluate.suites import (
    BUILTIN_HARMLESS,
    BUILTIN_LOOKALIKES,
    CHAT_REFUSAL,
    adapter_info,
    spread,
)
from cbscope.judges import ComplianceJudge, DegenerateJudge, RefusalKeywordJudge

if TYPE_CHECKING:
    from cbscope.pair import ModelPair

logger = logging.getLogger(__name__)

__all__ = ["chat_suite"]


def _harmless_prompts(data: Path | None, n: int) -> tuple[list[str], str]:
    alpaca = data / "alpaca_harmless" / "harmless_train.json" if data else None
    if alpaca is not None and alpaca.is_file():
        rows = json.loads(alpaca.read_text(encoding="utf-8"))
        texts = [r["instruction"] for r in rows if isinstance(r, dict) and r.get("instruction")]
        # the trainer uses every len//160-th instruction from the start; take others (offset 1)
        step = max(1, len(texts) // max(1, n))
        return texts[1::step][:n], str(alpaca)
    return list(BUILTIN_HARMLESS)[:n], "builtin"


def _eval_source_specs(config: EvalConfig, harmful_path: str | os.PathLike[str] | None) -> list[Any]:
    """The harmful sources of a chat evaluation: ``config.sources``, else ``harmful_path`` (a
    user source named ``harmful``), else every built-in source whose file is in the data folder.

    Raises:
        MissingFileError: No source given and none of the built-ins is available.
    """
    from cbscope.sources import BUILTIN_SOURCES, SourceSpec, data_dir, parse_sources

    if config.sources:
        return parse_sources(config.sources)
    if harmful_path:
        return [SourceSpec("harmful", str(harmful_path), description=f"user file {harmful_path}")]
    root = data_dir()
    found = [s for s in BUILTIN_SOURCES.values() if root is not None and (root / s.path).is_file()]
    if not found:
        raise MissingFileError(
            "no harmful prompts: none of the built-in sources "
            f"({', '.join(BUILTIN_SOURCES)}) is in the data folder (../shared/data or "
            "$CBSCOPE_DATA); give --sources NAME=PATH or --harmful PATH"
        )
    return found


def _legacy_heldout(info: dict[str, Any], source: Any) -> set[str] | None:
    """Prompt keys an adapter made before sources were recorded held out of AdvBench."""
    from cbscope.sources import prompt_key

    if info.get("data_sources") or not info.get("heldout_prompts"):
        return None
    if source.name != "advbench" and source.path.name != "harmful_behaviors.csv":
        return None
    return {prompt_key(p) for p in info["heldout_prompts"]}


def _source_items(
    source: Any, info: dict[str, Any], config: EvalConfig
) -> tuple[list[Item], list[Any], dict[str, Any]]:
    """A source's evaluated items, its rows left for attack references, and its report entry."""
    from cbscope.sources import overlap, prompt_key, trained_keys

    keys = set().union(*trained_keys(info).values()) if trained_keys(info) else set()
    legacy = _legacy_heldout(info, source)
    rows = source.heldout() if config.source_rows == "heldout" else list(source.examples)
    candidates = [
        ex for ex in rows
        if prompt_key(ex.prompt) not in keys
        and (legacy is None or prompt_key(ex.prompt) in legacy)
    ]
    excluded = len(rows) - len(candidates)
    fallback = not candidates
    if fallback:
        candidates = source.heldout() or list(source.examples)
    limit = config.limit or len(candidates)
    chosen = candidates[:: max(1, len(candidates) // limit)][:limit]
    chosen_set = {id(ex) for ex in chosen}
    rest = [ex for ex in source.examples if id(ex) not in chosen_set]
    entry = overlap(info, source.name, [ex.prompt for ex in chosen])
    split = "trained" if entry["trained_on_source"] else "heldout"
    items = [
        Item(
            ex.prompt,
            {
                "source": source.name,
                "split": split,
                "prefill": str(ex.meta.get("prefill") or DEFAULT_PREFILL),
                "target": str(ex.meta.get("prefill") or DEFAULT_PREFILL),
            },
        )
        for ex in chosen
    ]
    entry.update(
        file=str(source.path),
        description=source.spec.description,
        n_rows=len(source.examples),
        rows=config.source_rows,
        all_rows_trained=fallback and bool(keys or legacy),
        excluded_trained=0 if fallback else excluded,
    )
    return items, rest, entry


def chat_suite(
    pair: ModelPair,
    config: EvalConfig,
    *,
    harmful_path: str | os.PathLike[str] | None = None,
    xstest_path: str | os.PathLike[str] | None = None,
    judge: Any | None = None,
) -> EvalSuite:
    """Evaluation data for a real chat model: harmful prompts per source (see
    :mod:`cbscope.sources`), XSTest safe look-alikes, Alpaca-harmless (see the module doc).

    Every source contributes up to ``config.limit`` prompts the breaker was not trained on
    (``train_info.json``'s ``data_sources``), each row carrying its ``source``; its ``split`` is
    ``trained`` when the breaker trained on other rows of the same source and ``heldout`` when
    it never saw the source. ``info["sources"]`` flags the overlaps.

    Raises:
        MissingFileError: If no source is given and none is in the shared data folder.
    """
    from cbscope.sources import (
        BENIGN_SOURCES,
        Source,
        SourceSpec,
        data_dir,
        load_source,
        overlap,
        prompt_key,
    )

    data = data_dir()
    info = adapter_info(pair)
    sources = [load_source(spec) for spec in _eval_source_specs(config, harmful_path)]
    harmful: list[Item] = []
    reference: list[Any] = []
    source_info: dict[str, Any] = {}
    for source in sources:
        items, rest, entry = _source_items(source, info, config)
        harmful += items
        reference += rest
        source_info[source.name] = entry
        if entry["trained_on_source"]:
            logger.warning(
                "source %s: the breaker was trained on this source (%s); its rows are not an "
                "unseen source", source.name,
                "every row was trained on" if entry["all_rows_trained"] else "held-out rows",
            )
    limit = config.limit
    by_source = spread(harmful, None, lambda it: it.meta["source"])
    n_requests = max(1, math.ceil(limit / len(REQUEST_TEMPLATES))) if limit else len(harmful)
    wrapped = spread(harmful, n_requests, lambda it: it.meta["source"])
    prompts, metas = wrap_requests(
        [it.prompt for it in wrapped], REQUEST_TEMPLATES, [dict(it.meta) for it in wrapped]
    )
    template = [Item(p, m) for p, m in zip(prompts, metas, strict=True)][:limit]
    soft_n = (
        config.soft_prompt_limit if config.soft_prompt_limit is not None else CHAT_SOFT_PROMPT_LIMIT
    )
    soft = spread(by_source, min(soft_n, len(harmful)), lambda it: it.meta["source"])
    harmless, harmless_source = _harmless_prompts(data, max(config.n_retain, config.repe_reference))
    safe_spec = (
        SourceSpec("xstest_safe", str(xstest_path), "prompt", where=(("label", "safe"),))
        if xstest_path else BENIGN_SOURCES["xstest_safe"]
    )
    try:
        safe: Source | None = load_source(safe_spec)
    except FileNotFoundError:
        safe = None
    if safe is not None:
        trained_safe = set((info.get("data_sources") or {}).get("xstest_safe", {}).get("prompt_keys") or [])
        rows = [ex.prompt for ex in safe.examples if prompt_key(ex.prompt) not in trained_safe]
        over = {"xstest_safe": [Item(p, {"source": "xstest"}) for p in rows][:limit]}
        source_info["xstest_safe"] = {
            **overlap(info, "xstest_safe", [it.prompt for it in over["xstest_safe"]]),
            "file": str(safe.path), "benign": True, "excluded_trained": len(safe.examples) - len(rows),
        }
    else:
        over = {"builtin_lookalikes": [Item(p, {"source": "builtin"}) for p in BUILTIN_LOOKALIKES]}
    if judge is None:
        judge = ComplianceJudge(DegenerateJudge(pair), RefusalKeywordJudge())
    n_train = config.finetune.n_examples
    refs = reference[: config.repe_reference]
    repe_positive: list[Any] = [ex.prompt for ex in refs]
    repe_negative: list[Any] = harmless[: config.repe_reference]
    if config.repe_direction == "refusal_compliance":
        repe_positive = [(ex.prompt, CHAT_REFUSAL) for ex in refs]
        repe_negative = [(ex.prompt, str(ex.meta.get("prefill") or DEFAULT_PREFILL)) for ex in refs]
    return EvalSuite(
        kind="chat",
        judge=judge,
        harmful=by_source,
        template=template,
        soft=soft,
        repe_positive=repe_positive,
        repe_negative=repe_negative,
        finetune_train=[
            (ex.prompt, str(ex.meta.get("prefill") or DEFAULT_PREFILL))
            for ex in reference[-n_train:]
        ],
        finetune_eval=by_source,
        retain=[(p, "") for p in harmless[: config.n_retain]],
        over_refusal=over,
        world=None,
        multiturn=default_multiturn(by_source),
        info={
            "sources": source_info,
            "harmful_files": {s.name: str(s.path) for s in sources},
            "harmless_source": harmless_source,
            "over_refusal_source": str(safe.path) if safe is not None else "builtin",
            "finetune_generate": True,
        },
    )
