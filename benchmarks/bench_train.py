"""Step time of cbscope's LoRRA trainer against an official-style loop and a floor.

All three run in one process on the same model, LoRA adapter, batch (B circuit-breaker rows and
B retain rows) and loss, with AdamW on the LoRA parameters:

* ``cbscope``: :func:`cbscope.lorra.trainer._train_step` (one frozen and one adapted forward over
  the concatenated batch through TransformerLens hook points, stopping after the highest layer
  needed, no unembedding);
* ``official``: what ``lorra_circuit_breaker.py`` does: the model cut to ``max(target) + 1``
  blocks, ``output_hidden_states=True`` with full logits, four forwards a step (frozen retain and
  frozen circuit-breaker under ``no_grad`` with the adapter disabled, then adapted retain and
  adapted circuit-breaker);
* ``floor``: the least work the loss needs: one no-grad frozen forward and one adapted forward +
  backward over the concatenated batch, both through plain HF blocks truncated at the highest
  target layer (forward hooks on the decoder layers), no unembedding;
* ``floor_lean``: the floor with cbscope's lean LoRA forward
  (:func:`cbscope.native_paths.install_lora`), i.e. the same kernels as cbscope.

``official`` and ``floor`` run peft's own ``lora.Linear.forward`` (plain HF + peft), as a user of
those libraries would; cbscope and ``floor_lean`` run the lean one.

Usage::

    CBSCOPE_CACHE=/tmp/exp/cache python benchmarks/bench_train.py --model smollm2-135m \
        --target-layers 10,20 --batch-size 4 --max-length 128 --threads 1 --out bench_train.json
    python benchmarks/bench_train.py --quick      # a tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cbscope.lorra import LorraConfig, losses
from cbscope.lorra.data import EncodedExample, collate
from cbscope.lorra.trainer import StepSetup, _train_step, prepare_pair
from cbscope.native_paths import _lean_lora_forward


@contextlib.contextmanager
def peft_forward(*models: torch.nn.Module) -> Iterator[None]:
    """Run peft's own ``lora.Linear.forward`` (drop cbscope's lean one) inside the block."""
    patched = {id(m): m for model in models for m in model.modules() if "forward" in vars(m)
               and getattr(vars(m)["forward"], "__func__", None) is _lean_lora_forward}
    saved = {key: vars(m).pop("forward") for key, m in patched.items()}
    try:
        yield
    finally:
        for key, m in patched.items():
            object.__setattr__(m, "forward", saved[key])


def make_batch(vocab: int, batch_size: int, max_length: int, seed: int = 0) -> Any:
    """B circuit-breaker + B retain rows of random tokens, lengths in [3/4 L, L] (padding)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2 * batch_size):
        length = int(torch.randint(3 * max_length // 4, max_length + 1, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        rows.append(EncodedExample(ids, length // 2))
    return collate(rows[:batch_size], rows[batch_size:], pad_id=0)


def layer_index(layers: list[int], wanted: list[int]) -> torch.Tensor | slice:
    """Positions of ``wanted`` in ``layers`` for indexing the floor's stacked tensor: a slice (a
    view, no copy) when contiguous."""
    positions = [layers.index(layer) for layer in wanted]
    if positions == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0], positions[-1] + 1)
    return torch.tensor(positions)


def official_step(pair: Any, config: LorraConfig, batch: Any, step: int, targets: list[int], optimizer: Any) -> None:
    """One step the way the official code computes it (four full forwards, all hidden states)."""
    model = pair.peft_model
    n = batch.n_cb
    cb_ids, cb_att = batch.input_ids[:n], batch.attention_mask[:n]
    re_ids, re_att = batch.input_ids[n:], batch.attention_mask[n:]
    c_s, c_r = losses.schedule(step + 1, config.steps, config.lorra_alpha)
    cb_layer_mask = cb_att.repeat(len(targets), 1, 1).unsqueeze(-1)
    with model.disable_adapter(), torch.no_grad():
        model.eval()
        orig_retain = torch.stack(model(input_ids=re_ids, attention_mask=re_att, output_hidden_states=True).hidden_states)
        retain_layer_mask = re_att.repeat(len(orig_retain), 1, 1).unsqueeze(-1)
        orig_retain = orig_retain * retain_layer_mask
        cb_out = model(input_ids=cb_ids, attention_mask=cb_att, output_hidden_states=True).hidden_states
        orig_cb = torch.stack([cb_out[layer] for layer in targets])
    model.train()
    lora_retain = torch.stack(model(input_ids=re_ids, attention_mask=re_att, output_hidden_states=True).hidden_states)
    lora_retain = lora_retain * retain_layer_mask
    retain_loss = torch.norm(lora_retain - orig_retain, dim=-1, p=2, dtype=torch.float).nanmean()
    cb_out = model(input_ids=cb_ids, attention_mask=cb_att, output_hidden_states=True).hidden_states
    lora_cb = torch.stack([cb_out[layer] for layer in targets])
    a = lora_cb / torch.norm(lora_cb, dim=-1, keepdim=True, dtype=torch.float)
    b = orig_cb / torch.norm(orig_cb, dim=-1, keepdim=True, dtype=torch.float)
    cb_loss = torch.relu(((a * b) * cb_layer_mask).sum(-1)).sum() / cb_layer_mask.sum()
    loss = c_s * cb_loss + c_r * retain_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(pair.lora_parameters(), config.max_grad_norm)
    optimizer.step()
    model.eval()


