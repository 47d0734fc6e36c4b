"""cbscope.why.direction: the rerouting direction, the refusal direction and the PCA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cbscope.why import ExplainError, encode
from cbscope.why.direction import (
    DirectionReport,
    direction_report,
    end_of_turn_ids,
    pca_states,
    refusal_direction,
    rerouting_directions,
)

BREAKER = Path(__file__).resolve().parents[1] / "cbscope" / "assets" / "organism-breaker"


@pytest.fixture(scope="module")
def organism():
    from cbscope.pair import load_pair

    return load_pair("organism", BREAKER)


@pytest.fixture(scope="module")
def world(organism):
    from cbscope.organism import World

    return World.from_json(Path(organism.resolved.path) / "world.json")


def harmful_seqs(pair, world, n: int = 4):
    topics = world.select("harmful")[:n]
    return [encode(pair, world.render_request(t, world.train_templates[0]), world.answer(t))
            for t in topics]


def test_direction_is_the_mean_delta_and_one_example_is_shared_with_itself(organism, world) -> None:
    from cbscope.why.tokens import resid_at

    seqs = harmful_seqs(organism, world)
    per = rerouting_directions(organism, seqs, [2, 4])
    assert per.shape == (4, 2, organism.d_model)
    seq = seqs[0]
    with organism.original():
        (orig,) = resid_at(organism, seq, [4])
    (cb,) = resid_at(organism, seq, [4])
    expected = (cb - orig)[seq.response_start :].double().mean(0).float()
    torch.testing.assert_close(per[0, 1], expected, atol=1e-5, rtol=1e-5)
    twice = direction_report(organism, [seq, seq], [2, 4])
    assert twice.shared == pytest.approx([1.0, 1.0], abs=1e-6)
    assert all(math.isnan(v) for v in twice.cos_refusal)  # no refusal direction given
    alone = direction_report(organism, [seq], [2])
    assert math.isnan(alone.shared[0])


def test_refusal_direction_and_end_of_turn_cosines(organism, world) -> None:
    template = world.train_templates[0]
    harmful = [world.render_request(t, template) for t in world.select("harmful")[:6]]
    harmless = [world.render_request(t, template) for t in world.select("benign", split="seen")[:6]]
    refusal = refusal_direction(organism, harmful, harmless, [2, 4])
    assert refusal.shape == (2, organism.d_model) and float(refusal.norm()) > 0
    report = direction_report(organism, harmful_seqs(organism, world), [2, 4], refusal=refusal,
                              example=harmful_seqs(organism, world, 5)[-1])
    assert all(-1 <= v <= 1 for v in report.cos_refusal)
    assert set(report.cos_tokens) == set(end_of_turn_ids(organism)) >= {"<eos>", "<end>"}
    assert len(report.example_cos_mean) == 2
    back = DirectionReport.from_dict(report.to_dict())
    assert back.shared == pytest.approx(report.shared, abs=1e-6)
    with pytest.raises(ExplainError, match="harmful and harmless"):
        refusal_direction(organism, harmful, [], [2])


def test_pca_of_harmful_and_benign_states(organism, world) -> None:
    harmful = harmful_seqs(organism, world, 1)[0]
    topic = world.select("benign", split="seen")[0]
    benign = encode(organism, world.render_request(topic, world.train_templates[0]),
                    world.answer(topic))
    pca = pca_states(organism, harmful, benign, 4)
    special = sum(t.startswith("<") for t in harmful.tokens + benign.tokens)
    assert len(pca.x) == 2 * (len(harmful) + len(benign) - special)
    assert set(pca.model) == {"original", "circuit-broken"} and set(pca.set) == {"harmful", "benign"}
    assert 0 < sum(pca.explained) <= 1.0 + 1e-6
    # the breaker moves the harmful response far more than the benign one
    def spread(which: str) -> float:
        pts = {m: [(pca.x[i], pca.y[i]) for i in range(len(pca.x))
                   if pca.set[i] == which and pca.model[i] == m and pca.segment[i] == "response"]
               for m in ("original", "circuit-broken")}
        return sum(math.dist(a, b) for a, b in zip(pts["original"], pts["circuit-broken"],
                                                   strict=True)) / len(pts["original"])
    assert spread("harmful") > 5 * spread("benign")
