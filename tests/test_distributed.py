"""Multi-process training through ``accelerate launch`` and the memory options for large models.

The 2-process runs use CPU processes with gloo. ``accelerate launch --cpu --num_processes 2``
does not start two processes (accelerate 1.15 runs CPU jobs through its single-process
launcher unless given an MPI hostfile), so the tests launch with ``--multi_gpu`` and
``ACCELERATE_USE_CPU=1`` / no visible GPU: torchrun starts the processes and
:func:`cbscope.lorra.distributed.distributed_context` opens a gloo group.

Tolerance: a 2-process run sums the shards' gradients with every shard's loss normalised by the
global token counts, so it computes the single-process gradient up to float32 summation order
and padding width (each shard is padded to its own longest row). Observed max abs difference of
the final LoRA tensors after 3 AdamW steps at lr 2e-3: about 1e-6; asserted: ``<= 1e-4``, 5 % of
one step's update (a real normalisation bug, e.g. averaging per-shard means, moves them ~1e-3).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbscope.lorra import LorraConfig, get_preset
from cbscope.lorra.data import EncodedExample, collate
from cbscope.lorra.distributed import shard_entry, shard_scale
from cbscope.lorra.trainer import CHECKPOINT_DIR, StepSetup, _step_terms, prepare_pair, staging_dir

torch.set_num_threads(1)

ADAPTER = "adapter_model.safetensors"
TOLERANCE = 1e-4
RESUME_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from cbscope.lorra import LorraConfig, get_preset, train_circuit_breaker
from cbscope.lorra.trainer import prepare_pair
model, cfg, out, mode = sys.argv[1:5]
config = LorraConfig.load(cfg)
pair = prepare_pair(model, config)
data = get_preset("organism").build_data(pair, show_progress=False)
train_circuit_breaker(pair, config, data, out_dir=out, resume=mode == "resume",
                      stop_after=2 if mode == "stop" else None, show_progress=False)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)  # CBSCOPE_CACHE is the test's isolated cache (conftest)
    env.update(
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        ACCELERATE_USE_CPU="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(args: list[str], *, processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch`` N CPU processes (own rendezvous port: other jobs may run)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *args,
    ]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _train_args(model: Path, cfg: Path, out: Path) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--preset",
        "organism",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--no-progress",
    ]


def _config(folder: Path) -> Path:
    """The organism preset, 3 steps of a 4 + 4 global batch, no LoRA dropout (dropout masks
    are drawn per process, so with dropout the runs agree only in distribution)."""
    config = get_preset("organism").config
    config.steps, config.batch_size, config.max_length, config.cb_max_length = 3, 4, 64, None
    config.target_layers, config.lora_dropout, config.val_size = [2, 3], 0.0, 4
    config.log_every, config.checkpoint_every = 1, 2
    return config.save(folder)


def test_two_processes_match_one_and_resume(tiny_organism: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    cfg = _config(tmp_path / "cfg")
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, "-m", "cbscope", *_train_args(tiny_organism, cfg, one)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    _launch(["-m", "cbscope", *_train_args(tiny_organism, cfg, two)])

    info = json.loads((two / "train_info.json").read_text())
    assert info["processes"] == 2  # really ran distributed
    assert info["frozen_cache"]["used"]  # each rank read its shard's frozen representations from its cache
    assert json.loads((one / "train_info.json").read_text())["frozen_cache"]["used"]
    assert "processes" not in json.loads((one / "train_info.json").read_text())
    a, b = load_file(str(one / ADAPTER)), load_file(str(two / ADAPTER))
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(a[k].abs().max()) for k in a if "lora_B" in k)
    assert diff <= TOLERANCE, f"1 vs 2 processes: max abs diff {diff}"
    assert moved > 10 * TOLERANCE  # the comparison is not between two untouched adapters
    rows_a = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3]  # rank 0 alone wrote the metrics
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("loss", "cb_loss", "retain_loss", "cb_cos", "retain_cos", "val_cos"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), key

    # interrupted after 2 steps, then resumed, by 2 processes: bit-identical to `two`
    script = tmp_path / "resume_run.py"
    script.write_text(RESUME_SCRIPT)
    killed = tmp_path / "killed"
    _launch([str(script), str(tiny_organism), str(cfg), str(killed), "stop"])
    assert not killed.exists()  # the interrupted run waits in its staging folder
    ckpt = load_file(str(staging_dir(killed) / CHECKPOINT_DIR / "step-000002.safetensors"))
    assert not torch.equal(ckpt["rng.torch.0"], ckpt["rng.torch.1"])  # one stream per process
    _launch([str(script), str(tiny_organism), str(cfg), str(killed), "resume"])
    c = load_file(str(killed / ADAPTER))
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert not (killed / CHECKPOINT_DIR).exists() and not staging_dir(killed).exists()


def test_shards_cover_the_batch_and_scales_add_up() -> None:
    entry = {
        "cb": [0, 1, 2, 3, 4],
        "drop": [0, 1, 0, 1, 0],
        "retain": [["benign", i] for i in range(5)],
    }
    parts = [shard_entry(entry, r, 2) for r in range(2)]
    assert [len(p["cb"]) for p in parts] == [3, 2]
    assert parts[0]["cb"] + parts[1]["cb"] == entry["cb"]
    assert parts[0]["retain"] + parts[1]["retain"] == entry["retain"]
    counts = torch.tensor([7.0, 3.0])
    total = sum(float(shard_scale(n, counts.sum())) for n in counts)
    assert total == pytest.approx(1.0)


def _one_step_grads(model: Path, **overrides) -> tuple[dict[str, torch.Tensor], float, object]:
    config = LorraConfig(
        target_layers=[1, 2],
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,  # dropout on: the recomputation must replay the same masks
        lora_b_init_std=0.01,
        max_length=32,
        steps=4,
        **overrides,
    )
    pair = prepare_pair(str(model), config)
    rows = [EncodedExample([1, 4, 6 + i, 7, 8, 5, 9, 10 + i % 2][: 6 + i], 4) for i in range(4)]
    batch = collate(rows[:2], rows[2:], pad_id=0)
    torch.manual_seed(0)
    terms = _step_terms(pair, config, batch, 0, StepSetup([1, 2], [1, 2]))
    loss = terms["c_s"] * terms["cb_loss"] + terms["c_r"] * terms["retain_loss"]
    loss.backward()
    pair.bridge.eval()
    grads = {n: p.grad.clone() for n, p in pair.model.named_parameters() if p.grad is not None}
    return grads, float(loss.detach()), pair


def test_gradient_checkpointing_same_gradients(tiny_llama: Path) -> None:
    plain, loss_plain, _ = _one_step_grads(tiny_llama)
    calls = {"n": 0}
    config = LorraConfig(target_layers=[1, 2], gradient_checkpointing=True)
    pair = prepare_pair(str(tiny_llama), config)
    # recomputation really happens: a LoRA A inside block 0 runs again during backward
    lora_a = next(
        m
        for n, m in pair.bridge.named_modules()
        if n.startswith("blocks.0.") and "q_proj" in n and n.endswith("lora_A.default")
    )
    lora_a.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    rows = [EncodedExample([1, 4, 6, 7, 8, 5], 3), EncodedExample([1, 4, 7, 8, 5], 3)]
    batch = collate(rows[:1], rows[1:], pad_id=0)
    pair.bridge.train()
    reps = pair.resid(batch.input_ids, batch.attention_mask, [1, 2])
    forward_calls = calls["n"]
    reps.float().pow(2).sum().backward()
    assert forward_calls == 1 and calls["n"] == 2

    checkpointed, loss_ckpt, _ = _one_step_grads(tiny_llama, gradient_checkpointing=True)
    assert loss_ckpt == pytest.approx(loss_plain, abs=1e-6)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bfloat16_step_is_finite(tiny_llama: Path) -> None:
    grads, loss, pair = _one_step_grads(tiny_llama, dtype="bfloat16")
    assert pair.dtype == torch.bfloat16
    base = next(
        p for n, p in pair.model.named_parameters() if n.endswith("q_proj.base_layer.weight")
    )
    assert base.dtype == torch.bfloat16
    # peft keeps the adapter weights (and so AdamW's state) in float32 on a bf16 base
    assert all(p.dtype == torch.float32 for p in pair.lora_parameters())
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(float(g.abs().max()) > 0 for g in grads.values())


def test_auto_dtype_and_device_map(tiny_llama: Path) -> None:
    from cbscope.pair import load_pair

    pytest.importorskip("accelerate")
    ref = load_pair(str(tiny_llama))
    auto = load_pair(str(tiny_llama), dtype="auto", device_map="auto")
    assert auto.dtype == torch.float32  # the tiny Llama was saved in float32
    assert auto.device.type == "cpu"
    ids = torch.tensor([[1, 4, 6, 7, 8, 5]])
    torch.testing.assert_close(auto.resid(ids, None, [1, 3]), ref.resid(ids, None, [1, 3]))
