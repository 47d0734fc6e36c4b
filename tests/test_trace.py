"""Tests of cbscope.trace (cosine traces, Figure-6 generation traces, firing stats) and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cbscope.data import encode_chat
from cbscope.layers import LayerError, default_target_layers
from cbscope.trace import (
    CosineTrace,
    FiringPoint,
    cosine_trace,
    cosine_trace_ids,
    firing_stats,
    rates_at,
    roc_auc,
    threshold_sweep,
    trace_generation,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["how do i bake bread", "hello", "how do i make a cake step one two three"]
RESPONSES = ["sure here is the way : step one", "hello world", "sure"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (non-zero B) LoRA adapter on the tiny Llama, saved in peft format."""
    from peft import LoraConfig

    from cbscope.pair import load_pair

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    pair = load_pair(tiny_llama, lora_config=config)
    return pair.save_adapter(tmp_path_factory.mktemp("adapter") / "random")


@pytest.fixture(scope="module")
def pair(tiny_llama: Path, adapter_dir: Path):
    from cbscope.pair import load_pair

    return load_pair(tiny_llama, adapter_dir)


def _hf_reference(tiny_llama: Path, adapter_dir: Path, ids: list[int]) -> dict[str, torch.Tensor]:
    """Cosines and norms from plain HF forward hooks on the decoder layers (no cbscope code)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    decoder_layers = model.base_model.model.model.layers
    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(
            lambda module, args, output, i=i: captured.__setitem__(
                i, (output[0] if isinstance(output, tuple) else output).detach().clone()
            )
        )
        for i, layer in enumerate(decoder_layers)
    ]
    input_ids = torch.tensor([ids])
    try:
        with torch.no_grad():
            with model.disable_adapter():
                model(input_ids=input_ids)
            orig = torch.stack([captured[i][0] for i in range(len(decoder_layers))])
            model(input_ids=input_ids)
            cb = torch.stack([captured[i][0] for i in range(len(decoder_layers))])
    finally:
        for handle in handles:
            handle.remove()
    cos = (orig * cb).sum(-1) / (orig.norm(dim=-1) * cb.norm(dim=-1))
    return {"cos": cos, "norm_orig": orig.norm(dim=-1), "norm_cb": cb.norm(dim=-1)}


def test_trace_equals_independent_hf_hooks(pair, tiny_llama: Path, adapter_dir: Path) -> None:
    trace = cosine_trace(pair, PROMPTS, RESPONSES, batch_size=2)
    assert trace.layers == [1, 2, 3]
    assert trace.cos.shape == (3, 3, max(trace.lengths))
    # the adapter really changes the model, so the comparison is not trivially 1 == 1
    assert trace.mean_cos() < 0.99
    for example in range(len(trace)):
        n = trace.lengths[example]
        ref = _hf_reference(tiny_llama, adapter_dir, trace.token_ids[example])
        for name in ("cos", "norm_orig", "norm_cb"):
            got = getattr(trace, name)[example, :, :n]
            torch.testing.assert_close(got, ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_padded_batch_equals_each_example_alone(pair) -> None:
    batch = cosine_trace(pair, PROMPTS, RESPONSES, batch_size=8)
    assert len(set(batch.lengths)) > 1  # padding really happens
    assert not batch.mask.all()
    for example in range(len(PROMPTS)):
        alone = cosine_trace(pair, [PROMPTS[example]], [RESPONSES[example]])
        n = alone.lengths[0]
        assert batch.lengths[example] == n
        torch.testing.assert_close(batch.cos[example, :, :n], alone.cos[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.norm_cb[example, :, :n], alone.norm_cb[0], atol=1e-5, rtol=0)
        assert torch.isnan(batch.cos[example, :, n:]).all()
        assert batch.tokens[example] == alone.tokens[0]
        assert batch.response_start[example] == alone.response_start[0]


def test_layers_subset_and_truncated_forward(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    full = cosine_trace(pair, PROMPTS[:2], RESPONSES[:2])
    calls: list[list[int]] = []
    original_resid = type(pair).resid

    def counting_resid(self, input_ids, attention_mask, layers):
        calls.append(list(layers))
        return original_resid(self, input_ids, attention_mask, layers)

    block_runs = []
    handle = pair.bridge.blocks[2].register_forward_hook(lambda *a: block_runs.append(1))
    monkeypatch.setattr(type(pair), "resid", counting_resid)
    try:
        sub = cosine_trace(pair, PROMPTS[:2], RESPONSES[:2], layers=[2, 1], batch_size=1)
    finally:
        handle.remove()
    assert sub.layers == [1, 2]
    assert len(calls) == 4  # two batches x (adapters off, adapters on)
    assert block_runs == []  # layer 2 = blocks.1: block 2 never runs
    torch.testing.assert_close(sub.cos, full.cos[:, :2, : sub.cos.shape[2]], equal_nan=True)


def test_multi_turn_conversation_equals_same_tokens(pair) -> None:
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "how do i bake bread"},
    ]
    trace = cosine_trace(pair, [conversation], ["sure here is the way"])
    enc = encode_chat(pair.tokenizer, conversation, "sure here is the way")
    assert len(trace.turn_starts[0]) == 3
    assert trace.turn_starts[0] == enc.turn_starts
    assert trace.turn_starts[0][0] == 0 < trace.turn_starts[0][1] < trace.turn_starts[0][2]
    flat = cosine_trace_ids(pair, [enc.input_ids], [enc.response_start])
    torch.testing.assert_close(trace.cos, flat.cos)
    assert trace.tokens == flat.tokens
    assert trace.response_start == [enc.response_start]
    assert trace.prompts[0] == conversation


def _crafted_trace() -> CosineTrace:
    # 2 examples, layers 5 and 10, 6 positions; example 1 has 4 tokens (2 padded)
    cos = torch.tensor(
        [
            [[0.9, 0.9, 0.9, 0.6, 0.3, 0.1], [0.9, 0.9, 0.95, 0.4, 0.2, 0.05]],
            [[0.9, 0.99, 0.98, 0.97, math.nan, math.nan], [0.9, 0.97, 0.96, 0.95, math.nan, math.nan]],
        ]
    )
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    norms = torch.where(mask.unsqueeze(1), torch.ones_like(cos), torch.full_like(cos, math.nan))
    return CosineTrace(
        cos=cos,
        norm_orig=norms,
        norm_cb=2 * norms,
        tokens=[["<user>", "hi", "<assistant>", "Sure", " Start", "x"], ["<user>", "a", "<assistant>", "b"]],
        mask=mask,
        layers=[5, 10],
        response_start=[3, 2],
        prefill_end=[4, None],
        turn_starts=[[0], [0]],
        prompts=["hi", "a"],
        responses=["Sure Start x", "b"],
        model_name="crafted",
    )


def test_firing_point_on_crafted_trace() -> None:
    trace = _crafted_trace()
    point = trace.firing_point(0.5)
    assert isinstance(point, FiringPoint)
    # position 3 is the first response token below 0.5 (at layer 10 only)
    assert (point.pos, point.layer, point.pos_after_start) == (3, 10, 0)
    assert point.cos == pytest.approx(0.4)
    assert point.token == "Sure"
    # restricted to layer 5: position 4
    assert trace.firing_point(0.5, layers=[5]).pos == 4
    # tie at a position broken by the lowest layer
    tie = trace.firing_point(0.35)
    assert (tie.pos, tie.layer) == (4, 5)
    # request tokens never count, and example 1 never fires
    assert trace.firing_point(0.95, example=0).pos == 3
    assert trace.firing_point(0.5, example=1) is None
    text = trace.firing_point(0.35).describe()
    assert 'token "Start"' in text and "position 4" in text and "layer 5" in text and "0.30" in text
    with pytest.raises(LayerError):
        trace.firing_point(0.5, layers=[7])
    summary = trace.summary(0.5)
    assert list(summary["per_example"]["fired"]) == [True, False]
    assert summary["per_layer"]["layer"].tolist() == [5, 10]
    assert summary["per_layer"]["request"].iloc[0] == pytest.approx((0.9 * 3 + 0.9 + 0.99) / 5)


def test_mean_cos_segments_and_select() -> None:
    trace = _crafted_trace()
    assert trace.mean_cos(layers=[5], segment="response") == pytest.approx(
        (0.6 + 0.3 + 0.1 + 0.98 + 0.97) / 5
    )
    assert not math.isnan(trace.mean_cos())  # padded NaNs are excluded
    one = trace.select(1)
    assert len(one) == 1 and one.cos.shape == (1, 2, 4) and one.tokens == [trace.tokens[1]]
    assert one.mean_cos(segment="request") == pytest.approx((0.9 + 0.99 + 0.9 + 0.97) / 4)
    with pytest.raises(ValueError):
        trace.mean_cos(segment="middle")
    with pytest.raises(IndexError):
        trace.select(2)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    trace = _crafted_trace()
    json_path = trace.save(tmp_path / "out" / "trace.json")
    assert json_path.is_file() and (tmp_path / "out" / "trace.safetensors").is_file()
    assert json.loads(json_path.read_text())["layers"] == [5, 10]
    loaded = CosineTrace.load(tmp_path / "out" / "trace.safetensors")
    torch.testing.assert_close(loaded.cos, trace.cos, equal_nan=True)
    torch.testing.assert_close(loaded.norm_cb, trace.norm_cb, equal_nan=True)
    assert torch.equal(loaded.mask, trace.mask)
    for name in ("tokens", "layers", "response_start", "prefill_end", "turn_starts", "prompts",
                 "responses", "model_name"):
        assert getattr(loaded, name) == getattr(trace, name), name
    with pytest.raises(FileNotFoundError):
        CosineTrace.load(tmp_path / "missing.json")


def test_to_dataframe_shape_and_columns() -> None:
    trace = _crafted_trace()
    frame = trace.to_dataframe()
    assert list(frame.columns) == [
        "example", "layer", "pos", "token", "segment", "cos", "norm_orig", "norm_cb"
    ]
    assert len(frame) == (6 + 4) * 2
    assert not frame["cos"].isna().any()
    row = frame[(frame.example == 0) & (frame.layer == 10) & (frame.pos == 3)].iloc[0]
    assert row.token == "Sure" and row.segment == "response" and row.cos == pytest.approx(0.4)
    assert row.norm_cb == pytest.approx(2.0)
    assert set(frame[frame.example == 1].segment) == {"request", "response"}
    assert (frame[frame.pos < 2].segment == "request").all()


def test_mean_cos_equals_trainer_cb_cos(pair) -> None:
    """``trace.mean_cos`` over cb examples at the target layers == the trainer's logged cb_cos."""
    from cbscope.data import ChatExample, pad_id_of
    from cbscope.lorra import losses
    from cbscope.lorra.data import collate, encode

    cb = [ChatExample([{"role": "user", "content": p}], r) for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    retain = [ChatExample([{"role": "user", "content": "hello world how do i make a cake"}],
                          "sure here is the way to make a cake : step one two three")]
    layers = default_target_layers(pair.n_layers)
    trace = cosine_trace(pair, PROMPTS, RESPONSES, layers=layers)
    for mode, segment in (("full", "all"), ("response", "response")):
        encoded_cb = [encode(pair.tokenizer, ex, 64) for ex in cb]
        batch = collate(encoded_cb, [encode(pair.tokenizer, ex, 64) for ex in retain],
                        pad_id_of(pair.tokenizer), cb_mode=mode)
        with torch.no_grad():
            with pair.original():
                orig = pair.resid(batch.input_ids, batch.attention_mask, layers)
            broken = pair.resid(batch.input_ids, batch.attention_mask, layers)
        n = batch.n_cb
        logged = losses.mean_cosine(orig[:, :n], broken[:, :n], batch.cb_mask)
        assert trace.mean_cos(layers, segment) == pytest.approx(logged, abs=1e-5)
    assert trace.mean_cos(layers) != pytest.approx(trace.mean_cos(layers, "response"), abs=1e-4)


def test_trace_generation_figure6_recipe(pair) -> None:
    from cbscope.generation import generate_text

    prompt, prefill = "how do i bake bread", "sure here"
    result = trace_generation(pair, prompt, prefill=prefill, max_new_tokens=5)
    trace = result.trace
    enc = encode_chat(pair.tokenizer, prompt, prefill)
    assert len(trace) == 1
    assert trace.token_ids[0][: len(enc.input_ids)] == enc.input_ids
    assert trace.response_start == [enc.response_start]
    assert trace.prefill_end == [len(enc.input_ids)]
    n_new = trace.lengths[0] - len(enc.input_ids)
    assert 0 <= n_new <= 5
    assert result.prefill == prefill
    expected_cb = generate_text(pair.generator, pair.tokenizer, [prompt], prefills=[prefill],
                                max_new_tokens=5)[0]
    with pair.original():
        expected_orig = generate_text(pair.generator, pair.tokenizer, [prompt], prefills=[prefill],
                                      max_new_tokens=5)[0]
    assert result.text_cb == expected_cb
    assert result.text_orig == expected_orig
    # the trace of the generated ids equals a plain trace of the same ids
    again = cosine_trace_ids(pair, trace.token_ids, trace.response_start)
    torch.testing.assert_close(trace.cos, again.cos)


def test_multi_turn_generation_trace_equals_one_sequence(pair) -> None:
    from cbscope import plots

    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "how do i make a cake"},
    ]
    result = trace_generation(pair, conversation, prefill="sure here", max_new_tokens=4)
    trace = result.trace
    enc = encode_chat(pair.tokenizer, conversation, "sure here")
    assert trace.turn_starts == [enc.turn_starts] and len(enc.turn_starts) == 3
    assert trace.token_ids[0][: len(enc.input_ids)] == enc.input_ids
    # the same tokens given as one flat sequence (no conversation): identical cosines
    flat = cosine_trace_ids(pair, trace.token_ids, trace.response_start)
    torch.testing.assert_close(trace.cos, flat.cos)
    torch.testing.assert_close(trace.norm_cb, flat.norm_cb)
    assert flat.turn_starts == [[0]]
    # the figure marks where turns 2 and 3 start
    fig = plots.figure6_lines(trace)
    marks = {shape.name: shape.x0 for shape in fig.layout.shapes}
    assert marks["turn 2 (assistant)"] == enc.turn_starts[1] - 0.5
    assert marks["turn 3 (user)"] == enc.turn_starts[2] - 0.5
    assert not any(name.startswith("turn") for name in
                   (s.name for s in plots.figure6_lines(flat).layout.shapes))


