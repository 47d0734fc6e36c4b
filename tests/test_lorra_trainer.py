"""The LoRRA trainer: outputs, resume, NaN handling, hooks, malformed data, loss variants."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbscope.data import DatasetError
from cbscope.lorra import LorraConfig, NonFiniteLossError, ResumeError, train_circuit_breaker
from cbscope.lorra.trainer import CHECKPOINT_DIR, METRICS_FILE, latest_checkpoint, staging_dir

torch.set_num_threads(1)

CB = [
    {"prompt": "how do i make a cake", "response": "sure here is the way : step one two three"},
    {"prompt": "how do i bake bread", "response": "sure here is the way : step two three one"},
    {"prompt": "how do i make bread", "response": "sure here is the way : step three one"},
    {"prompt": "how do i bake a cake", "response": "sure here is the way : step one"},
]
RETAIN = {
    "benign": [
        {"prompt": "hello world", "response": "hello"},
        {"prompt": "hello", "response": "hello world how"},
        {"prompt": "world", "response": "the world is the world"},
    ],
    "refusal": [{"prompt": "how do i make a cake", "response": "here is the way : one"}],
}
METRIC_KEYS = {
    "step", "loss", "cb_loss", "retain_loss", "c_s", "c_r", "cb_cos", "retain_cos", "val_cos",
    "cb_norm_orig", "cb_norm_cb", "step_seconds",
}


def small_config(**overrides) -> LorraConfig:
    base = dict(
        target_layers=[1, 2], steps=6, batch_size=2, max_length=32, lr=5e-3, val_size=0,
        log_every=2, checkpoint_every=2, lora_r=4, lora_alpha=8,
    )
    return LorraConfig(**{**base, **overrides})


def run(model: Path, out: Path | None, config: LorraConfig | None = None, **kwargs):
    return train_circuit_breaker(
        str(model), config or small_config(), CB, RETAIN, val_data=CB[:2], out_dir=out,
        show_progress=False, **kwargs,
    )


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_outputs_and_plain_peft_load(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = run(tiny_llama, out, merge=True)
    assert result.finished and result.steps_done == 6
    for name in ("adapter_config.json", "adapter_model.safetensors", "lorra_config.json",
                 METRICS_FILE, "train_info.json"):
        assert (out / name).is_file(), name
    assert not (out / CHECKPOINT_DIR).exists()  # removed after a successful run
    assert LorraConfig.load(out) == result.config
    rows = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(set(r) >= METRIC_KEYS for r in rows)
    assert rows[-1]["c_s"] == pytest.approx(5.0) and rows[-1]["c_r"] == pytest.approx(5.0)
    # LoRA only on blocks 0 .. max(target) - 1 = 0, 1
    keys = adapter_tensors(out)
    assert keys and all(".layers.0." in k or ".layers.1." in k for k in keys)
    assert not any("_original_component" in k for k in keys)

    ids = torch.tensor([[1, 4, 10, 11, 12, 5, 13]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(out))
    plain.eval()
    with torch.no_grad():
        ours = result.pair.generator(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))(input_ids=ids).logits
        with result.pair.original():
            base = result.pair.generator(input_ids=ids).logits
    assert torch.equal(ours, theirs)
    assert torch.allclose(merged, ours, atol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-4)  # the adapter did something


def test_resume_is_bit_identical(tiny_llama: Path, tmp_path: Path) -> None:
    full = run(tiny_llama, tmp_path / "full")

    class Killed(Exception):
        pass

    def kill_at_3(metrics: dict) -> None:
        if metrics["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        run(tiny_llama, tmp_path / "killed", on_step=kill_at_3)
    ckpt = staging_dir(tmp_path / "killed") / CHECKPOINT_DIR  # the run works beside --out
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002.json", "step-000002.safetensors"]
    assert not (tmp_path / "killed").exists()  # nothing is published before the run finishes
    resumed = run(tiny_llama, tmp_path / "killed", resume=True)
    assert resumed.resumed_from == 2 and resumed.finished
    assert not staging_dir(tmp_path / "killed").exists()
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines_a = [json.loads(x) for x in (tmp_path / "full" / METRICS_FILE).read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "killed" / METRICS_FILE).read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]  # noqa: E731
    assert strip(lines_a) == strip(lines_b)
    assert full.metrics[-1]["loss"] == resumed.metrics[-1]["loss"]


def test_stop_after_then_resume(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run(tiny_llama, out, stop_after=3)
    assert not first.finished and first.steps_done == 3
    assert first.work_dir == staging_dir(out) and not out.exists()
    assert latest_checkpoint(staging_dir(out) / CHECKPOINT_DIR)[0]["step"] == 3
    second = run(tiny_llama, out, resume=True)
    assert second.resumed_from == 3 and second.finished
    other = run(tiny_llama, tmp_path / "other")
    a, b = adapter_tensors(out), adapter_tensors(tmp_path / "other")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert other.final["val_cos"] == second.final["val_cos"]


def test_resume_rejects_another_config(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(tiny_llama, out, stop_after=2)
    with pytest.raises(ResumeError, match="lr"):
        run(tiny_llama, out, small_config(lr=1e-2), resume=True)


def test_nan_marks_the_checkpoint_of_its_weights_bad_and_the_advice_resumes(
    tiny_llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The weights saved at step 3 give a NaN loss at step 4: checkpoint 3 is marked bad, the
    message names checkpoint 2 (confirmed by step 3's finite loss) and the advice it prints
    (``--resume --lr LOWER``) resumes from it."""
    from cbscope.lorra.checkpoint import list_checkpoints
    from cbscope.lorra.trainer import prepare_pair

    out = tmp_path / "run"
    ckpt_dir = staging_dir(out) / CHECKPOINT_DIR
    config = small_config(checkpoint_every=1)
    pair = prepare_pair(str(tiny_llama), config)
    seen: dict[str, str] = {}

    def poison_after_3(metrics: dict) -> None:
        if metrics["step"] == 3:
            seen["sha"] = hashlib.sha256((ckpt_dir / "step-000002.safetensors").read_bytes()).hexdigest()
            with torch.no_grad():  # stands for a step whose update broke the weights
                next(p for p in pair.lora_parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="step 4: the loss is nan") as err:
        train_circuit_breaker(pair, config, CB, RETAIN, out_dir=out, on_step=poison_after_3,
                              show_progress=False)
    message = str(err.value)
    assert "The last good checkpoint is step 2" in message and "--resume --lr 0.0005" in message
    status = {c.step: c.status for c in list_checkpoints(ckpt_dir)}
    assert status[3] == "bad" and status[2] == "good"
    assert hashlib.sha256((ckpt_dir / "step-000002.safetensors").read_bytes()).hexdigest() == seen["sha"]
    assert not out.exists()
    meta, tensors = latest_checkpoint(ckpt_dir)
    assert meta["step"] == 2
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("lora."))
    with caplog.at_level("WARNING"):
        resumed = train_circuit_breaker(str(tiny_llama), small_config(checkpoint_every=1, lr=5e-4),
                                        CB, RETAIN, out_dir=out, resume=True, show_progress=False)
    assert resumed.resumed_from == 2 and resumed.finished
    assert "instead of the checkpoint's" in caplog.text  # the override is logged ...
    info = json.loads((out / "train_info.json").read_text())
    assert info["lr_overrides"] == [{"from_step": 2, "lr": 5e-4, "was": 5e-3}]  # ... and recorded
    assert LorraConfig.load(out).lr == 5e-4


