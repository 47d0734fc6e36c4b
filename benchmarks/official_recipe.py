"""How far cbscope's default recipe is from the official code, in numbers.

1. ``retain``: the official retain term against cbscope's on the same weights and data (a
   random 6-block Llama, targets 2 and 4, LoRA B ~ N(0, 0.05), three circuit-breaker and three
   retain rows of different lengths, official layout for the official term, cbscope's own
   right-padded batch for cbscope's), and the cosine between the two recipes' whole-step
   gradients (step 37 of 150, alpha 10).
2. ``b_zero``: the whole-step gradient at LoRA ``B = 0`` (cbscope's loss; both terms are at an
   exact stationary point there) in fp32 and bf16, on random Llamas of growing width.
3. ``organism`` (with ``--organism``): the ``official`` preset (B = 0 in bf16) trained on the
   organism, in bf16 and in fp32: when ``cb_cos`` first drops below 0.9 ("escapes").

Usage (one thread; ``--organism`` adds two organism trainings)::

    python benchmarks/official_recipe.py --out benchmarks/results/official/recipe.json [--organism]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _loss_and_grads(pair, loss) -> tuple[float, torch.Tensor]:
    params = [p for p in pair.lora_parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten()
                      for p, g in zip(params, grads, strict=True)])
    return float(loss.detach()), flat


def retain_gap(folder: Path) -> dict[str, float]:
    """Official against cbscope retain term and whole-step gradients (see the docstring)."""
    from cbscope.lorra import losses, official
    from cbscope.lorra.config import LorraConfig
    from cbscope.lorra.data import collate
    from cbscope.lorra.loop import StepSetup, _step_terms, prepare_pair
    from tests.conftest import make_tiny_llama
    from tests.test_lorra_official import _examples

    model = make_tiny_llama(folder / "llama6", layers=6, seed=3)
    common = dict(target_layers=[2, 4], lora_r=4, lora_alpha=8, lora_dropout=0.0,
                  lora_b_init_std=0.05, steps=150, lorra_alpha=10.0, seed=0, max_length=12,
                  cb_max_length=12, lora_layers=[0, 1, 2, 3, 4])
    off_cfg = LorraConfig(**common, recipe="official").validate()
    our_cfg = LorraConfig(**common).validate()
    pair = prepare_pair(str(model), off_cfg)
    cb, retain = _examples()
    step = 36  # t = 37
    off_batch = official.official_collate(cb, retain, 2, cb_length=12, retain_length=12)
    t = official.official_step_terms(pair, off_cfg, off_batch, step, [2, 4])
    off_retain = float(t["retain_loss"].detach())
    _, off_grad = _loss_and_grads(pair, t["c_s"] * t["cb_loss"] + t["c_r"] * t["retain_loss"])
    pair.set_training(False)
    retain_12 = [type(ex)(ex.ids[:12], ex.response_start) for ex in retain]
    our_batch = collate([type(ex)(ex.ids[: ex.response_start][:6] + ex.ids[ex.response_start:][:6],
                                  min(ex.response_start, 6)) for ex in cb], retain_12, 0)
    setup = StepSetup.of(our_cfg, pair.n_layers)
    u = _step_terms(pair, our_cfg, our_batch, step, setup)
    our_retain = float(u["retain_loss"].detach())
    _, our_grad = _loss_and_grads(pair, u["c_s"] * u["cb_loss"] + u["c_r"] * u["retain_loss"])
    pair.set_training(False)
    cosine = float(torch.nn.functional.cosine_similarity(off_grad, our_grad, dim=0))
    schedule_100 = {"official": official.official_schedule(100, 10.0),
                    "cbscope": losses.schedule(100, 100, 10.0)}
    return {"official_retain": round(off_retain, 4), "cbscope_retain": round(our_retain, 4),
            "ratio": round(our_retain / off_retain, 3), "gradient_cosine": round(cosine, 4),
            "schedule_at_t100_T100": schedule_100}


def b_zero(folder: Path, widths: list[int]) -> list[dict[str, float]]:
    """Whole-step gradient sizes at B = 0 (cbscope's loss), fp32 and bf16."""
    from cbscope.lorra.config import LorraConfig
    from cbscope.lorra.data import EncodedExample, collate
    from cbscope.lorra.loop import StepSetup, _step_terms, prepare_pair
    from tests.conftest import make_tiny_llama

    rows = []
    cb = [EncodedExample([1, 6, 7, 8, 9, 10, 11, 12], 3), EncodedExample([1, 9, 10, 11, 12, 13], 2)]
    retain = [EncodedExample([1, 6, 7, 8, 9], 2), EncodedExample([1, 14, 15, 16, 17, 18, 19], 3)]
    for width in widths:
        model = make_tiny_llama(folder / f"llama-{width}", layers=2, hidden=width, seed=0)
        for dtype in ("float32", "bfloat16"):
            config = LorraConfig(target_layers=[1, 2], lora_r=16, lora_alpha=16, lora_dropout=0.0,
                                 lora_b_init_std=0.0, steps=150, dtype=dtype).validate()
            pair = prepare_pair(str(model), config)
            t = _step_terms(pair, config, collate(cb, retain, 0), 0, StepSetup.of(config, 2))
            _, grad = _loss_and_grads(pair, t["c_s"] * t["cb_loss"] + t["c_r"] * t["retain_loss"])
            pair.set_training(False)
            rows.append({"d_model": width, "dtype": dtype,
                         "grad_max_abs": float(grad.abs().max()),
                         "grad_norm": float(grad.norm())})
            del pair
    return rows


def organism(folder: Path) -> dict[str, object]:
    """The ``official`` preset on the organism in bf16 and fp32: the first step with cb_cos < 0.9."""
    from cbscope.run import RunConfig, Runner

    out = {}
    for dtype in ("bfloat16", "float32"):
        seen: list[dict] = []
        runner = Runner(RunConfig(preset="official", out=folder / f"official-{dtype}",
                                  progress=False, lorra_overrides={"dtype": dtype}),
                        on_step=seen.append)
        result = runner.run()
        escaped = next((m["step"] for m in seen if m["cb_cos"] < 0.9), None)
        out[dtype] = {"first_step_cb_cos_below_0.9": escaped,
                      "cb_cos": [round(m["cb_cos"], 4) for m in seen[::10]],
                      "final_cb_cos": round(seen[-1]["cb_cos"], 4),
                      "train_seconds": round(result.seconds, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="64,512,4096")
    parser.add_argument("--organism", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report: dict[str, object] = {"threads": args.threads, "retain": retain_gap(folder)}
        print(json.dumps(report["retain"]), flush=True)
        report["b_zero"] = b_zero(folder, [int(w) for w in args.widths.split(",")])
        print(json.dumps(report["b_zero"]), flush=True)
        if args.organism:
            report["organism"] = organism(folder)
            print(json.dumps(report["organism"]), flush=True)
    report["command"] = (f"python benchmarks/official_recipe.py --widths {args.widths} "
                         f"--threads {args.threads}" + (" --organism" if args.organism else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
