"""The literature-strength attacks on the shipped organism breaker: ASR, curves, wall time.

Each stage is one ``cbscope eval`` on the organism with ``cbscope/assets/organism-breaker`` on
one torch thread (greedy except where an attack samples), timed, its report kept under
``benchmarks/results/attacks/<stage>/`` (``report.json``, git-ignored, and ``report.md``) and its key numbers gathered in
``benchmarks/results/attacks/summary.json``. Stages (each a few minutes on one core):

* ``timed``: ``--attacks gcg,embedding --limit 12`` with the default options (the issue's
  10-minute target on one thread);
* ``embedding_answer``: ``embedding`` on every soft-prompt request toward the whole answer
  (``--soft-prompt-target answer``), 200 steps, best of 10;
* ``ablate``: ``refusal_ablation,escalation,many_shot,direct,multiturn`` on every request;
* ``obfuscation``: the obfuscation attack at weights 0, 1, 4 and 16 (the trade-off curve);
* ``finetune``: ``finetune_worst`` with its default grid.

Usage::

    python benchmarks/bench_attacks.py                    # every stage
    python benchmarks/bench_attacks.py --stages timed,ablate
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "attacks"
BREAKER = ROOT / "cbscope" / "assets" / "organism-breaker"

STAGES: dict[str, list[str]] = {
    "timed": ["--attacks", "gcg,embedding", "--limit", "12"],
    "embedding_answer": [
        "--attacks", "embedding", "--soft-prompt-target", "answer",
        "--attack-options", json.dumps({"embedding": {"steps": 200}}),
    ],
    "ablate": ["--attacks", "direct,multiturn,escalation,many_shot,refusal_ablation"],
    "obfuscation": [
        "--attacks", "obfuscation", "--limit", "12",
        "--attack-options",
        json.dumps({"obfuscation": {"weights": [0, 1, 4, 16], "steps": 200, "best_of_n": 4,
                                  "probe_layer": 4}}),
    ],
    "finetune": ["--attacks", "finetune_worst", "--limit", "36"],
}


def _obfuscation_tradeoff(report: dict) -> list[dict]:
    """Per weight (and mode): ASR, the breaker's firing rate and the probe's recall under attack
    on the last solution's samples."""
    out = []
    rows = [r for r in report["rows"] if r.get("attack") == "obfuscation"]
    for mode in ("base", "cb"):
        weights = sorted({r["weight"] for r in rows if r["mode"] == mode})
        for weight in weights:
            mine = [r for r in rows if r["mode"] == mode and r["weight"] == weight]
            fired = [f for r in mine for f in r["samples"][-1].get("fired", []) if f is not None]
            flags = [
                f
                for r in mine
                for f, h in zip(
                    r["samples"][-1].get("probe_flag", []), r["samples"][-1]["harmful"],
                    strict=False,
                )
                if f is not None and h
            ]
            out.append(
                {
                    "mode": mode,
                    "weight": weight,
                    "asr": sum(r["success"] for r in mine) / len(mine),
                    "firing_rate": sum(fired) / len(fired) if fired else None,
                    "probe_recall": sum(flags) / len(flags) if flags else None,
                    "mean_target_cos": (
                        sum(r["samples"][-1]["cos"] for r in mine) / len(mine)
                        if all("cos" in r["samples"][-1] for r in mine)
                        else None
                    ),
                    "n": len(mine),
                }
            )
    return out


def run_stage(name: str) -> dict:
    out = RESULTS / name
    cmd = [
        sys.executable, "-m", "cbscope", "eval", "--model", "organism", "--adapter", str(BREAKER),
        "--threads", "1", "--out", str(out), "--no-progress", *STAGES[name],
    ]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    (out / "report.html").unlink()  # 5 MB of inline plotly: run the stage to see it
    report = json.loads((out / "report.json").read_text())
    entry: dict = {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1), "attacks": {}}
    for attack, summary in report["attacks"].items():
        entry["attacks"][attack] = {
            k: summary.get(k) for k in ("base", "cb", "n", "curves", "budget") if k in summary
        }
    if name == "obfuscation":
        entry["tradeoff"] = _obfuscation_tradeoff(report)
    if "finetune_worst" in report["meta"]:
        entry["finetune_worst"] = {
            mode: info["chosen"] for mode, info in report["meta"]["finetune_worst"].items()
        }
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    for name in [s.strip() for s in args.stages.split(",") if s.strip()]:
        summary[name] = run_stage(name)
        path.write_text(json.dumps(summary, indent=1) + "\n")
        print(name, summary[name]["seconds"], "s", flush=True)


if __name__ == "__main__":
    main()