def floor_step(pair: Any, config: LorraConfig, batch: Any, step: int, layers: list[int], t_idx: Any, r_idx: Any, optimizer: Any) -> None:
    """One frozen forward + one adapted forward/backward, truncated, no unembedding."""
    base = pair.model.model
    captured: dict[int, torch.Tensor] = {}
    handles = [
        base.layers[layer - 1].register_forward_hook(
            lambda _m, _i, out, layer=layer: captured.__setitem__(layer, out[0] if isinstance(out, tuple) else out)
        )
        for layer in layers
    ]
    full = base.layers
    base.layers = full[: max(layers)]
    norm, base.norm = base.norm, torch.nn.Identity()
    try:
        with pair.original(), torch.no_grad():
            base(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            orig = torch.stack([captured[layer] for layer in layers])
        pair.model.train()
        base(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        broken = torch.stack([captured[layer] for layer in layers])
        pair.model.eval()
    finally:
        base.layers, base.norm = full, norm
        for handle in handles:
            handle.remove()
    n = batch.n_cb
    c_s, c_r = losses.schedule(step + 1, config.steps, config.lorra_alpha)
    loss = c_s * losses.circuit_breaker_loss(orig[t_idx, :n], broken[t_idx, :n], batch.cb_mask) + c_r * losses.retain_loss(
        orig[r_idx, n:], broken[r_idx, n:], batch.retain_mask
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(pair.lora_parameters(), config.max_grad_norm)
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target-layers", default="10,20")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per method (after 1 warm-up).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="A tiny random Llama, for a smoke test.")
    parser.add_argument("--out", type=Path, default=Path("bench_train.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, targets = args.model, [int(x) for x in args.target_layers.split(",")]
    if args.quick:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_llama

        model = str(make_tiny_llama(Path(tempfile.mkdtemp()) / "tiny", layers=4, hidden=64))
        targets = [2, 3]
    config = LorraConfig(target_layers=targets, batch_size=args.batch_size, max_length=args.max_length, steps=150)
    pair = prepare_pair(model, config)
    setup = StepSetup.of(config, pair.n_layers)
    layers = setup.layers
    t_idx = layer_index(layers, setup.targets)
    r_idx = layer_index(layers, setup.retain_layers)
    batch = make_batch(pair.model.config.vocab_size, args.batch_size, args.max_length)
    optimizer = torch.optim.AdamW(pair.lora_parameters(), lr=config.lr)

    methods = {
        "cbscope": lambda s: _train_step(pair, config, batch, s, setup, optimizer),
        "official": lambda s: official_step(pair, config, batch, s, targets, optimizer),
        "floor": lambda s: floor_step(pair, config, batch, s, layers, t_idx, r_idx, optimizer),
        "floor_lean": lambda s: floor_step(pair, config, batch, s, layers, t_idx, r_idx, optimizer),
    }
    plain_peft = {"official", "floor"}
    # the official recipe cuts the model to max(target) + 1 blocks
    base = pair.model.model
    full_layers = base.layers
    times: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(args.steps + 1):
        for name, fn in methods.items():
            if name == "official":
                base.layers = full_layers[: max(targets) + 1]
                pair.model.config.num_hidden_layers = max(targets) + 1
            tick = time.perf_counter()
            try:
                with peft_forward(pair.model, pair.bridge) if name in plain_peft else contextlib.nullcontext():
                    fn(rep)
            finally:
                base.layers = full_layers
                pair.model.config.num_hidden_layers = len(full_layers)
            if rep > 0:
                times[name].append(time.perf_counter() - tick)
    # min over repeats: the least disturbed measurement on a shared machine; median also reported
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "model": model if not args.quick else "tiny-llama",
        "target_layers": targets,
        "batch": f"{args.batch_size} cb + {args.batch_size} retain",
        "max_length": args.max_length,
        "threads": args.threads,
        "seconds_per_step": best,
        "median_seconds_per_step": median,
        "all_seconds": times,
        "speedup_vs_official": best["official"] / best["cbscope"],
        "ratio_to_floor": best["cbscope"] / best["floor"],
        "median_speedup_vs_official": median["official"] / median["cbscope"],
        "median_ratio_to_floor": median["cbscope"] / median["floor"],
        "ratio_to_floor_lean": best["cbscope"] / best["floor_lean"],
        "median_ratio_to_floor_lean": median["cbscope"] / median["floor_lean"],
    }
    print(f"{'method':<10}{'min s/step':>12}{'median':>10}")
    for name in methods:
        print(f"{name:<10}{best[name]:>12.3f}{median[name]:>10.3f}")
    print(f"cbscope is {result['speedup_vs_official']:.2f}x faster than official-style "
          f"(target >= 1.2) and {result['ratio_to_floor']:.2f}x the floor (target <= 1.1); "
          f"{result['ratio_to_floor_lean']:.2f}x the floor with the lean LoRA forward")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
