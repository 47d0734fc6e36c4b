"""GPU check of the paper preset (``llama3-8b-rr``): dry-run estimate against a real run.

No 8B weights can be downloaded on the device machine, so the model is a *randomly initialised*
Llama with Llama-3-8B's shape (32 blocks, d_model 4096, MLP 14336, 32 heads, 8 KV heads) but a
small word-level vocabulary, in bf16, and the data are made-up rows in the official file format
(long enough to fill the official 512 / 512 / 1024 layout). The script runs ``--dry-run``'s
plan and memory estimate, then a few real steps of the preset on ``cuda``, and records the step
time, the peak ``torch.cuda.max_memory_allocated`` and whether every loss is finite.

    python benchmarks/gpu_official.py --out DIR                 # on the GPU machine
    python benchmarks/gpu_official.py --out DIR --smoke         # here: a tiny shape on the CPU
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = ("hello world how do i bake bread sure here is the way to make a cake : step one two three "
         "make bread the cake again and then more words for a long answer").split()


def make_model(folder: Path, smoke: bool) -> Path:
    """A random Llama of Llama-3-8B's shape (or a tiny one) with a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import word_tokenizer

    tokenizer = word_tokenizer(WORDS)
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=22, num_attention_heads=4,
                  num_key_value_heads=2) if smoke else
             dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_data(folder: Path, n: int) -> dict[str, str]:
    """Made-up files in the official format, each text long enough for the official lengths."""
    folder.mkdir(parents=True, exist_ok=True)
    long = " ".join(WORDS * 30)
    cb = [{"prompt": f"how do i make {WORDS[i % len(WORDS)]} {long[:400]}", "output": long,
           "llama3_output": "i make bread " + long[:200], "category": "x"} for i in range(n)]
    (folder / "cb.json").write_text(json.dumps(cb))
    chats = [{"messages": [{"role": "user", "content": long[:600]},
                           {"role": "assistant", "content": long}]} for _ in range(n)]
    (folder / "ultrachat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    with (folder / "xstest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion", "final_label"])
        writer.writeheader()
        writer.writerow({"prompt": long[:300], "completion": long, "final_label": "1_full_compliance"})
    return {"cb_file": str(folder / "cb.json"), "ultrachat": str(folder / "ultrachat.jsonl"),
            "xstest": str(folder / "xstest.csv")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    from cbscope.run import RunConfig, Runner

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = make_model(args.out / "model", args.smoke)
    files = make_data(args.out / "data", 64)
    overrides = {"steps": args.steps, "log_every": 1, "checkpoint_every": 0}
    if args.smoke:
        overrides.update(batch_size=2, max_length=64, cb_max_length=64, dtype="float32",
                         gradient_checkpointing=False)
    device = "cpu" if args.smoke else "cuda"

    def config() -> RunConfig:
        return RunConfig(preset="llama3-8b-rr", model=str(model), out=args.out / "run",
                         data_options={"cb_file": files["cb_file"], "ultrachat": files["ultrachat"]},
                         xstest=Path(files["xstest"]), device=device, overwrite=True,
                         progress=False, lorra_overrides=overrides)

    report = {"setup_seconds": round(time.perf_counter() - started, 1)}
    dry = Runner(config()).dry_run()
    report["dry_run"] = dry.to_dict()
    seen: list[dict] = []
    if torch.cuda.is_available() and not args.smoke:
        torch.cuda.reset_peak_memory_stats()
    result = Runner(config(), on_step=seen.append).run()
    report["steps"] = [{k: m[k] for k in ("step", "loss", "cb_loss", "retain_loss", "c_s", "c_r",
                                          "step_seconds")} for m in seen]
    report["all_finite"] = all(torch.isfinite(torch.tensor(m["loss"])) for m in seen)
    report["train_seconds"] = round(result.seconds, 1)
    if torch.cuda.is_available() and not args.smoke:
        report["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
        report["estimate_gib"] = round(dry.memory["total"] / 1024**3, 2)
        report["device"] = torch.cuda.get_device_name()
    (args.out / "gpu_official.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "dry_run"}, indent=2))


if __name__ == "__main__":
    main()
