"""Tests of cbscope.probe: the logistic-regression harmfulness probe (representation reading)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cbscope.layers import LayerError, default_target_layers
from cbscope.probe import (
    HarmProbe,
    calibrate_threshold,
    fit_logistic,
    roc_auc,
    train_harm_probe,
)


@pytest.fixture(scope="module")
def organism(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped organism if present, else the tiny world built here (seconds)."""
    from cbscope.models import is_hf_folder, shipped_organism_dir

    shipped = shipped_organism_dir()
    if is_hf_folder(shipped) and (shipped / "world.json").is_file():
        return shipped
    from cbscope.organism import build_organism

    return Path(build_organism(tmp_path_factory.mktemp("organism"), size="tiny", show_progress=False))


@pytest.fixture(scope="module")
def world(organism: Path):
    from cbscope.organism import World

    return World.from_json(organism / "world.json")


@pytest.fixture(scope="module")
def pair(organism: Path):
    from cbscope.pair import load_pair

    return load_pair(organism)


@pytest.fixture(scope="module")
def probe(pair, world) -> HarmProbe:
    layer = max(default_target_layers(pair.n_layers))
    return train_harm_probe(
        pair,
        world.harmful_examples(templates="train"),
        world.benign_examples("seen", "train"),
        layer,
        fpr=0.05,
    )


def test_probe_separates_harmful_from_benign_response_tokens(pair, world, probe) -> None:
    # held out: the same kinds of topics in request templates the probe never saw
    harmful = world.harmful_examples(templates="jailbreak")
    benign = world.benign_examples("seen", "jailbreak")
    assert probe.auc(pair, harmful, benign) >= 0.95
    assert probe.auc(pair, harmful, benign, level="example") >= 0.95
    assert probe.metrics["train_auc_token"] >= 0.95
    # and flips when the labels are swapped (the AUC is not trivially 1)
    assert probe.auc(pair, benign, harmful) <= 0.05


def test_threshold_is_calibrated_on_benign_examples(pair, world, probe) -> None:
    benign = world.benign_examples("seen", "train")
    flagged = probe.flags(pair, benign)
    assert sum(flagged) / len(flagged) <= probe.fpr + 1e-9
    assert 0.0 < probe.threshold < 1.0
    assert probe.metrics["train_detection_rate"] > 0.5


def test_score_tokens_align_with_the_trace(pair, world, probe) -> None:
    from cbscope.data import encode_chat
    from cbscope.trace import cosine_trace

    example = world.harmful_examples(templates="jailbreak")[0]
    scores = probe.score_tokens(pair, example["prompt"], example["response"])
    trace = cosine_trace(pair, [example["prompt"]], [example["response"]], layers=[1])
    assert scores.shape == (trace.lengths[0],)
    assert ((scores >= 0) & (scores <= 1)).all()
    start = encode_chat(pair.tokenizer, example["prompt"], example["response"]).response_start
    # the same numbers as the batched response-token scores
    batched = probe.score_examples(pair, [example])[0]
    torch.testing.assert_close(scores[start:], batched, atol=1e-5, rtol=0)


def test_save_load_roundtrip(pair, world, probe, tmp_path: Path) -> None:
    path = probe.save(tmp_path / "probe.json")
    assert path.is_file() and (tmp_path / "probe.safetensors").is_file()
    loaded = HarmProbe.load(tmp_path / "probe")
    for name in ("layer", "threshold", "fpr", "calibration", "adapters", "metrics"):
        assert getattr(loaded, name) == getattr(probe, name), name
    example = world.benign_examples("seen", "train")[0]
    torch.testing.assert_close(
        loaded.score_tokens(pair, example["prompt"], example["response"]),
        probe.score_tokens(pair, example["prompt"], example["response"]),
    )
    with pytest.raises(FileNotFoundError):
        HarmProbe.load(tmp_path / "nothing.json")


def test_probe_rejects_bad_input(pair, world) -> None:
    harmful, benign = world.harmful_examples()[:2], world.benign_examples()[:2]
    with pytest.raises(LayerError):
        train_harm_probe(pair, harmful, benign, pair.n_layers + 1)
    with pytest.raises(ValueError):
        train_harm_probe(pair, harmful, [], 1)
    with pytest.raises(ValueError, match="no response tokens"):
        train_harm_probe(pair, [{"prompt": "x", "response": ""}], benign, 1)


def test_roc_auc_matches_pair_counting() -> None:
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (40,), generator=gen).float()
    neg = torch.randint(0, 5, (30,), generator=gen).float() - 1
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert roc_auc(pos, neg) == pytest.approx(float(wins.mean()))
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    with pytest.raises(ValueError):
        roc_auc(torch.tensor([]), torch.tensor([1.0]))


def test_fit_logistic_and_calibration_on_synthetic_data() -> None:
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(8, generator=gen)
    x = torch.randn(400, 8, generator=gen)
    y = (x @ direction > 0).float()
    weight, bias = fit_logistic(x, y, epochs=50)
    accuracy = ((x @ weight + bias > 0).float() == y).float().mean()
    assert accuracy > 0.97
    assert torch.nn.functional.cosine_similarity(weight, direction, dim=0) > 0.9
    scores = [torch.tensor([0.1, 0.2]), torch.tensor([0.9]), torch.tensor([0.3, 0.5]), torch.tensor([0.4])]
    # example level: maxima 0.2, 0.9, 0.5, 0.4; fpr 0.25 lets one benign example through
    assert calibrate_threshold(scores, 0.25, "example") == pytest.approx(0.5)
    assert calibrate_threshold(scores, 0.0, "example") == pytest.approx(0.9)
    # token level: six scores, fpr 0.2 -> one token above
    assert calibrate_threshold(scores, 0.2, "token") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        calibrate_threshold(scores, 1.5)