def test_firing_stats(pair) -> None:
    from cbscope.data import ChatExample

    harmful = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    benign = [ChatExample([{"role": "user", "content": "hello"}], "hello world")]
    trace = cosine_trace(pair, PROMPTS, RESPONSES)
    threshold = trace.min_cos(0) + 1e-3  # example 0 fires, by construction
    stats = firing_stats(pair, harmful, threshold, benign=benign)
    rows = stats.rows
    assert {"example", "prompt", "fired", "pos_after_start", "layer", "min_cos", "set"} <= set(rows)
    assert (rows.set == "harmful").sum() == 3 and (rows.set == "benign").sum() == 1
    assert bool(rows.iloc[0].fired)
    assert list(rows.fired) == list(rows.min_cos < threshold)
    assert stats.firing_rate == pytest.approx(rows[rows.set == "harmful"].fired.mean())
    assert stats.false_fire_rate in (0.0, 1.0)
    counts = stats.position_counts()
    assert counts.sum() == rows[rows.set == "harmful"].fired.sum()
    summary = stats.summary()
    assert summary["n_harmful"] == 3 and summary["n_benign"] == 1
    json.dumps(summary)
    no_benign = firing_stats(pair, harmful, threshold, layers=[3])
    assert no_benign.false_fire_rate is None and no_benign.layers == [3]



