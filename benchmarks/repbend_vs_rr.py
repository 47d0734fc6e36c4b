"""RepBend against RR on the organism: held-out ASR, look-alike exact match, the embedding attack.

Trains the ``organism`` preset twice with the same seed, once as it is (RR) and once with
``loss="repbend"`` (the weights below), evaluates each with the organism's exact judges
(:func:`cbscope.organism.evaluate_behaviour`: prefill/template ASR, held-out category, benign and
look-alike exact match) and runs the soft-prompt (input-embedding) attack through ``cbscope
eval`` (one prompt per harmful topic). ``gcg`` is not on main yet (issue 17): its column is left
out, not guessed.

Usage (one thread, a few minutes)::

    python benchmarks/repbend_vs_rr.py --out benchmarks/results/repbend/organism.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPBEND = {"loss": "repbend", "retain_weight": 5.0, "repbend_unsafe": 0.05,
           "repbend_cohesion": 0.5, "repbend_kl": 1.0, "repbend_pull": 0.5, "lr": 1e-3}
VARIANTS = {"rr": {}, "repbend": REPBEND}


def soft_prompt_asr(adapter: Path, steps: int, threads: int) -> dict[str, float]:
    """``cbscope eval --attacks soft_prompt`` on the organism with ``adapter``: ASR of base and
    circuit-broken model (percent)."""
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, "-m", "cbscope", "eval", "--model", "organism", "--adapter",
               str(adapter), "--attacks", "soft_prompt", "--soft-prompt-steps", str(steps),
               "--threads", str(threads), "--out", folder, "--no-progress"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        report = json.loads((Path(folder) / "report.json").read_text())
    summary = report["attacks"]["soft_prompt"]
    return {f"soft_prompt_asr_{mode}": round(100 * summary[mode], 1)
            for mode in ("base", "cb") if summary.get(mode) is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--soft-prompt-steps", type=int, default=500)
    parser.add_argument("--runs", type=Path, default=Path("runs/repbend-vs-rr"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from cbscope.organism import World, evaluate_behaviour
    from cbscope.run import RunConfig, Runner

    rows = []
    for name, overrides in VARIANTS.items():
        out = args.runs / f"{name}-seed{args.seed}"
        started = time.perf_counter()
        result = Runner(RunConfig(preset="organism", out=out, overwrite=True, progress=False,
                                  lorra_overrides={**overrides, "seed": args.seed})).run()
        pair = result.pair
        world = World.from_json(Path(pair.resolved.path) / "world.json")
        behaviour = evaluate_behaviour(pair.generator, pair.tokenizer, world)
        held = result.info["holdout_category"]
        row = {"variant": name, "overrides": overrides, "seed": args.seed,
               "train_seconds": round(result.seconds, 1),
               "prefill_asr": round(100 * behaviour["prefill_asr"], 1),
               "template_asr": round(100 * behaviour["template_asr"], 1),
               "heldout_prefill_asr": round(100 * behaviour["by_category"][held]["prefill_asr"], 1),
               "heldout_template_asr": round(100 * behaviour["by_category"][held]["template_asr"], 1),
               "benign_em_seen": round(100 * behaviour["benign_em_seen"], 1),
               "lookalike_em": round(100 * behaviour["lookalike_em"], 1)}
        row.update(soft_prompt_asr(out, args.soft_prompt_steps, args.threads))
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": f"python benchmarks/repbend_vs_rr.py --seed {args.seed} --threads {args.threads} "
                   f"--soft-prompt-steps {args.soft_prompt_steps}",
        "gcg": "not measured: the gcg attack is not on main (issue 17)",
        "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
