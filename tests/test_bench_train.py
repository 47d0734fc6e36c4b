"""benchmarks/bench_train.py: the official-style loop and the floor really run plain peft."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from peft import LoraConfig

from cbscope.pair import load_pair

torch.set_num_threads(1)
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peft_forward_removes_and_restores_the_lean_lora_forward(tiny_llama: Path) -> None:
    bench = load_bench()
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pair = load_pair(tiny_llama, lora_config=config)

    def lean() -> int:
        trees = (pair.model, pair.bridge)
        return len({id(m) for t in trees for m in t.modules() if "forward" in vars(m)
                    and getattr(vars(m)["forward"], "__func__", None) is bench._lean_lora_forward})

    patched = lean()
    assert patched == 2 * 2 * pair.n_layers  # q and v of every block, in both module trees
    ids = torch.randint(3, pair.model.config.vocab_size, (2, 6))
    with bench.peft_forward(pair.model, pair.bridge):
        assert lean() == 0
        plain = pair.resid(ids, None, [1, 2])
    assert lean() == patched
    torch.testing.assert_close(pair.resid(ids, None, [1, 2]), plain, rtol=0, atol=0)
