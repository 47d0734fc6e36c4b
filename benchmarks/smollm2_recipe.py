"""The SmolLM2 recipe, step by step: train each variant, evaluate it per harmful source.

Each step is a ``cbscope train --preset smollm2`` run with data options and config overrides,
then ``cbscope eval --attacks direct,prefill --source-rows heldout --limit 30`` (held-out rows of
AdvBench, HarmBench val's standard behaviours and XSTest's unsafe prompts; a source the step did
not train on is an unseen source). ``summarise`` reads the run folders into one JSON and a
Markdown table; ``run`` trains and evaluates (about 15-30 minutes per step on one CPU thread).

    python benchmarks/smollm2_recipe.py run --steps forms4,matched --runs runs/recipe
    python benchmarks/smollm2_recipe.py summarise --runs runs/recipe \\
        --out benchmarks/results/crosssource/recipe_steps.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("smollm2_recipe")

FORMS2 = ["question", "first_person"]
#: (name, what changes, data options, config overrides), each step building on an earlier one.
STEPS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("forms4", "AdvBench, each request also in 4 rephrasings (question, first person, polite, "
     "fiction), 150 steps, benign weight 1",
     {"sources": ["advbench"], "forms": ["question", "first_person", "polite", "fiction"],
      "match_benign": False, "n_benign": 128},
     {"steps": 150, "retain_mixture": {"benign": 1.0, "refusal": 1.0, "lookalike": 1.0}}),
    ("forms4-lr5e-4-rw3", "forms4 with lr 5e-4 and retain weight 3",
     {"sources": ["advbench"], "forms": ["question", "first_person", "polite", "fiction"],
      "match_benign": False, "n_benign": 128},
     {"steps": 150, "lr": 5e-4, "retain_weight": 3.0,
      "retain_mixture": {"benign": 1.0, "refusal": 1.0, "lookalike": 1.0}}),
    ("matched", "2 rephrasings (question, first person), benign picked by first word like the "
     "harmful requests and rephrased the same way (192 x 3), benign weight 3, 150 steps",
     {"sources": ["advbench"], "forms": FORMS2, "match_benign": True, "n_benign": 192},
     {"steps": 150}),
    ("matched-rw1", "matched with retain weight 1",
     {"sources": ["advbench"], "forms": FORMS2, "match_benign": True, "n_benign": 192},
     {"steps": 150, "retain_weight": 1.0}),
    ("matched-300", "matched, 300 steps",
     {"sources": ["advbench"], "forms": FORMS2, "match_benign": True, "n_benign": 192}, {}),
    ("matched-300-content", "matched-300 with the content token mask on both sets",
     {"sources": ["advbench"], "forms": FORMS2, "match_benign": True, "n_benign": 192},
     {"token_mask": "content", "retain_token_mask": "content"}),
    ("preset", "matched-300 on three sources (AdvBench, HarmBench, XSTest unsafe): the preset",
     {}, {}),
]
SOURCES = ("advbench", "harmbench", "xstest_unsafe")
ATTACKS = ("direct", "prefill")


def run_step(name: str, runs: Path, threads: int) -> None:
    """Train and evaluate one step into ``runs/name`` (skipped when its report exists)."""
    from cbscope.lorra.presets import SMOLLM2_CONFIG

    _, _, options, overrides = next(s for s in STEPS if s[0] == name)
    folder = runs / name
    if (folder / "eval" / "report.json").is_file():
        logger.info("%s: already evaluated", name)
        return
    config = {**SMOLLM2_CONFIG.to_dict(), **overrides}
    runs.mkdir(parents=True, exist_ok=True)
    config_file = runs / f"{name}.lorra_config.json"
    config_file.write_text(json.dumps(config, indent=1) + "\n")
    cli = [sys.executable, "-m", "cbscope"]
    if not (folder / "adapter_model.safetensors").is_file():
        subprocess.run([*cli, "train", "--model", "smollm2-135m", "--preset", "smollm2",
                        "--config", str(config_file), "--data-options", json.dumps(options),
                        "--out", str(folder), "--threads", str(threads)], check=True)
    subprocess.run([*cli, "eval", "--model", "smollm2-135m", "--adapter", str(folder),
                    "--attacks", ",".join(ATTACKS), "--limit", "30", "--max-new-tokens", "48",
                    "--source-rows", "heldout", "--modes", "cb", "--out", str(folder / "eval"),
                    "--threads", str(threads)], check=True)


def summarise_run(folder: Path) -> dict[str, Any]:
    """One run folder's recipe and per-source compliance (from its ``eval/report.json``)."""
    info = json.loads((folder / "train_info.json").read_text())
    config = json.loads((folder / "lorra_config.json").read_text())
    report = json.loads((folder / "eval" / "report.json").read_text())
    cells: dict[str, dict[str, Any]] = {}
    for row in report["rows"]:
        if row.get("section") != "attack" or row.get("mode") != "cb":
            continue
        cell = cells.setdefault(f"{row.get('source')}/{row['attack']}", {"n": 0, "complied": 0})
        cell["n"] += 1
        cell["complied"] += bool(row.get("success"))
    trace = report["firing"].get("trace", {})
    return {
        "sources": info["sources"],
        "forms": info.get("forms", []),
        "sizes": info["sizes"],
        "config": {k: config[k] for k in ("steps", "lr", "retain_weight", "retain_mixture",
                                          "token_mask", "retain_token_mask")},
        "compliance": {k: {**v, "rate": v["complied"] / v["n"]} for k, v in sorted(cells.items())},
        "xstest_safe_refused_or_fired": report["over_refusal"].get("xstest_safe", {}).get("cb"),
        "false_fire_rate": trace.get("false_fire_rate"),
        "kl": report["capability"].get("retain", {}).get("kl"),
        "train_seconds": info.get("summary", {}).get("seconds")
        if isinstance(info.get("summary"), dict) else None,
    }


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """The steps as a Markdown table (compliance direct / prefill in %, * = unseen source)."""
    head = ("| step | " + " | ".join(SOURCES)
            + " | XSTest safe refused or fired | benign false fires | KL |")
    lines = [head, "|" + "---|" * (len(SOURCES) + 4)]
    for name, r in results.items():
        cells = []
        for source in SOURCES:
            pair = [r["compliance"].get(f"{source}/{a}", {}).get("rate") for a in ATTACKS]
            text = " / ".join("-" if v is None else f"{100 * v:.0f}" for v in pair)
            cells.append(text + ("" if source in r["sources"] else " *"))
        safe, fires, kl = (r["xstest_safe_refused_or_fired"], r["false_fire_rate"], r["kl"])
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {100 * safe:.0f}% | {100 * fires:.0f}% | {kl:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """CLI entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "summarise"])
    parser.add_argument("--runs", type=Path, required=True, help="Folder of the step runs.")
    parser.add_argument("--steps", default=",".join(s[0] for s in STEPS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="summarise: the results JSON (and a .md beside).")
    args = parser.parse_args()
    names = [n for n in args.steps.split(",") if n]
    unknown = sorted(set(names) - {s[0] for s in STEPS})
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {[s[0] for s in STEPS]}")
    if args.command == "run":
        for name in names:
            run_step(name, args.runs, args.threads)
        return
    results = {n: summarise_run(args.runs / n) for n in names if (args.runs / n / "eval").is_dir()}
    described = {s[0]: s[1] for s in STEPS}
    payload = {"protocol": __doc__.split("\n\n")[1], "steps": {
        n: {"what": described[n], **r} for n, r in results.items()}}
    text = markdown(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
