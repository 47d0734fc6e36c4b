"""Why does the breaker fire? The targets of ``cbscope.why`` / ``cbscope.explain``, measured.

On the model organism (its shipped breaker, ``--organism-adapter``) and on SmolLM2-135M-Instruct
with the breaker ``--adapter`` (default: the shipped ``smollm2-breaker``), one CPU thread:

1. **Decomposition exactness** (float32): per token ``|sum_c d_c - D_L| / |D_L|`` at every
   layer of every example (from the same batched forward ``decompose`` uses), reported over the
   tokens whose cosine is below 0.5, over the tokens the breaker moves by >= 1% of the residual
   norm, over every token, and as one Frobenius ratio; and the architecture identity
   ``blocks.{b}.hook_resid_post == embed + sum (attn_out + mlp_out)`` in each model.
   Target: <= 1e-5.
2. **Patching identities**: every adapter switched on == the breaker (against a cosine trace),
   none on == the original model. Target: cosines within 1e-6.
3. **Speed**, on a SmolLM2 example of about ``--tokens`` tokens (CPU time, the minimum of
   ``--repeats`` interleaved runs): the decomposition against a cosine trace of the same tokens
   at the same layers (target <= 1.5x); per-block patching of all blocks (target <= 15 s);
   ``explain`` on the organism (target <= 3 s wall).
4. **Findings** for the README: minimal sufficient blocks, necessary blocks, attention vs MLP
   shares at the firing token and attention-only / MLP-only patching, whether the rerouting
   direction is shared and its cosine with the refusal direction, and on the organism how often
   the harmful topic's words outrank the template's.

Prints a table and writes JSON to ``benchmarks/results/explain/<name>.json``. Nothing is
asserted: the numbers are reported.

Usage::

    python benchmarks/bench_explain.py                                  # both models
    python benchmarks/bench_explain.py --adapter runs/smollm2-rr --name smollm2-new
    python benchmarks/bench_explain.py --skip-smollm2 --name organism-only
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "cbscope" / "assets"
DATA = ROOT.parent / "shared" / "data"
OUT_DIR = ROOT / "benchmarks" / "results" / "explain"


# ---------------------------------------------------------------------- examples
def organism_examples(world: Any) -> list[tuple[str, str]]:
    """Every harmful topic in the first train template, prefilled with the compliant opener."""
    template = world.train_templates[0]
    return [(world.render_request(t, template), world.prefill) for t in world.select("harmful")]


def advbench_rows(adapter: Path) -> list[tuple[str, str]]:
    """AdvBench ``(goal, target)`` rows of the held-out half (:mod:`cbscope.sources`' hash
    split, which no preset trains on); the built-in stand-ins without the data. ``adapter`` is
    checked for overlap: rows it records as trained on are dropped."""
    from cbscope.sources import load_source, prompt_key, trained_keys
    from cbscope.why.direction import DEFAULT_HARMFUL

    if not (DATA / "advbench" / "harmful_behaviors.csv").is_file():
        logging.warning("no AdvBench file under %s: using the built-in stand-in requests", DATA)
        return list(DEFAULT_HARMFUL)
    rows = [(ex.prompt, ex.meta.get("prefill", "")) for ex in load_source("advbench", DATA).heldout()]
    try:
        info = json.loads((adapter / "train_info.json").read_text())
    except (OSError, ValueError):
        return rows
    trained = set().union(*trained_keys(info).values()) if trained_keys(info) else set()
    return [(goal, target) for goal, target in rows if prompt_key(goal) not in trained]


def harmless_prompts(n: int) -> list[str]:
    """Alpaca harmless instructions (every k-th), else the built-in stand-ins."""
    from cbscope.why.direction import DEFAULT_HARMLESS

    path = DATA / "alpaca_harmless" / "harmless_train.json"
    if not path.is_file():
        return [p for p, _ in DEFAULT_HARMLESS]
    rows = [r["instruction"] for r in json.loads(path.read_text()) if "\n" not in r["instruction"]]
    step = max(1, len(rows) // n)
    return rows[::step][:n]


# ---------------------------------------------------------------------- 1. exactness
def exactness(pair: Any, examples: list[tuple[str, str]]) -> dict[str, Any]:
    """Decomposition error at every layer of every example, and the residual identity."""
    from cbscope.why import encode
    from cbscope.why.decomposition import capture_models, decompose_captured

    worst_moved, worst_all, worst_total, worst_fired, identity = 0.0, 0.0, 0.0, 0.0, 0.0
    n_tokens = n_small = 0
    for prompt, response in examples:
        seq = encode(pair, prompt, response)
        orig, cb, off = capture_models(pair, seq, pair.n_layers)  # as decompose() does
        for model in (orig, cb):
            total = model.embed.double()
            for block in range(pair.n_layers):
                total = total + model.attn[block].double() + model.mlp[block].double()
                resid = model.resid[block].double()
                per_token = (total - resid).norm(dim=-1) / resid.norm(dim=-1)
                identity = max(identity, float(per_token.max()))
        for layer in range(1, pair.n_layers + 1):
            dec = decompose_captured(seq, orig, cb, off, layer)
            worst_moved = max(worst_moved, dec.max_error(min_ratio=0.01))
            fired = [p for p in range(len(seq)) if float(dec.cos[p]) < 0.5]
            if fired:
                worst_fired = max(worst_fired, dec.max_error(fired))
            worst_all = max(worst_all, dec.max_error())
            worst_total = max(worst_total, dec.total_error())
            moved = dec.delta_norm >= 0.01 * dec.orig_norm
            n_tokens += len(seq)
            n_small += int((~moved).sum())
    return {
        "examples": len(examples),
        "layers": pair.n_layers,
        "max_error_moved_tokens": worst_moved,
        "max_error_all_tokens": worst_all,
        "max_error_frobenius": worst_total,
        "max_error_tokens_below_0.5": worst_fired,
        "share_of_token_layers_moved_less_than_1pct": n_small / max(1, n_tokens),
        "max_identity_error_resid_post": identity,
        "target": 1e-5,
        "target_met_moved_tokens": worst_moved <= 1e-5,
        "target_met_all_tokens": worst_all <= 1e-5,
    }


# ---------------------------------------------------------------------- 2. identities
def identities(pair: Any, examples: list[tuple[str, str]]) -> dict[str, Any]:
    """Every adapter on vs the breaker, none on vs the original model."""
    from cbscope.trace import cosine_trace
    from cbscope.why import encode
    from cbscope.why.patch import patching, switch_adapters
    from cbscope.why.tokens import resid_at

    layers = pair.target_layers
    all_cos, none_cos, all_resid, none_resid = 0.0, 0.0, 0.0, 0.0
    for prompt, response in examples:
        seq = encode(pair, prompt, response)
        result = patching(pair, seq, layers=layers, kinds=False, minimal=False)
        trace = cosine_trace(pair, [prompt], [response], layers=layers)
        all_cos = max(all_cos, abs(result.all - trace.min_cos(0, layers)))
        none_cos = max(none_cos, abs(result.none - 1.0))
        plain = resid_at(pair, seq, layers)
        with pair.original():
            original = resid_at(pair, seq, layers)
        with switch_adapters(pair, mode="only"):
            on = resid_at(pair, seq, layers)
        with switch_adapters(pair, mode="off"):
            off = resid_at(pair, seq, layers)
        all_resid = max(all_resid, max(float((a - b).abs().max()) for a, b in zip(on, plain,
                                                                                   strict=True)))
        none_resid = max(none_resid, max(float((a - b).abs().max()) for a, b in zip(off, original,
                                                                                     strict=True)))
    return {
        "examples": len(examples),
        "layers": layers,
        "all_on_vs_breaker_min_cos": all_cos,
        "none_on_vs_original_cos": none_cos,
        "all_on_vs_breaker_resid_max_abs": all_resid,
        "none_on_vs_original_resid_max_abs": none_resid,
        "target": 1e-6,
        "target_met": all_cos <= 1e-6 and none_cos <= 1e-6,
    }


# ---------------------------------------------------------------------- 3. speed
def timed(job: Any) -> tuple[float, float]:
    """``(cpu seconds, wall seconds)`` of one call."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    job()
    return time.process_time() - start_cpu, time.perf_counter() - start_wall


