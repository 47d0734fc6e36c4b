"""The evaluation's numbers did not move when it became a package with an attack registry.

``tests/data/eval_golden_organism.json`` holds an eval of the shipped organism and its shipped
breaker (every attack, small budgets, firing statistics) recorded with the code *before* the
refactor: every row (texts as hashes, capability rows as one digest) and every summary number.
The same eval now must give the same rows and numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).parent / "data" / "eval_golden_organism.json"
TEXT_FIELDS = ("prompt", "conversation", "prefill", "response", "expected")
DROPPED = (*TEXT_FIELDS, "reason", "target", "request", "first_turn", "template")


def _text_key(row: dict[str, Any]) -> str:
    text = json.dumps({k: row.get(k) for k in TEXT_FIELDS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def golden_form(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows as stored in the golden file: texts hashed, capability rows one digest."""
    capability = [
        [r["metric"], r["mode"], r["prompt"], r["response"], r["success"]]
        for r in rows
        if r["section"] == "capability"
    ]
    compact = [
        {"key": _text_key(r), **{k: v for k, v in r.items() if k not in DROPPED}}
        for r in rows
        if r["section"] != "capability"
    ]
    digest = hashlib.sha256(json.dumps(capability).encode()).hexdigest()
    return {"rows": compact, "capability_rows": len(capability), "capability_digest": digest}


def _close(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and not isinstance(a, bool):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def golden_config():
    from cbscope.attacks import FinetuneAttackConfig, SoftPromptConfig
    from cbscope.evaluate import EvalConfig

    return EvalConfig(
        limit=4,
        soft_prompt=SoftPromptConfig(n_tokens=4, steps=5),
        soft_prompt_limit=2,
        finetune=FinetuneAttackConfig(
            lrs=[1e-3, 3e-3], steps=2, eval_every=1, batch_size=2, n_examples=2, rank=2
        ),
        n_retain=8,
        n_algo=4,
        repe_reference=8,
    )


@pytest.mark.slow
def test_shipped_organism_eval_equals_the_pre_refactor_rows() -> None:
    import torch

    import cbscope
    from cbscope.evaluate import Report, evaluate_pair, summarise
    from cbscope.pair import load_pair

    golden = json.loads(GOLDEN.read_text())
    assets = Path(cbscope.__file__).parent / "assets"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = load_pair(assets / "organism", assets / "organism-breaker")
        report = evaluate_pair(pair, config=golden_config(), show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert list(report.attacks) == [
        "direct",
        "prefill",
        "template",
        "multiturn",
        "multiturn_prefill",
        "soft_prompt",
        "repe",
        "finetune",
    ]
    now = golden_form(report.rows)
    assert now["capability_rows"] == golden["capability_rows"]
    assert now["capability_digest"] == golden["capability_digest"]
    _close(now["rows"], golden["rows"], "rows")
    for section, numbers in golden["summary"].items():
        _close(getattr(report, section), numbers, section)
    # and the summary is a function of the rows alone
    again = summarise(report.rows, golden["finetune_primary_lr"])
    for section, numbers in golden["summary"].items():
        _close(again[section], numbers, f"summarise.{section}")
    assert Report.from_rows(report.rows, report.meta).attacks == report.attacks