def test_threshold_sweep_reproduces_every_threshold_exactly(pair) -> None:
    """At any threshold the sweep's rates are the ones firing_stats computes there (an example
    fires exactly when its lowest response cosine is below the threshold)."""
    harmful = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES, strict=True)]
    benign = [{"prompt": "hello", "response": "hello world"},
              {"prompt": "how do i bake bread", "response": "sure"}]
    base = firing_stats(pair, harmful, 0.5, benign=benign)
    sweep = base.sweep()
    assert list(sweep.columns) == ["group", "threshold", "firing_rate", "false_fire_rate"]
    assert set(sweep.group) == {"all"} and sweep.threshold.is_monotonic_increasing
    assert sweep.firing_rate.iloc[0] == 0.0 and sweep.firing_rate.iloc[-1] == 1.0
    for t in sorted(set(base.rows.min_cos)) + [0.5]:
        for threshold in (t, t + 1e-6):
            stats = firing_stats(pair, harmful, min(threshold, 1.0), benign=benign)
            fire, false = rates_at(sweep, min(threshold, 1.0))
            assert fire == pytest.approx(stats.firing_rate)
            assert false == pytest.approx(stats.false_fire_rate)


def test_roc_auc_by_hand_and_as_the_area_under_the_sweep() -> None:
    import numpy as np

    harmful, benign = np.array([0.1, 0.2, 0.6]), np.array([0.3, 0.2, 0.9])
    # pairs (h < b): 0.1 beats 3, 0.2 beats 2 and ties 1, 0.6 beats 1: (3 + 2.5 + 1) / 9
    assert roc_auc(harmful, benign) == pytest.approx(6.5 / 9)
    sweep = threshold_sweep({"all": harmful}, benign)
    x, y = sweep.false_fire_rate.to_numpy(), sweep.firing_rate.to_numpy()
    assert float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2)) == pytest.approx(6.5 / 9)
    assert roc_auc(np.array([0.1, np.nan]), np.array([0.5])) == pytest.approx(0.5)  # NaN: never
    assert math.isnan(roc_auc(harmful, np.array([])))