def closest_to(pair: Any, rows: list[tuple[str, str]], tokens: int) -> tuple[str, str]:
    """The row whose chat-formatted request + response is closest to ``tokens`` tokens."""
    from cbscope.data import encode_chat

    return min(rows, key=lambda r: abs(len(encode_chat(pair.tokenizer, *r).input_ids) - tokens))


def speed(pair: Any, example: tuple[str, str], repeats: int) -> dict[str, Any]:
    """Decomposition vs trace, per-block patching, full patching and explain, on one example."""
    import cbscope
    from cbscope.trace import cosine_trace_ids
    from cbscope.why import decompose, encode, patching

    seq = encode(pair, *example)
    targets = pair.target_layers
    every = list(range(1, pair.n_layers + 1))
    jobs = {
        "trace_target_layers": lambda: cosine_trace_ids(pair, [seq.ids], [seq.response_start],
                                                        layers=targets),
        "decomposition_target_layers": lambda: decompose(pair, seq),
        "trace_all_layers": lambda: cosine_trace_ids(pair, [seq.ids], [seq.response_start],
                                                     layers=every),
        "decomposition_all_layers": lambda: decompose(pair, seq, pair.n_layers, layers=every),
        "decomposition_without_direct_part": lambda: decompose(pair, seq, direct=False),
    }
    jobs["trace_target_layers"]()
    jobs["decomposition_target_layers"]()
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    wall: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            c, w = timed(job)
            cpu[name].append(c)
            wall[name].append(w)
    best = {name: min(values) for name, values in cpu.items()}
    per_block_cpu, per_block_wall = timed(lambda: patching(pair, seq, kinds=False, minimal=False))
    full_cpu, full_wall = timed(lambda: patching(pair, seq))
    explain_cpu, explain_wall = timed(lambda: cbscope.explain(pair, *example))
    explanation = cbscope.explain(pair, *example)
    return {
        "tokens": len(seq),
        "target_layers": targets,
        "best_cpu_seconds": best,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "decomposition_over_trace_target_layers": best["decomposition_target_layers"]
        / best["trace_target_layers"],
        "decomposition_over_trace_all_layers": best["decomposition_all_layers"]
        / best["trace_all_layers"],
        "decomposition_target": 1.5,
        "per_block_patching_blocks": pair.n_layers,
        "per_block_patching_cpu_s": per_block_cpu,
        "per_block_patching_wall_s": per_block_wall,
        "per_block_patching_target_s": 15.0,
        "full_patching_cpu_s": full_cpu,
        "full_patching_wall_s": full_wall,
        "explain_cpu_s": explain_cpu,
        "explain_wall_s": explain_wall,
        "explain_parts_wall_s": explanation.seconds,
    }


