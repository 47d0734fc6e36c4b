"""Speed of ``cbscope.cosine_trace`` against its floor and against plain full forwards.

A trace of ``--n`` prompts of about ``--tokens`` tokens over every layer is timed against, in the
same process and on the same padded batches:

- the *floor*: two forwards through the blocks (adapters off, adapters on) with
  ``pair.resid`` and no unembedding, i.e. the work a trace cannot avoid;
- two plain Hugging Face forwards with logits (adapters off and on).

Targets: ``trace / floor <= 1.1`` and ``trace / two_full < 1``. Each measurement is repeated
``--repeats`` times, interleaved, and the minimum is used. The ratios are computed on the
process's CPU time (``time.process_time``): with one thread that is the work done, and it is not
inflated when other jobs share the machine the way wall-clock time is (both are reported).

Usage::

    CBSCOPE_CACHE=/tmp/exp/cache python benchmarks/bench_trace.py            # smollm2-135m
    python benchmarks/bench_trace.py --model organism --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path("runs") / "bench_trace.json"
WORDS = (
    "the a river stone bake bread mountain quick slow green blue light heavy signal garden "
    "paper window market number yellow silver engine music coffee travel winter summer letter "
    "planet ocean forest simple method careful answer question history science"
).split()


def make_prompts(tokenizer, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` random-word prompts whose chat-formatted length is about ``tokens`` (+-10%)."""
    from cbscope.data import encode_chat

    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        target = rng.randint(int(tokens * 0.9), int(tokens * 1.1))
        words: list[str] = []
        while len(encode_chat(tokenizer, " ".join(words + ["x"])).input_ids) <= target:
            words.append(rng.choice(WORDS))
        prompts.append(" ".join(words))
    return prompts


def load(model: str, seed: int):
    """The model pair with a random (non-zero) LoRA adapter on attention and MLP projections."""
    from peft import LoraConfig

    from cbscope.pair import load_pair

    torch.manual_seed(seed)
    config = LoraConfig(
        r=16,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    return load_pair(model, lora_config=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' or 'organism'.")
    parser.add_argument("--n", type=int, default=32, help="Number of prompts.")
    parser.add_argument("--tokens", type=int, default=64, help="Approximate tokens per prompt.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from cbscope.data import encode_chat, pad_id_of, pad_right
    from cbscope.trace import cosine_trace

    pair = load(args.model, 0)
    layers = list(range(1, pair.n_layers + 1))
    prompts = make_prompts(pair.tokenizer, args.n, args.tokens)
    encoded = [encode_chat(pair.tokenizer, p).input_ids for p in prompts]
    lengths = [len(ids) for ids in encoded]
    # the same batches the trace forms (sorted by length, right padded)
    order = sorted(range(len(encoded)), key=lambda i: -lengths[i])
    batches = [
        pad_right([encoded[i] for i in order[s : s + args.batch_size]], pad_id_of(pair.tokenizer))
        for s in range(0, len(order), args.batch_size)
    ]

    def run_trace() -> None:
        cosine_trace(pair, prompts, layers=layers, batch_size=args.batch_size)

    @torch.no_grad()
    def run_floor() -> None:
        for ids, mask in batches:
            with pair.original():
                pair.resid(ids, mask, layers)
            pair.resid(ids, mask, layers)

    @torch.no_grad()
    def run_full() -> None:
        for ids, mask in batches:
            with pair.original():
                pair.model(input_ids=ids, attention_mask=mask)
            pair.model(input_ids=ids, attention_mask=mask)

    jobs = {"trace": run_trace, "floor": run_floor, "two_full_forwards": run_full}
    # warm up every path once on a small batch
    with torch.no_grad():
        ids, mask = batches[-1]
        pair.resid(ids[:2], mask[:2], layers)
        pair.model(input_ids=ids[:2], attention_mask=mask[:2])
    wall: dict[str, list[float]] = {name: [] for name in jobs}
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    for repeat in range(args.repeats):
        for name, job in jobs.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            job()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
        print(
            f"repeat {repeat + 1}: "
            + ", ".join(f"{k} cpu {cpu[k][-1]:.2f}s wall {wall[k][-1]:.2f}s" for k in jobs)
        )

    best = {name: min(values) for name, values in cpu.items()}
    best_wall = {name: min(values) for name, values in wall.items()}
    ratio_floor = best["trace"] / best["floor"]
    ratio_full = best["trace"] / best["two_full_forwards"]
    result = {
        "model": args.model,
        "n_layers": pair.n_layers,
        "n_prompts": args.n,
        "mean_tokens": statistics.mean(lengths),
        "max_tokens": max(lengths),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "best_cpu_seconds": best,
        "best_wall_seconds": best_wall,
        "trace_over_floor": ratio_floor,
        "trace_over_two_full_forwards": ratio_full,
        "wall_trace_over_floor": best_wall["trace"] / best_wall["floor"],
        "wall_trace_over_two_full_forwards": best_wall["trace"] / best_wall["two_full_forwards"],
        "floor_target_met": ratio_floor <= 1.1,
        "full_target_met": ratio_full < 1.0,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{args.model}: {args.n} prompts x ~{statistics.mean(lengths):.0f} tokens, all "
        f"{pair.n_layers} layers, batch {args.batch_size}, {args.threads} thread(s)"
    )
    print(f"CPU time: trace / floor (two truncated forwards)    = {ratio_floor:.3f}  (target <= 1.1)")
    print(f"CPU time: trace / two plain full forwards (logits) = {ratio_full:.3f}  (target < 1)")
    print(
        f"wall time (shared machine, noisy): {result['wall_trace_over_floor']:.3f} and "
        f"{result['wall_trace_over_two_full_forwards']:.3f}"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