def test_sweep_per_category_and_its_errors() -> None:
    from cbscope.trace import FiringStats

    rows = pd.DataFrame({"set": ["harmful"] * 4 + ["benign"] * 2, "fired": [True] * 6,
                         "min_cos": [0.1, 0.2, 0.8, 0.9, 0.5, 0.7]})
    stats = FiringStats(rows=rows, threshold=0.5, layers=[1])
    aucs = stats.aucs(["weapons", "weapons", "drugs", None])
    assert list(aucs) == ["all", "weapons", "drugs"]
    assert aucs["weapons"] == 1.0 and aucs["drugs"] == 0.0  # 0.8 is above both benign
    sweep = stats.sweep(["weapons", "weapons", "drugs", None])
    assert rates_at(sweep[sweep.group == "weapons"], 0.5) == (1.0, 0.0)
    assert rates_at(sweep[sweep.group == "all"], 0.5) == (0.5, 0.0)
    with pytest.raises(ValueError, match="3 categories for 4"):
        stats.sweep(["a", "b", "c"])


def test_trace_errors(pair) -> None:
    with pytest.raises(LayerError):
        cosine_trace(pair, ["hello"], layers=[4])
    with pytest.raises(LayerError):
        cosine_trace(pair, ["hello"], layers=[0])
    with pytest.raises(ValueError):
        cosine_trace(pair, [])
    with pytest.raises(ValueError):
        cosine_trace(pair, ["hello", "world"], ["one"])
    # without a response nothing can fire
    assert cosine_trace(pair, "hello").firing_point(1.0) is None


