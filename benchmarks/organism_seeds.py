"""Seed spread of the organism recipe: train the ``organism`` preset once per seed, evaluate each.

One breaker's numbers hide how much the recipe itself varies: on the organism, a different seed
(or a different thread count, which changes float summation order) moves the benign metrics by
several points. This script trains the preset (with optional config overrides) for each seed,
runs :func:`cbscope.organism.evaluate_behaviour`, and prints per-seed rows plus the mean, min and
max of every metric, and the held-out category's rates.

Usage::

    python benchmarks/organism_seeds.py --seeds 1,2,3,4 --out seeds_default.json
    python benchmarks/organism_seeds.py --seeds 1,2,3,4 --set response_only_fraction=0.5 \
        --set steps=150 --data noise_words=4 --adapters runs/seeds --out seeds_variant.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

METRICS = (
    "prefill_asr",
    "template_asr",
    "heldout_prefill_asr",
    "heldout_template_asr",
    "benign_em_seen",
    "benign_em_docs_only",
    "lookalike_em",
    "over_refusal",
)


def _override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE (JSON value), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run_seed(
    seed: int,
    overrides: dict[str, object],
    data_options: dict[str, object] | None = None,
    adapter_dir: Path | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, object]:
    """Train the organism preset with ``seed``, config ``overrides`` and ``data_options`` (keyword
    arguments of :func:`cbscope.lorra.presets.organism_data`); return its behaviour row. The
    run (adapter, config, metrics) is written to ``adapter_dir`` when given; an existing run
    there is replaced only with ``overwrite``."""
    from cbscope.organism import World, evaluate_behaviour
    from cbscope.run import RunConfig, Runner

    run = RunConfig(preset="organism", out=adapter_dir, data_options=dict(data_options or {}),
                    lorra_overrides={**overrides, "seed": seed}, overwrite=overwrite,
                    progress=False)
    started = time.perf_counter()
    result = Runner(run).run()  # a typo in an override or a data option is a named error
    pair = result.pair
    world = World.from_json(Path(pair.resolved.path) / "world.json")
    behaviour = evaluate_behaviour(pair.generator, pair.tokenizer, world)
    held = result.info["holdout_category"]
    row: dict[str, object] = {m: 100 * behaviour[m] for m in METRICS if m in behaviour}
    row["heldout_prefill_asr"] = 100 * behaviour["by_category"][held]["prefill_asr"]
    row["heldout_template_asr"] = 100 * behaviour["by_category"][held]["template_asr"]
    row["failed_benign_topics"] = sorted(
        {
            r["topic"]
            for r in behaviour["rows"]
            if r["metric"] in ("benign_em_docs_only", "lookalike_em") and not r["verdict"]
        }
    )
    row.update(seed=seed, seconds=round(time.perf_counter() - started, 1),
               train_seconds=round(result.seconds, 1))
    return row


def summarise(rows: list[dict[str, object]]) -> dict[str, dict[str, float]]:
    """Mean, min and max of every metric over the rows."""
    summary = {}
    for metric in METRICS:
        values = [float(r[metric]) for r in rows]  # type: ignore[arg-type]
        summary[metric] = {
            "mean": round(statistics.fmean(values), 1),
            "min": round(min(values), 1),
            "max": round(max(values), 1),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3,4", help="Comma-separated seeds.")
    parser.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                        help="Config override KEY=VALUE (VALUE parsed as JSON); repeatable.")
    parser.add_argument("--data", dest="data_options", type=_override, action="append", default=[],
                        help="organism_data option KEY=VALUE, e.g. noise_words=4; repeatable.")
    parser.add_argument("--adapters", type=Path, default=None,
                        help="Keep each seed's adapter in ADAPTERS/seed-N.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace runs already in ADAPTERS/seed-N.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="Write rows and summary as JSON.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = dict(args.overrides)
    data_options = dict(args.data_options)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = []
    header = f"{'seed':>4}" + "".join(f"{m[:14]:>15}" for m in METRICS)
    print(f"overrides: {overrides or 'none'}; data options: {data_options or 'none'}\n{header}")
    for seed in seeds:
        adapter_dir = args.adapters / f"seed-{seed}" if args.adapters is not None else None
        row = run_seed(seed, overrides, data_options, adapter_dir, overwrite=args.overwrite)
        rows.append(row)
        print(f"{seed:>4}" + "".join(f"{float(row[m]):>15.1f}" for m in METRICS)  # type: ignore[arg-type]
              + f"   fails: {', '.join(row['failed_benign_topics']) or '-'}", flush=True)
    summary = summarise(rows)
    for stat in ("mean", "min", "max"):
        print(f"{stat:>4}" + "".join(f"{summary[m][stat]:>15.1f}" for m in METRICS))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"overrides": overrides, "data_options": data_options,
                                        "threads": args.threads,
                                        "rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
