"""LoRRA losses against hand-computed values (with padding and masks) and the schedule."""

from __future__ import annotations

import math

import pytest
import torch

from cbscope.lorra import losses

torch.set_num_threads(1)


def _reps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 layers, 1 row, 3 positions (the last is padding), d_model 2."""
    orig = torch.tensor(
        [
            [[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]],
            [[[3.0, 4.0], [1.0, 1.0], [7.0, 7.0]]],
        ]
    )
    broken = torch.tensor(
        [
            [[[1.0, 1.0], [0.0, -3.0], [1.0, -1.0]]],  # cos: 1/sqrt2, -1, (padding)
            [[[3.0, 4.0], [2.0, 0.0], [0.0, 0.0]]],  # cos: 1, 1/sqrt2, (padding, zero norm)
        ]
    )
    mask = torch.tensor([[1, 1, 0]])
    return orig, broken, mask


def test_circuit_breaker_loss_by_hand() -> None:
    orig, broken, mask = _reps()
    s = 1 / math.sqrt(2)
    # relu(cos) over the 4 unmasked (layer, token) cells, divided by layers * tokens = 2 * 2
    expected = (s + 0.0 + 1.0 + s) / 4
    assert losses.circuit_breaker_loss(orig, broken, mask).item() == pytest.approx(expected, abs=1e-6)


def test_official_formula_matches() -> None:
    """(relu(cos) * mask).sum() / mask.sum() with the mask repeated over layers."""
    torch.manual_seed(0)
    orig, broken = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    layer_mask = mask.repeat(2, 1, 1).unsqueeze(-1)
    a = broken / torch.norm(broken, dim=-1, keepdim=True, dtype=torch.float)
    b = orig / torch.norm(orig, dim=-1, keepdim=True, dtype=torch.float)
    official = torch.relu(((a * b) * layer_mask).sum(dim=-1)).sum() / layer_mask.sum()
    ours = losses.circuit_breaker_loss(orig, broken, mask)
    assert ours.item() == pytest.approx(official.item(), abs=1e-6)


def test_retain_loss_by_hand() -> None:
    orig, broken, mask = _reps()
    # |broken - orig|: layer 0: 1, 5; layer 1: 0, sqrt2; padding ignored
    expected = (1.0 + 5.0 + 0.0 + math.sqrt(2)) / 4
    assert losses.retain_loss(orig, broken, mask).item() == pytest.approx(expected, abs=1e-6)


def test_relative_retain_loss_by_hand() -> None:
    orig, broken, mask = _reps()
    # distances 1, 5, 0, sqrt2 divided by |orig| = 1, 2, 5, sqrt2
    expected = (1.0 + 2.5 + 0.0 + 1.0) / 4
    got = losses.retain_loss(orig, broken, mask, relative=True).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_masked_positions_never_count_even_when_nan() -> None:
    orig, broken, mask = _reps()
    broken = broken.clone()
    broken[:, :, 2] = float("nan")
    assert torch.isfinite(losses.circuit_breaker_loss(orig, broken, mask))
    assert torch.isfinite(losses.retain_loss(orig, broken, mask))


def test_rmu_loss_by_hand() -> None:
    _, broken, mask = _reps()
    directions = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # unit: (0,1), (1,0)
    # target layer 0: (0, 2); layer 1: (2, 0) with scale 2
    d = [
        math.dist((1, 1), (0, 2)), math.dist((0, -3), (0, 2)),
        math.dist((3, 4), (2, 0)), math.dist((2, 0), (2, 0)),
    ]
    got = losses.rmu_loss(broken, directions, 2.0, mask).item()
    assert got == pytest.approx(sum(d) / 4, abs=1e-6)
    per_layer = losses.rmu_loss(broken, directions, [2.0, 2.0], mask).item()
    assert per_layer == pytest.approx(got, abs=1e-6)


def test_direction_loss_by_hand() -> None:
    _, broken, mask = _reps()
    directions = torch.tensor([[0.0, 5.0], [1.0, 0.0]])

    def unit(v):
        n = math.hypot(*v)
        return (v[0] / n, v[1] / n)

    d = [
        math.dist(unit((1, 1)), (0, 1)), math.dist(unit((0, -3)), (0, 1)),
        math.dist(unit((3, 4)), (1, 0)), math.dist(unit((2, 0)), (1, 0)),
    ]
    got = losses.direction_loss(broken, directions, mask).item()
    assert got == pytest.approx(sum(d) / 4, abs=1e-6)
    assert d[1] == pytest.approx(2.0)  # opposite direction: the maximum


def test_metrics_helpers() -> None:
    orig, broken, mask = _reps()
    s = 1 / math.sqrt(2)
    assert losses.mean_cosine(orig, broken, mask) == pytest.approx((s - 1 + 1 + s) / 4, abs=1e-6)
    assert losses.mean_norm(orig, mask) == pytest.approx((1 + 2 + 5 + math.sqrt(2)) / 4, abs=1e-6)


def test_gradients_flow_and_vanish_at_the_start() -> None:
    """With identical representations (LoRA B = 0) the cosine gradient is exactly zero."""
    orig = torch.randn(1, 2, 3, 4)
    broken = orig.clone().requires_grad_(True)
    losses.circuit_breaker_loss(orig, broken, torch.ones(2, 3)).backward()
    assert torch.allclose(broken.grad, torch.zeros_like(broken.grad), atol=1e-7)
    moved = (orig + 0.1 * torch.randn_like(orig)).requires_grad_(True)
    losses.circuit_breaker_loss(orig, moved, torch.ones(2, 3)).backward()
    assert moved.grad.abs().sum() > 0


def test_mask_shape_is_checked() -> None:
    orig, broken, _ = _reps()
    with pytest.raises(ValueError, match="mask shape"):
        losses.retain_loss(orig, broken, torch.ones(2, 3))


@pytest.mark.parametrize(
    ("t", "c_s", "c_r"),
    [(0, 10.0, 0.0), (50, 7.5, 2.5), (100, 5.0, 5.0), (150, 5.0, 5.0), (-3, 10.0, 0.0)],
)
def test_schedule(t: int, c_s: float, c_r: float) -> None:
    got = losses.schedule(t, 100, 10.0)
    assert got == pytest.approx((c_s, c_r))


def test_schedule_rejects_zero_steps() -> None:
    with pytest.raises(ValueError):
        losses.schedule(1, 0, 10.0)
