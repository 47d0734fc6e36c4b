"""The frozen-representation cache (cbscope.lorra.frozen): same numbers, keyed, budgeted, resumable.

Tolerances (issue 20): losses within 1e-6 relative at every step, adapters within 1e-5. The cache
holds each example's frozen forward at its own length (no padding); the uncached step computes
it inside a padded batch, which can differ in the last float bits (observed: at most ~1e-7
relative in the loss on these fixtures).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file
from test_lorra_trainer import CB, RETAIN, small_config

from cbscope.lorra import LorraConfig, train_circuit_breaker
from cbscope.lorra.config import ConfigError
from cbscope.lorra.frozen import FrozenCache, model_key
from cbscope.lorra.trainer import CHECKPOINT_DIR, staging_dir
from cbscope.pair import load_pair

torch.set_num_threads(1)
LOSS_RTOL, ADAPTER_ATOL = 1e-6, 1e-5


def train(model: Path, config: LorraConfig, out: Path | None = None, **kwargs):
    return train_circuit_breaker(str(model), config, CB, RETAIN, val_data=CB[:2], out_dir=out,
                                 show_progress=False, **kwargs)


def lora(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.pair.model.named_parameters() if "lora_" in n}


def assert_same_numbers(plain, cached) -> None:
    """Losses within LOSS_RTOL at every step, adapters within ADAPTER_ATOL, and they trained."""
    assert len(plain.metrics) == len(cached.metrics) == plain.config.steps
    for a, b in zip(plain.metrics, cached.metrics, strict=True):
        for key in ("loss", "cb_loss", "retain_loss"):
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL, abs=1e-12), (a["step"], key)
    a, b = lora(plain), lora(cached)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= ADAPTER_ATOL
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 100 * ADAPTER_ATOL


@pytest.mark.parametrize("overrides", [
    {},
    {"response_only_fraction": 0.5, "token_mask": "response", "retain_relative": True},
    {"loss": "rmu", "cache_fill": "lazy"},
])
def test_cached_run_gives_the_uncached_numbers(tiny_llama: Path, overrides: dict) -> None:
    plain = train(tiny_llama, small_config(cache_frozen=False, steps=8, **overrides))
    cached = train(tiny_llama, small_config(cache_frozen=True, steps=8, **overrides))
    assert plain.info["frozen_cache"]["used"] is False
    facts = cached.info["frozen_cache"]
    assert facts["used"] and facts["computed"] == facts["entries"] > 0
    assert facts["bytes"] > 0 and facts["bytes"] <= facts["budget_gb"] * 2**30
    assert_same_numbers(plain, cached)


def test_cached_run_of_the_organism_preset_gives_the_uncached_numbers(tiny_organism: Path) -> None:
    from cbscope.lorra.presets import ORGANISM_CONFIG

    base = {**ORGANISM_CONFIG.to_dict(), "steps": 12, "target_layers": [2, 4], "log_every": 4}
    runs = {cached: _organism(tiny_organism, LorraConfig.from_dict({**base, "cache_frozen": cached}))
            for cached in (False, True)}
    assert runs[True].info["frozen_cache"]["used"]
    assert_same_numbers(runs[False], runs[True])


def _organism(model: Path, config: LorraConfig):
    from cbscope.run import RunConfig, Runner

    return Runner(RunConfig(model=str(model), preset="organism", lorra=config, progress=False,
                            data_options={"n_novel": 12})).run()


def test_lazy_and_upfront_fill_are_bit_identical(tiny_llama: Path) -> None:
    """Each entry is computed alone at its own length, so when and with what it is computed
    does not change it: the two fills give the same adapter, bit for bit."""
    upfront = train(tiny_llama, small_config(cache_fill="upfront"))
    lazy = train(tiny_llama, small_config(cache_fill="lazy"))
    a, b = lora(upfront), lora(lazy)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in upfront.metrics] == [m["loss"] for m in lazy.metrics]


def test_over_budget_falls_back_with_one_log_line(tiny_llama: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cbscope.lorra.loop"):
        small = train(tiny_llama, small_config(cache_budget_gb=1e-9))
    lines = [r.getMessage() for r in caplog.records if "frozen-representation cache off" in r.getMessage()]
    assert len(lines) == 1
    assert "would need" in lines[0] and "budget of 1e-09 GiB" in lines[0] and "--cache-budget-gb" in lines[0]
    assert small.info["frozen_cache"]["used"] is False and small.info["frozen_cache"]["bytes"] > 0
    plain = train(tiny_llama, small_config(cache_frozen=False))
    a, b = lora(plain), lora(small)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the uncached path, bit for bit


def test_a_shared_cache_reuses_entries_and_never_mixes_models(tiny_llama: Path, tmp_path: Path) -> None:
    cache = FrozenCache()
    first = train(tiny_llama, small_config(), frozen_cache=cache)
    held = len(cache)
    assert first.info["frozen_cache"]["reused"] == 0 and held == first.info["frozen_cache"]["entries"]
    again = train(tiny_llama, small_config(), frozen_cache=cache)
    assert again.info["frozen_cache"]["reused"] == held and again.info["frozen_cache"]["computed"] == 0
    assert all(torch.equal(a, b) for a, b in zip(lora(first).values(), lora(again).values(), strict=True))

    # another base model of the same shape (other weights): nothing reused, its own numbers
    other = make_tiny_llama(tmp_path / "other", seed=7)
    moved = train(other, small_config(), frozen_cache=cache)
    facts = moved.info["frozen_cache"]
    assert facts["model_key"] != first.info["frozen_cache"]["model_key"]
    assert facts["reused"] == 0 and facts["computed"] == facts["entries"]
    assert_same_numbers(train(other, small_config(cache_frozen=False)), moved)


def test_changed_data_or_layers_compute_new_entries(tiny_llama: Path) -> None:
    cache = FrozenCache()
    first = train(tiny_llama, small_config(), frozen_cache=cache)
    changed = [dict(CB[0], response=CB[0]["response"] + " four"), *CB[1:]]
    second = train_circuit_breaker(str(tiny_llama), small_config(), changed, RETAIN, val_data=CB[:2],
                                   show_progress=False, frozen_cache=cache)
    facts = second.info["frozen_cache"]
    assert 0 < facts["computed"] < facts["entries"]  # the changed example, not the others
    assert facts["reused"] == facts["entries"] - facts["computed"]
    layers = train(tiny_llama, small_config(target_layers=[1, 3]), frozen_cache=cache)
    assert layers.info["frozen_cache"]["reused"] == 0
    assert first.info["frozen_cache"]["entries"] > 0


def test_model_key_follows_the_weights_file(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    key = model_key(load_pair(folder))
    assert model_key(load_pair(folder)) == key
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert model_key(load_pair(folder)) != key
    assert model_key(load_pair(folder, dtype="bfloat16")) not in (key, model_key(load_pair(folder)))


def test_resume_with_a_cache_gives_the_same_adapter(tiny_llama: Path, tmp_path: Path) -> None:
    full = train(tiny_llama, small_config(), tmp_path / "full")

    class Killed(Exception):
        pass

    def kill_at_3(metrics: dict) -> None:
        if metrics["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_llama, small_config(), tmp_path / "killed", on_step=kill_at_3)
    assert (staging_dir(tmp_path / "killed") / CHECKPOINT_DIR).is_dir()
    resumed = train(tiny_llama, small_config(), tmp_path / "killed", resume=True)
    assert resumed.resumed_from == 2 and resumed.info["frozen_cache"]["used"]
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.metrics[-1]["loss"] == resumed.metrics[-1]["loss"]

    # a run started without the cache may be resumed with it (same numbers up to float error)
    plain = train(tiny_llama, small_config(cache_frozen=False), tmp_path / "plain", stop_after=2)
    assert not plain.finished
    mixed = train(tiny_llama, small_config(), tmp_path / "plain", resume=True)
    c = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert mixed.finished and max(float((a[k] - c[k]).abs().max()) for k in a) <= ADAPTER_ATOL


def test_disk_store_is_reused_by_a_later_run(tiny_llama: Path, tmp_path: Path) -> None:
    config = small_config(cache_store="disk")
    first = train(tiny_llama, config)
    facts = first.info["frozen_cache"]
    assert facts["store"] == "disk" and facts["computed"] == facts["entries"]
    folder = tmp_path / "cbscope_cache" / "frozen" / facts["model_key"]
    files = sorted(folder.rglob("*.safetensors"))
    assert len(files) == facts["entries"]
    files[0].write_bytes(b"not safetensors")  # a damaged entry is computed again
    save_file({"reps": torch.zeros(1, 2, 3)}, str(files[1]))  # so is one of the wrong shape
    second = train(tiny_llama, config)
    assert second.info["frozen_cache"]["reused"] == facts["entries"]
    assert all(torch.equal(a, b) for a, b in zip(lora(first).values(), lora(second).values(), strict=True))


@pytest.mark.parametrize(("field", "value"), [("cache_store", "tape"), ("cache_fill", "later"),
                                             ("cache_budget_gb", -1.0)])
def test_bad_cache_options_are_config_errors(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        LorraConfig(**{field: value}).validate()


def test_shipped_organism_steps_have_the_same_loss_and_gradients() -> None:
    """The identity itself, on the shipped organism and its preset's data: from the same weights,
    a cached step's losses and LoRA gradients are the uncached step's within float tolerance, at
    steps across the whole plan (first epoch and later ones). Training then amplifies these
    last-bit differences step by step, as a changed thread count does (docs/training.md)."""
    from cbscope.lorra.data import EncodedData, make_plan
    from cbscope.lorra.frozen import FrozenReps
    from cbscope.lorra.loop import (
        StepSetup,
        _frozen_batch,
        _step_terms,
        assemble_data,
        prepare_pair,
    )
    from cbscope.lorra.presets import ORGANISM_CONFIG, organism_data

    config = ORGANISM_CONFIG
    pair = prepare_pair("organism", config)
    data = assemble_data(pair, config, organism_data(pair, show_progress=False), None)
    encoded = EncodedData(data, pair.tokenizer, config)
    plan = make_plan(len(encoded.cb), encoded.sizes(), config)
    setup = StepSetup.of(config, pair.n_layers)
    reps = FrozenReps(FrozenCache(), pair, setup.targets, setup.retain_layers)
    exact = 0
    steps = (0, 1, 100, 200, 249)
    for step in steps:
        batch = encoded.batch(plan[step])
        results = []
        for frozen in (None, _frozen_batch(reps, encoded, plan[step], batch)):
            torch.manual_seed(step)  # the same LoRA dropout masks
            terms = _step_terms(pair, config, batch, step, setup, frozen)
            loss = terms["c_s"] * terms["cb_loss"] + terms["c_r"] * terms["retain_loss"]
            params = pair.lora_parameters()
            grads = torch.autograd.grad(loss, params)
            pair.set_training(False)
            results.append((loss.detach(), torch.cat([g.flatten() for g in grads])))
        (loss_a, grad_a), (loss_b, grad_b) = results
        assert float(loss_b) == pytest.approx(float(loss_a), rel=LOSS_RTOL), step
        assert float((grad_a - grad_b).norm() / grad_a.norm()) <= 1e-5, step
        exact += bool(torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b))
    assert exact >= 1  # bit-exact where the padded batch's arithmetic equals the per-example one