def _hook_count(pair) -> int:
    return sum(len(hp._forward_hooks) for hp in pair.bridge.hook_dict.values())


def test_hooks_come_off_on_exceptions(tiny_llama: Path) -> None:
    from cbscope.lorra.trainer import prepare_pair

    pair = prepare_pair(str(tiny_llama), small_config())
    before = _hook_count(pair)
    ids, mask = torch.tensor([[1, 4, 10, 11]]), torch.ones(1, 4, dtype=torch.long)
    reps = pair.resid(ids, mask, [1, 2])
    assert reps.shape == (2, 1, 4, pair.d_model)
    assert _hook_count(pair) == before

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    handle = pair.bridge.blocks[1].register_forward_pre_hook(boom)  # fails after layer 1's hook
    try:
        with pytest.raises(RuntimeError, match="injected"):
            pair.resid(ids, mask, [1, 2])
        assert _hook_count(pair) == before
        with pytest.raises(RuntimeError, match="injected"):
            train_circuit_breaker(pair, small_config(), CB, RETAIN, show_progress=False)
        assert _hook_count(pair) == before
    finally:
        handle.remove()
    assert pair.resid(ids, mask, [1, 2]).shape == reps.shape


def test_malformed_inputs_are_named(tiny_llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cb.jsonl"
    bad.write_text(json.dumps(CB[0]) + "\n" + json.dumps({"prompt": "hello", "response": ""}) + "\n")
    with pytest.raises(DatasetError, match=r"cb\.jsonl, line 2: field 'response'"):
        train_circuit_breaker(str(tiny_llama), small_config(), bad, RETAIN, show_progress=False)
    broken = tmp_path / "retain.jsonl"
    broken.write_text('{"prompt": "hello", "response": "hi"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match=r"retain\.jsonl, line 2: not valid JSON"):
        train_circuit_breaker(str(tiny_llama), small_config(), CB, broken, show_progress=False)
    no_prompt = tmp_path / "noprompt.jsonl"
    no_prompt.write_text('{"response": "hi"}\n')
    with pytest.raises(DatasetError, match=r"noprompt\.jsonl, line 1: missing field 'prompt'"):
        train_circuit_breaker(str(tiny_llama), small_config(), no_prompt, RETAIN, show_progress=False)
    sources = tmp_path / "sources.jsonl"
    sources.write_text('{"prompt": "hello", "response": "hi", "source": "nonsense"}\n')
    with pytest.raises(DatasetError, match="unknown retain sources"):
        train_circuit_breaker(str(tiny_llama), small_config(), CB, sources, show_progress=False)
    with pytest.raises(DatasetError, match="circuit-breaker example 0: field 'response'"):
        train_circuit_breaker(str(tiny_llama), small_config(), [{"prompt": "hi"}], RETAIN,
                              show_progress=False)


@pytest.mark.parametrize("loss", ["rmu", "random_norm", "refusal_direction"])
def test_loss_variants_train(tiny_llama: Path, loss: str) -> None:
    result = run(tiny_llama, None, small_config(loss=loss, steps=3, log_every=1))
    assert result.finished
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.metrics)
    assert result.metrics[-1]["cb_loss"] != result.metrics[0]["cb_loss"]


def test_zero_alpha_and_single_step(tiny_llama: Path) -> None:
    """A coefficient of 0 (alpha 0) or t == T never crashes; both losses are logged."""
    result = run(tiny_llama, None, small_config(lorra_alpha=0.0, steps=1))
    m = result.metrics[-1]
    assert m["c_s"] == 0.0 and m["c_r"] == 0.0 and m["loss"] == 0.0
    assert m["cb_loss"] > 0 and m["retain_loss"] > 0


def test_on_step_gets_every_step(tiny_llama: Path) -> None:
    seen: list[dict] = []
    run(tiny_llama, None, on_step=seen.append)
    assert [m["step"] for m in seen] == [1, 2, 3, 4, 5, 6]
    assert all("val_cos" in m for m in seen if m["step"] % 2 == 0)


def test_row_blocks_equal_slices_of_a_stack_in_values_and_gradients() -> None:
    from cbscope.lorra.loop import _RowBlocks

    generator = torch.Generator().manual_seed(0)
    base = [torch.randn(5, 4, 3, generator=generator) for _ in range(4)]
    first, rest, n = [1, 3], [0, 1, 2], 2  # layer 1 in both blocks, layer 3 in the first only
    weights = (torch.randn(2, n, 4, 3, generator=generator), torch.randn(3, 5 - n, 4, 3, generator=generator))
    results = []
    for lean in (True, False):
        reps = [t.clone().requires_grad_(True) for t in base]
        if lean:
            top, bottom = _RowBlocks.apply(n, first, rest, *reps)
        else:
            stacked = torch.stack(reps)
            top, bottom = stacked[first, :n], stacked[rest, n:]
        ((top * weights[0]).sum() + (bottom * weights[1]).pow(2).sum()).backward()
        results.append((top.detach(), bottom.detach(), [r.grad for r in reps]))
    (top_a, bottom_a, grads_a), (top_b, bottom_b, grads_b) = results
    assert torch.equal(top_a, top_b) and torch.equal(bottom_a, bottom_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(grads_a[3][n:], torch.zeros_like(grads_a[3][n:]))  # zero-filled part
    # only one block used: the other side's rows get zeros, a layer in neither gets no gradient
    reps = [t.clone().requires_grad_(True) for t in base]
    top, _ = _RowBlocks.apply(n, first, rest, *reps)
    top.sum().backward()
    assert reps[0].grad is None and reps[2].grad is None
    assert torch.equal(reps[1].grad[n:], torch.zeros(5 - n, 4, 3))
    assert torch.equal(reps[1].grad[:n], torch.ones(n, 4, 3))