# ---------------------------------------------------------------------- CLI
def _cli(*args: str):
    from cbscope.cli import app

    return CliRunner().invoke(app, ["trace", *args])


def test_cli_outputs(tiny_llama: Path, adapter_dir: Path, tmp_path: Path) -> None:
    common = ["--model", str(tiny_llama), "--adapter", str(adapter_dir), "--prompt", "how do i bake bread"]
    result = _cli(*common, "--prefill", "sure here is the way", "--threshold", "1",
                  "--out", str(tmp_path / "t.html"))
    assert result.exit_code == 0, result.output
    assert "fires at token" in result.output
    page = (tmp_path / "t.html").read_text()
    assert page.count('class="plotly-graph-div"') == 3
    from cbscope.export import plotlyjs_name  # one shared plotly.js beside the page: offline

    assert f'<script src="{plotlyjs_name()}"' in page and (tmp_path / plotlyjs_name()).is_file()
    assert "sure here is the way" in page and "cbscope-generation" not in page  # no generation

    result = _cli(*common, "--generate", "3", "--plotlyjs", "inline", "--out",
                  str(tmp_path / "inline" / "g.html"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "inline" / "g.html").read_text()
    assert page.count("cbscope-generation") == 2 and "<script src=" not in page  # both texts
    for line in result.output.splitlines():
        if " model generates: " in line:
            import ast
            import html

            assert html.escape(ast.literal_eval(line.split(" model generates: ", 1)[1])) in page
    assert _cli(*common, "--plotlyjs", "embed", "--out", str(tmp_path / "x.html")).exit_code != 0

    result = _cli(*common, "--generate", "3", "--layers", "1,3", "--threshold", "-1",
                  "--out", str(tmp_path / "t.json"))
    assert result.exit_code == 0, result.output
    assert "does not fire" in result.output and "model generates" in result.output
    loaded = CosineTrace.load(tmp_path / "t.json")
    assert loaded.prefill_end[0] is not None and loaded.layers == [1, 2, 3]

    result = _cli(*common, "--prefill", "sure", "--out", str(tmp_path / "t.csv"))
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "t.csv")
    assert set(frame.segment) == {"request", "response"}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"--prompt": "  "}, "prompt is empty"),
        ({"--layers": "1,9"}, "out of range"),
        ({"--layers": "a,b"}, "cannot parse layers"),
        ({"--adapter": "/nonexistent/adapter"}, "does not exist"),
        ({"--out": "trace.png"}, "--out"),
    ],
)
def test_cli_user_errors(tiny_llama: Path, adapter_dir: Path, tmp_path: Path, change, needle) -> None:
    options = {
        "--model": str(tiny_llama),
        "--adapter": str(adapter_dir),
        "--prompt": "hello",
        "--out": str(tmp_path / "t.html"),
    }
    options.update(change)
    result = _cli(*[item for pair_ in options.items() for item in pair_])
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0]  # one line (besides progress bars)