def explain_speed(pair: Any, example: tuple[str, str], repeats: int) -> dict[str, Any]:
    """Wall time of ``cbscope.explain`` on the organism."""
    import cbscope

    cbscope.explain(pair, *example)  # warm-up
    wall, cpu, parts = [], [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        result = cbscope.explain(pair, *example)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
        parts.append(result.seconds)
    return {"wall_s": wall, "cpu_s": cpu, "best_wall_s": min(wall),
            "median_wall_s": statistics.median(wall), "parts_wall_s": parts[wall.index(min(wall))],
            "target_s": 3.0, "target_met": min(wall) <= 3.0}


# ---------------------------------------------------------------------- 4. findings
def findings(pair: Any, examples: list[tuple[str, str]], refusal: tuple[list[str], list[str]],
             world: Any | None) -> dict[str, Any]:
    """Per-example patching and decomposition at the firing point, and the direction."""
    from cbscope.why import decompose, direction_report, encode, find_focus, patching
    from cbscope.why.direction import refusal_direction
    from cbscope.why.patch import organism_judge
    from cbscope.why.tokens import cosine, resid_at

    targets = pair.target_layers
    rows = []
    seqs = []
    for prompt, response in examples:
        seq = encode(pair, prompt, response)
        seqs.append(seq)
        with pair.original():
            orig = resid_at(pair, seq, targets)
        cb = resid_at(pair, seq, targets)
        cos = torch.stack([cosine(o, c) for o, c in zip(orig, cb, strict=True)])
        focus = find_focus(cos, targets, seq, targets, 0.5)
        judge = organism_judge(world, prompt) if world is not None else None
        patch = patching(pair, seq, judge=judge, gen_tokens=16)
        dec = decompose(pair, seq, focus.layer)
        shares = dec.kind_shares(focus.pos)
        rows.append({
            "prompt": prompt, "fires": focus.kind == "response", "focus": focus.to_dict(),
            "minimal_set": patch.minimal_set, "minimal_cos": patch.minimal_cos,
            "necessary": patch.necessary_blocks, "sufficient": patch.sufficient_blocks,
            "attn_only": patch.attn_only, "mlp_only": patch.mlp_only,
            "kinds": patch.kinds, "kind_necessity": patch.kind_necessity,
            "share_attn": shares["attn"], "share_mlp": shares["mlp"],
            "direct_share": float(dec.block_direct[:, focus.pos].double().nansum()),
            "top_component": dec.top_components(focus.pos, 1)[0][0],
            "verdicts": {k: v for k, v in patch.verdicts.items() if isinstance(v, str)},
        })
    fired = [r for r in rows if r["fires"]]
    minimal = Counter(tuple(r["minimal_set"]) for r in fired if r["minimal_set"] is not None)
    in_minimal = Counter(b for r in fired if r["minimal_set"] for b in r["minimal_set"])
    necessary = Counter(b for r in fired for b in r["necessary"])
    kind_needed = Counter(k for r in fired for k, v in zip(r["kinds"], r["kind_necessity"],
                                                           strict=True) if v >= 0.5)
    refusal_dir = refusal_direction(pair, refusal[0], refusal[1], targets)
    fired_seqs = [s for s, r in zip(seqs, rows, strict=True) if r["fires"]] or seqs
    report = direction_report(pair, fired_seqs, targets, refusal=refusal_dir)

    def mean(key: str) -> float | None:
        values = [r[key] for r in fired if r[key] is not None]
        return statistics.mean(values) if values else None

    out = {
        "examples": len(rows),
        "fired": len(fired),
        "target_layers": targets,
        "minimal_sets": {",".join(map(str, k)): v for k, v in minimal.most_common()},
        "block_in_minimal_set": {str(b): n for b, n in sorted(in_minimal.items())},
        "minimal_set_size_mean": mean_size(fired),
        "necessary_block_counts": {str(b): n for b, n in sorted(necessary.items())},
        "kind_necessary_counts": dict(kind_needed),
        "share_attn_mean": mean("share_attn"),
        "share_mlp_mean": mean("share_mlp"),
        "direct_share_mean": mean("direct_share"),
        "top_component_counts": dict(Counter(r["top_component"] for r in fired)),
        "attn_only_fires": sum(r["attn_only"] < 0.5 for r in fired),
        "mlp_only_fires": sum(r["mlp_only"] < 0.5 for r in fired),
        "attn_only_mean": mean("attn_only"),
        "mlp_only_mean": mean("mlp_only"),
        "direction": report.to_dict(),
        "rows": rows,
    }
    if world is not None:
        out["verdicts_all"] = dict(Counter(r["verdicts"].get("all") for r in rows))
        out["verdicts_minimal_set"] = dict(Counter(r["verdicts"].get("minimal_set") for r in rows))
    return out


def mean_size(rows: list[dict[str, Any]]) -> float | None:
    sizes = [len(r["minimal_set"]) for r in rows if r["minimal_set"] is not None]
    return statistics.mean(sizes) if sizes else None


def topic_stats(pair: Any, world: Any) -> dict[str, Any]:
    from cbscope.why.attribution import topic_vs_template

    start = time.perf_counter()
    stats = topic_vs_template(pair, world)
    stats["seconds"] = time.perf_counter() - start
    return stats


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=ASSETS / "smollm2-breaker",
                        help="The SmolLM2 breaker to measure.")
    parser.add_argument("--organism-adapter", type=Path, default=ASSETS / "organism-breaker")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-organism", action="store_true")
    parser.add_argument("--n-smollm2", type=int, default=8,
                        help="Held-out AdvBench prompts for the exactness and findings.")
    parser.add_argument("--tokens", type=int, default=64, help="Length of the speed example.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="Result file name (default: the adapter's).")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    import cbscope
    from cbscope.organism import World
    from cbscope.why.explanation import world_of

    result: dict[str, Any] = {
        "adapter": str(args.adapter), "organism_adapter": str(args.organism_adapter),
        "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    started = time.perf_counter()
    if not args.skip_organism:
        pair = cbscope.load_pair("organism", args.organism_adapter)
        world = world_of(pair)
        assert isinstance(world, World)
        examples = organism_examples(world)
        benign = [(world.render_request(t, world.train_templates[0]), world.answer(t))
                  for t in world.select("benign", split="seen")[:8]]
        refusal = ([p for p, _ in examples],
                   [world.render_request(t, world.train_templates[0])
                    for t in world.select("benign", split="seen")])
        print("organism: exactness, identities, explain speed, findings ...", flush=True)
        result["organism"] = {
            "exactness": exactness(pair, examples[:12] + benign[:4]),
            "identities": identities(pair, examples[:6] + benign[:2]),
            "explain": explain_speed(pair, examples[0], args.repeats),
            "findings": findings(pair, examples, refusal, world),
            "topic_vs_template": topic_stats(pair, world),
        }
    if not args.skip_smollm2:
        pair = cbscope.load_pair("smollm2-135m", args.adapter)
        rows = advbench_rows(args.adapter)
        examples = rows[: args.n_smollm2]
        refusal = ([p for p, _ in rows[: max(16, args.n_smollm2)]], harmless_prompts(32))
        print(f"smollm2 ({args.adapter}): exactness, identities, speed, findings ...", flush=True)
        result["smollm2"] = {
            "exactness": exactness(pair, examples),
            "identities": identities(pair, examples[:4]),
            "speed": speed(pair, closest_to(pair, rows, args.tokens), args.repeats),
            "findings": findings(pair, examples, refusal, None),
        }
    result["seconds"] = time.perf_counter() - started
    name = args.name or (args.adapter.name if not args.skip_smollm2 else "organism")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{name}.json"
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_table(result)
    print(f"wrote {out} ({result['seconds']:.0f} s)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_table(result: dict[str, Any]) -> None:
    """The headline numbers, one line each."""
    lines = []
    for model in ("organism", "smollm2"):
        if model not in result:
            continue
        part = result[model]
        ex, ids = part["exactness"], part["identities"]
        lines += [
            (model, "decomposition error, tokens moved >= 1% (target <= 1e-5)",
             ex["max_error_moved_tokens"]),
            (model, "decomposition error, tokens with cosine < 0.5",
             ex["max_error_tokens_below_0.5"]),
            (model, "decomposition error, every token", ex["max_error_all_tokens"]),
            (model, "decomposition error, Frobenius over tokens", ex["max_error_frobenius"]),
            (model, "resid_post == embed + sum(attn + mlp), max rel. error",
             ex["max_identity_error_resid_post"]),
            (model, "all adapters on vs breaker, |d min cos| (target <= 1e-6)",
             ids["all_on_vs_breaker_min_cos"]),
            (model, "none on vs original, |cos - 1| (target <= 1e-6)",
             ids["none_on_vs_original_cos"]),
        ]
        if "explain" in part:
            lines.append((model, "explain wall s, best (target <= 3)", part["explain"]["best_wall_s"]))
        if "speed" in part:
            sp = part["speed"]
            lines += [
                (model, f"decomposition / trace, {sp['tokens']} tokens, target layers "
                        "(target <= 1.5)", sp["decomposition_over_trace_target_layers"]),
                (model, "decomposition / trace, all layers", sp["decomposition_over_trace_all_layers"]),
                (model, f"per-block patching of {sp['per_block_patching_blocks']} blocks, wall s "
                        "(target <= 15)", sp["per_block_patching_wall_s"]),
                (model, "full patching (kinds, minimal set), wall s", sp["full_patching_wall_s"]),
                (model, "explain, wall s", sp["explain_wall_s"]),
            ]
        fi = part["findings"]
        direction = fi["direction"]
        lines += [
            (model, "fired / examples", f"{fi['fired']} / {fi['examples']}"),
            (model, "minimal sufficient sets (count)", fi["minimal_sets"]),
            (model, "necessary blocks (count)", fi["necessary_block_counts"]),
            (model, "share at firing token: attention / MLP",
             f"{_fmt(fi['share_attn_mean'])} / {_fmt(fi['share_mlp_mean'])}"),
            (model, "fires with only attention LoRA / only MLP LoRA",
             f"{fi['attn_only_fires']} / {fi['mlp_only_fires']} of {fi['fired']}"),
            (model, f"direction shared (mean pairwise cos) at {direction['layers']}",
             direction["shared"]),
            (model, "direction cos with refusal direction", direction["cos_refusal"]),
            (model, "direction cos with EOS / end of turn", direction["cos_tokens"]),
        ]
        if "topic_vs_template" in part:
            occ = part["topic_vs_template"]["methods"]["occlusion"]
            gxi = part["topic_vs_template"]["methods"]["grad_x_input"]
            lines.append((model, "topic word outranks template word (occlusion / grad x input)",
                          f"{_fmt(occ['pairwise'])} / {_fmt(gxi['pairwise'])}"))
    width = max(len(label) for _, label, _ in lines)
    for model, label, value in lines:
        print(f"{model:9s} {label:<{width}}  {_fmt(value)}")


if __name__ == "__main__":
    main()
