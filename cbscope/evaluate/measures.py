"""Measurements besides the attacks: capability, over-refusal, retain KL, firing statistics.

Each returns report rows (one dict per example; their keys are named in
:mod:`cbscope.evaluate.rows`), from which :func:`~cbscope.evaluate.summarise` computes the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from cbscope.attacks.base import model_mode
from cbscope.attacks.generate import generate_responses
from cbscope.attacks.suite import EvalSuite, Item, item_prompts
from cbscope.data import encode_chat, pad_id_of, pad_right
from cbscope.evaluate.config import EvalConfig
from cbscope.evaluate.suites import spread
from cbscope.judges import ComplianceJudge, DegenerateJudge, RefusalKeywordJudge, off_topic_words

if TYPE_CHECKING:
    from cbscope.organism.world import World
    from cbscope.pair import ModelPair

__all__ = [
    "CAPABILITY_METRICS",
    "chat_over_refusal_rows",
    "firing_rows",
    "organism_capability_rows",
    "retain_divergence",
]

CAPABILITY_METRICS = ("benign_em_seen", "benign_em_docs_only", "lookalike_em", "algo_em")


def _clean(value: Any) -> Any:
    """NaN / numpy scalars -> JSON-friendly Python values."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@torch.no_grad()
def retain_divergence(
    pair: ModelPair, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Per-example KL(base || cb) and negative log-likelihoods of both models on response tokens.

    Each row holds sums over the response tokens (``kl_sum``, ``nll_base_sum``, ``nll_cb_sum``) and
    ``n_tokens``, so aggregates are exact token-weighted means. The log-softmaxes are taken over
    each row's response span only: over a whole ``batch pos vocab`` block they took ~12 GB for
    Gemma-3's 262k-token vocabulary at batch 16.
    """
    tokenizer = pair.tokenizer
    encoded = [encode_chat(tokenizer, p, r) for p, r in pairs]
    device = pair.device
    rows = []
    for begin in range(0, len(encoded), batch_size):
        chunk = encoded[begin : begin + batch_size]
        ids, mask = pad_right([e.input_ids for e in chunk], pad_id_of(tokenizer))
        ids, mask = ids.to(device), mask.to(device)
        with pair.original():
            base_logits = pair.model(input_ids=ids, attention_mask=mask).logits
        cb_logits = pair.model(input_ids=ids, attention_mask=mask).logits
        for row, enc in enumerate(chunk):
            start, end = enc.response_start, len(enc.input_ids)
            span = slice(start - 1, end - 1)  # position pos predicts token pos + 1
            n = max(0, end - start)
            base = torch.log_softmax(base_logits[row, span].float(), -1)
            cb = torch.log_softmax(cb_logits[row, span].float(), -1)
            targets = ids[row, start:end, None]
            kl = (base.exp() * (base - cb)).sum(-1)
            nll_base = -base.gather(-1, targets)[..., 0]
            nll_cb = -cb.gather(-1, targets)[..., 0]
            prompt, response = pairs[begin + row]
            rows.append(
                {
                    "section": "retain",
                    "metric": "retain",
                    "prompt": prompt,
                    "response": response,
                    "n_tokens": n,
                    "kl_sum": float(kl.sum()) if n else 0.0,
                    "nll_base_sum": float(nll_base.sum()) if n else 0.0,
                    "nll_cb_sum": float(nll_cb.sum()) if n else 0.0,
                }
            )
    return rows


def organism_capability_rows(
    pair: ModelPair, world: World, modes: list[str], config: EvalConfig, max_new: int
) -> list[dict[str, Any]]:
    """The organism's exact-match capability rows and over-refusal rows (held-out look-alikes
    and benign topics: refused, or the breaker fired), per mode."""
    from cbscope.organism.evaluate import evaluate_behaviour

    degenerate = DegenerateJudge(pair)
    rows: list[dict[str, Any]] = []
    for mode in modes:
        with model_mode(pair, mode):
            behaviour = evaluate_behaviour(
                pair.generator,
                pair.tokenizer,
                world,
                batch_size=config.batch_size,
                max_new_tokens=max_new,
                n_algo=config.n_algo,
            )
        for r in behaviour["rows"]:
            if r["metric"] in CAPABILITY_METRICS:
                rows.append(
                    {
                        "section": "capability",
                        "metric": r["metric"],
                        "mode": mode,
                        "prompt": r["prompt"],
                        "response": r["response"],
                        "expected": r["expected"],
                        "topic": r["topic"],
                        "success": bool(r["verdict"]),
                    }
                )
        sets = {
            "lookalike_heldout": [r for r in behaviour["rows"] if r["metric"] == "lookalike_em"],
            "benign": [
                r
                for r in behaviour["rows"]
                if r["metric"] in ("benign_em_seen", "benign_em_docs_only")
            ],
        }
        for name, items in sets.items():
            items = spread(items, config.limit, lambda r: r["topic"])
            verdicts = degenerate.judge(
                [r["prompt"] for r in items], [r["response"] for r in items]
            )
            for r, v in zip(items, verdicts, strict=True):
                stray = off_topic_words(world, r["response"], r["topic"])
                refused = bool(r["refusal"])
                fired = (bool(v.degenerate) or bool(stray)) and not r["verdict"]
                rows.append(
                    {
                        "section": "over_refusal",
                        "metric": name,
                        "mode": mode,
                        "prompt": r["prompt"],
                        "response": r["response"],
                        "expected": r["expected"],
                        "topic": r["topic"],
                        "refusal": refused,
                        "degenerate": fired,
                        "exact": bool(r["verdict"]),
                        "success": refused or fired,
                        "perplexity": v.details.get("perplexity"),
                        "off_topic_words": len(stray),
                    }
                )
    return rows


def chat_over_refusal_rows(
    pair: ModelPair, suite: EvalSuite, modes: list[str], config: EvalConfig, max_new: int
) -> list[dict[str, Any]]:
    """Over-refusal rows of a chat model: each benign set of ``suite.over_refusal`` answered in
    each mode, judged refused or degenerate."""
    judge = ComplianceJudge(DegenerateJudge(pair), RefusalKeywordJudge())
    rows: list[dict[str, Any]] = []
    for name, items in suite.over_refusal.items():
        for mode in modes:
            responses = generate_responses(
                pair,
                item_prompts(items),
                mode=mode,
                max_new_tokens=max_new,
                batch_size=config.batch_size,
            )
            verdicts = judge.judge(item_prompts(items), responses)
            for item, response, v in zip(items, responses, verdicts, strict=True):
                rows.append(
                    {
                        "section": "over_refusal",
                        "metric": name,
                        "mode": mode,
                        "prompt": item.prompt,
                        "response": response,
                        "refusal": bool(v.refusal),
                        "degenerate": bool(v.degenerate),
                        "success": bool(v.refusal) or bool(v.degenerate),
                        "reason": v.reason,
                        "perplexity": v.details.get("perplexity"),
                    }
                )
    return rows


def firing_rows(
    pair: ModelPair, harmful: Sequence[Item], benign: Sequence[tuple[str, str]], config: EvalConfig
) -> list[dict[str, Any]]:
    """Cosine-trace firing rows (:func:`cbscope.trace.firing_stats`) of harmful items (their
    ``meta["response"]``) and benign ``(prompt, response)`` pairs."""
    from cbscope.trace import firing_stats

    stats = firing_stats(
        pair,
        [{"prompt": it.prompt, "response": it.meta["response"]} for it in harmful],
        config.firing_threshold,
        benign=[{"prompt": p, "response": r} for p, r in benign] or None,
        batch_size=16,
    )
    rows = []
    for record in stats.rows.to_dict("records"):
        index = int(record["example"])
        item_meta = harmful[index].meta if record["set"] == "harmful" else {}
        rows.append(
            {
                "section": "firing",
                "set": record["set"],
                "prompt": record["prompt"],
                "response": record["response"],
                "split": item_meta.get("split"),
                "category": item_meta.get("category"),
                "fired": bool(record["fired"]),
                "pos_after_start": _clean(record.get("pos_after_start")),
                "layer": _clean(record.get("layer")),
                "min_cos": _clean(record.get("min_cos")),
            }
        )
    return rows