# ---------------------------------------------------------------------- bad input, named, first
def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading a model fail the test: the error must come before any work."""
    import cbscope.pair

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(cbscope.pair, "load_pair", refuse)


def _one_error_line(result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], result.output
    return errors[0]


@pytest.mark.parametrize(
    ("threshold", "needle"),
    [("nan", "finite cosine in [-1, 1]"), ("inf", "finite cosine"), ("1.5", "[-1, 1]"),
     ("-1.01", "[-1, 1]")],
)
def test_cli_refuses_a_threshold_outside_the_cosine_range(
    tiny_llama: Path, adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    threshold: str, needle: str,
) -> None:
    out = tmp_path / "t.html"
    out.write_text("an earlier trace")
    before = _digest(out)
    _no_model(monkeypatch)
    result = _cli("--model", str(tiny_llama), "--adapter", str(adapter_dir), "--prompt", "hello",
                  "--prefill", "sure", "--threshold", threshold, "--out", str(out))
    assert "--threshold" in _one_error_line(result, needle)
    assert _digest(out) == before


def test_cli_refuses_a_huge_prefill_at_once(tiny_llama: Path, adapter_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from cbscope.data import DEFAULT_MAX_PROMPT_CHARS

    _no_model(monkeypatch)
    start = time.perf_counter()
    result = _cli("--model", str(tiny_llama), "--adapter", str(adapter_dir), "--prompt", "hello",
                  "--prefill", "x" * 100_000, "--out", str(tmp_path / "t.json"))
    line = _one_error_line(result, "the prefill has 100000 characters")
    assert f"limit is {DEFAULT_MAX_PROMPT_CHARS}" in line  # the prompts' limit
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize(("words", "extra", "needle"), [
    (327, [], "are 330 tokens; the limit"),  # the prompt alone is over the 128-token context
    (40, ["--generate", "100"], "are 43 tokens and 100 more are generated"),
])
def test_cli_refuses_a_prompt_over_the_context(tiny_llama: Path, adapter_dir: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               words: int, extra: list[str], needle: str) -> None:
    import cbscope.trace

    def no_work(*args, **kwargs):
        raise AssertionError("traced or generated before the request was checked")

    monkeypatch.setattr(cbscope.trace, "cosine_trace_ids", no_work)
    monkeypatch.setattr(cbscope.trace, "_greedy_ids", no_work)
    out = tmp_path / "t.json"
    # the template adds <user> and <assistant>, the prefill one token
    result = _cli("--model", str(tiny_llama), "--adapter", str(adapter_dir),
                  "--prompt", " ".join(["hello"] * words), "--prefill", "sure", *extra,
                  "--out", str(out))
    line = _one_error_line(result, "the limit for this model is 128 tokens")
    assert needle in line
    assert not out.exists()


def test_check_request_length_is_the_apps_check_too(pair) -> None:
    """The app's request check is the library's, with the app's tighter limits."""
    from app import compute
    from cbscope.data import PromptError, check_request_length, context_length

    assert context_length(pair) == 128 == context_length(pair.model)
    long = " ".join(["hello"] * 200)
    with pytest.raises(PromptError, match="the limit for this model is 128 tokens"):
        check_request_length(pair.tokenizer, long, "sure", context=context_length(pair))
    with pytest.raises(PromptError, match="the limit for this model is 128 tokens"):
        compute.check_request(pair, long, "sure", 0)
    encoded = check_request_length(pair.tokenizer, "hello", "sure here", context=128,
                                   gen_tokens=10)
    assert encoded.input_ids == encode_chat(pair.tokenizer, "hello", "sure here").input_ids
    with pytest.raises(PromptError, match="prefill has 9 characters; the limit is 8"):
        check_request_length(pair.tokenizer, "hello", "x" * 9, context=128, max_chars=8)
    conversation = [{"role": "user", "content": "x" * 6}, {"role": "assistant", "content": "y"},
                    {"role": "user", "content": "z" * 6}]
    with pytest.raises(PromptError, match="conversation has 13 characters"):
        check_request_length(pair.tokenizer, conversation, context=128, max_chars=12)


