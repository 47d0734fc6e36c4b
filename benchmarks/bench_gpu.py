"""GPU step time and peak memory: cbscope's LoRRA step against the official-style loop.

A random-initialised Llama of about 0.85B parameters (hidden 2048, 16 layers, intermediate 5632,
32 heads, 8 key-value heads, vocab 32000, untied head; config only, nothing downloaded) is
saved in bf16 and loaded through :func:`cbscope.lorra.trainer.prepare_pair` with the official
recipe's LoRA (r 16 on every attention and MLP projection below the top target layer). For each
setting (batch, length) every method runs ``warmup`` untimed and ``steps`` timed optimiser steps
on the same batch (random tokens, lengths in [3/4 L, L]):

* ``cbscope``: :func:`cbscope.lorra.trainer._train_step` (frozen + adapted forward through hook
  points, stopping after the top layer);
* ``cbscope_gc``: the same with gradient checkpointing on;
* ``official``: :func:`bench_train.official_step` (four forwards, all hidden states, full logits,
  model cut to ``max(target) + 1`` blocks as in the official script);
* ``floor``: :func:`bench_train.floor_step`.

``official`` and ``floor`` run peft's own LoRA forward (:func:`bench_train.peft_forward`), as
plain HF + peft would; cbscope runs its lean one.

Recorded per method: median and min seconds per step (``torch.cuda.synchronize`` around each
step) and the peak of ``torch.cuda.max_memory_allocated`` over its steps (reset before each
method; the model's weights are included). Correctness check: every cbscope step's loss is finite
in bf16. Writes one JSON.

Usage::

    python benchmarks/bench_gpu.py --out $OUT/bench_gpu.json           # on a GPU, ~2-4 minutes
    python benchmarks/bench_gpu.py --tiny --device cpu --out /tmp/x.json  # smoke test, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import floor_step, layer_index, make_rows, official_step, peft_forward  # noqa: E402

from cbscope.layers import default_target_layers  # noqa: E402
from cbscope.lorra import LorraConfig  # noqa: E402
from cbscope.lorra.data import collate  # noqa: E402
from cbscope.lorra.frozen import CB, RETAIN, FrozenCache, FrozenReps  # noqa: E402
from cbscope.lorra.trainer import StepSetup, _train_step, prepare_pair  # noqa: E402

logger = logging.getLogger("bench_gpu")

LLAMA_1B = {
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def make_random_llama(
    folder: Path, shape: dict[str, int], *, dtype: torch.dtype, device: str
) -> Path:
    """Save a random-initialised Llama (``shape``) and a small word-level tokenizer.

    The weights are initialised on ``device`` (fast on a GPU) and saved in ``dtype``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    vocab = {word: i for i, word in enumerate(specials + [f"w{i}" for i in range(200)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def run_setting(
    pair: Any,
    config: LorraConfig,
    batch_size: int,
    max_length: int,
    *,
    steps: int,
    warmup: int,
    methods: list[str],
) -> dict[str, Any]:
    """Time every method on one (batch, length) setting; returns seconds, memory and losses."""
    device = pair.device
    targets = config.resolved_target_layers(pair.n_layers)
    retain_layers = config.resolved_retain_layers(pair.n_layers)
    layers = sorted(set(targets) | set(retain_layers))
    t_idx, r_idx = layer_index(layers, targets), layer_index(layers, retain_layers)
    rows = make_rows(pair.model.config.vocab_size, batch_size, max_length)
    batch = collate(rows[:batch_size], rows[batch_size:], pad_id=0)
    batch = replace(
        batch,
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        cb_mask=batch.cb_mask.to(device),
        retain_mask=batch.retain_mask.to(device),
    )
    optimizer = torch.optim.AdamW(pair.lora_parameters(), lr=config.lr)
    base = pair.model.model
    full_layers = base.layers
    losses: list[float] = []

    def cbscope_step(step: int) -> None:
        row = _train_step(pair, config, batch, step, StepSetup(targets, retain_layers), optimizer)
        losses.append(float(row["loss"]))

    frozen_reps: list[FrozenReps] = []

    def cbscope_cached(step: int) -> None:
        """cbscope's step with the frozen representations from the cache (filled at the first
        call, a warm-up step: the timed steps are those of a run that has seen each example)."""
        if not frozen_reps:
            reps = FrozenReps(FrozenCache(), pair, targets, retain_layers)
            reps.fill([(ex, CB) for ex in rows[:batch_size]] + [(ex, RETAIN) for ex in rows[batch_size:]])
            frozen_reps.append(reps)
        frozen = frozen_reps[0].batch(rows[:batch_size], rows[batch_size:], batch.input_ids.shape[1])
        _train_step(pair, config, batch, step, StepSetup(targets, retain_layers), optimizer, frozen=frozen)

    def official(step: int) -> None:
        base.layers = full_layers[: max(targets) + 1]
        pair.model.config.num_hidden_layers = max(targets) + 1
        try:
            official_step(pair, config, batch, step, targets, optimizer)
        finally:
            base.layers = full_layers
            pair.model.config.num_hidden_layers = len(full_layers)

    table: dict[str, Callable[[int], None]] = {
        "cbscope": cbscope_step,
        "cbscope_gc": cbscope_step,
        "cbscope_cached": cbscope_cached,
        "official": official,
        "floor": lambda s: floor_step(pair, config, batch, s, layers, t_idx, r_idx, optimizer),
    }
    out: dict[str, Any] = {
        "batch": f"{batch_size} cb + {batch_size} retain",
        "max_length": max_length,
        "tokens": int(batch.attention_mask.sum()),
    }
    for name in methods:
        pair.set_gradient_checkpointing(name == "cbscope_gc")
        _reset_peak(device)
        times = []
        plain = name in ("official", "floor")
        try:
            for rep in range(warmup + steps):
                _sync(device)
                tick = time.perf_counter()
                with peft_forward(pair.model, pair.bridge) if plain else contextlib.nullcontext():
                    table[name](rep)
                _sync(device)
                if rep >= warmup:
                    times.append(time.perf_counter() - tick)
        except torch.cuda.OutOfMemoryError as err:  # report, keep the other methods
            out[name] = {"error": f"out of memory: {str(err)[:200]}"}
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        finally:
            pair.set_gradient_checkpointing(False)
        out[name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "peak_gib": _peak_gib(device),
        }
        logger.info("%s %s: %s", out["batch"], name, out[name])
    ok = [m for m in methods if "median_s" in out.get(m, {})]
    if "cbscope" in ok and "official" in ok:
        out["speedup_vs_official"] = out["official"]["median_s"] / out["cbscope"]["median_s"]
        if out["cbscope"]["peak_gib"] is not None:
            out["memory_ratio_vs_official"] = (
                out["cbscope"]["peak_gib"] / out["official"]["peak_gib"]
            )
    if "cbscope_cached" in ok and "official" in ok:
        out["cached_speedup_vs_official"] = out["official"]["median_s"] / out["cbscope_cached"]["median_s"]
    if "cbscope_cached" in ok and "floor" in ok:
        out["cached_ratio_to_floor"] = out["cbscope_cached"]["median_s"] / out["floor"]["median_s"]
    if frozen_reps:
        out["cache_bytes"] = frozen_reps[0].cache.nbytes
    out["cbscope_losses"] = losses
    out["cbscope_losses_finite"] = bool(losses) and all(math.isfinite(x) for x in losses)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--tiny", action="store_true", help="A 4-layer, 64-wide Llama: a smoke test."
    )
    parser.add_argument(
        "--settings",
        default="8x512,16x1024",
        help="Comma-separated BATCHxLENGTH (B circuit-breaker + B retain rows).",
    )
    parser.add_argument("--steps", type=int, default=8, help="Timed steps per method and setting.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--methods", default="cbscope,cbscope_gc,cbscope_cached,official,floor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="Where to save the random model."
    )
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (with --tiny) for a smoke test")
    shape = TINY if args.tiny else LLAMA_1B
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
        args.dtype
    ]

    started = time.perf_counter()
    folder = args.model_dir or Path(tempfile.mkdtemp()) / "random-llama"
    make_random_llama(folder, shape, dtype=dtype, device=str(device))
    made = time.perf_counter() - started
    targets = default_target_layers(shape["num_hidden_layers"])
    config = LorraConfig(target_layers=targets, dtype=args.dtype, lora_dropout=0.05, steps=150)
    pair = prepare_pair(str(folder), config, device=device)
    loaded = time.perf_counter() - started - made
    n_params = sum(p.numel() for n, p in pair.model.named_parameters() if "lora_" not in n)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "model": {**shape, "parameters": n_params, "random_init": True},
        "target_layers": targets,
        "lora_parameters": sum(p.numel() for p in pair.lora_parameters()),
        "lora_dtype": str(pair.lora_parameters()[0].dtype),
        "steps": args.steps,
        "warmup": args.warmup,
        "seconds_make_model": made,
        "seconds_load_pair": loaded,
        "settings": [],
    }
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for setting in args.settings.split(","):
        batch_size, max_length = (int(x) for x in setting.lower().split("x"))
        if args.tiny:
            max_length = min(max_length, 64)
        result["settings"].append(
            run_setting(
                pair,
                config,
                batch_size,
                max_length,
                steps=args.steps,
                warmup=args.warmup,
                methods=methods,
            )
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a kill
    result["seconds_total"] = time.perf_counter() - started
    result["ok"] = all(s["cbscope_losses_finite"] for s in result["settings"])
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for s in result["settings"]:
        row = {m: s[m] for m in methods if m in s}
        print(s["batch"], s["max_length"], json.dumps(row), "speedup", s.get("speedup_vs_official"))
    print(f"wrote {args.out}; cbscope losses finite: {result['ok']}")
    if not result["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