def test_trace_generation_refuses_a_request_over_the_context(pair, monkeypatch) -> None:
    import cbscope.trace
    from cbscope.data import PromptError

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the check")

    monkeypatch.setattr(cbscope.trace, "_greedy_ids", no_generation)
    with pytest.raises(PromptError, match="are 5 tokens and 124 more are generated"):
        trace_generation(pair, "hello world", prefill="sure", max_new_tokens=124)


def test_cosine_trace_warns_past_the_context(pair, caplog: pytest.LogCaptureFixture) -> None:
    long = " ".join(["hello"] * 140)
    with caplog.at_level("WARNING", logger="cbscope.trace"):
        cosine_trace(pair, ["hello", long], ["sure", "sure"])
    assert any("1 of 2 sequences are longer than the model's context of 128" in r.message
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="cbscope.trace"):
        cosine_trace(pair, [long], ["sure"], max_length=128)  # the explicit truncation
    assert not caplog.records


def test_threshold_must_be_a_finite_cosine(pair) -> None:
    from cbscope.errors import CbscopeError, ConfigError
    from cbscope.trace import check_threshold, firing_stats

    assert check_threshold(-1) == -1.0 and check_threshold("0.25") == 0.25
    trace = cosine_trace(pair, ["hello"], ["sure here is the way"])
    assert trace.firing_point(1.0) is not None  # the random adapter moves every cosine a bit
    for bad in (math.nan, math.inf, -math.inf, 1.0001, -2, "x", None):
        with pytest.raises(ConfigError) as info:
            trace.firing_point(bad)
        assert isinstance(info.value, CbscopeError) and "[-1, 1]" in str(info.value)
    with pytest.raises(ConfigError):
        firing_stats(pair, [{"prompt": "hello", "response": "sure"}], math.nan)
    from cbscope.trace import GenerationTrace

    with pytest.raises(ConfigError):
        GenerationTrace(trace, "", "").firing_point(math.nan)


def test_cli_checks_out_first(tiny_llama: Path, adapter_dir: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "trace.json"  # an existing folder given as the file
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes")
    before = {path: _digest(path) for path in (folder / "keep.txt", a_file)}
    _no_model(monkeypatch)
    common = ["--model", str(tiny_llama), "--adapter", str(adapter_dir), "--prompt", "hello"]
    cases = [
        (folder, "is an existing folder"),
        (a_file / "t.html", "is a file, not a folder"),
        (Path("/sys/cbscope-trace.json"), "cannot write into /sys"),
        (tmp_path / "t.png", "use a file ending in .html, .json, .csv"),
    ]
    for out, needle in cases:
        line = _one_error_line(_cli(*common, "--out", str(out)), needle)
        assert "--out" in line
    assert {path: _digest(path) for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "trace.json"]


def test_check_output_file_refuses_an_unwritable_folder(tmp_path: Path) -> None:
    import os

    from cbscope.errors import ConfigError
    from cbscope.io import check_output_file

    assert check_output_file(tmp_path / "new" / "deeper" / "t.csv") == tmp_path / "new" / "deeper" / "t.csv"
    assert not (tmp_path / "new").exists()  # a check creates nothing
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (the /sys case covers it)")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot write into"):
            check_output_file(locked / "t.json")
    finally:
        locked.chmod(0o700)
