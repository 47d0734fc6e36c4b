"""cbscope.lorra.checkpoint: which checkpoints count as good, which are kept, which resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cbscope.errors import ResumeError
from cbscope.lorra import checkpoint as ck


def _fake(folder: Path, step: int, status: str | None = "good", *, corrupt: bool = False) -> Path:
    """A checkpoint on disk as save_checkpoint writes it (one tensor)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = folder / f"step-{step:06d}.safetensors"
    save_file({"lora.x": torch.full((3,), float(step))}, str(tensors))
    meta = {"step": step, "tensors": tensors.name, "tensors_sha256": ck.sha256_file(tensors),
            "config": {"lr": 1e-3, "seed": 1, "log_every": 10}}
    if status is not None:
        meta["status"] = status
    path = folder / f"step-{step:06d}.json"
    path.write_text(json.dumps(meta))
    if corrupt:
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0xFF
        tensors.write_bytes(bytes(data))
    return path


def _steps(folder: Path) -> list[int]:
    return [c.step for c in ck.list_checkpoints(folder)]


def test_prune_keeps_the_newest_and_the_two_newest_good(tmp_path: Path) -> None:
    for step, status in ((1, "good"), (2, "good"), (3, "good"), (4, "bad"), (5, "unconfirmed")):
        _fake(tmp_path, step, status)
    (tmp_path / "step-000006.json.tmp").write_text("{")  # an interrupted write is left alone
    ck.prune(tmp_path)
    assert _steps(tmp_path) == [2, 3, 5]
    assert not (tmp_path / "step-000001.safetensors").exists()
    assert (tmp_path / "step-000006.json.tmp").exists()


def test_find_resumable_falls_back_past_corrupt_bad_and_unreadable(tmp_path: Path) -> None:
    _fake(tmp_path, 2, "good")
    _fake(tmp_path, 4, None)  # written by an older cbscope: no status, counts as unconfirmed
    _fake(tmp_path, 6, "bad")
    _fake(tmp_path, 8, "unconfirmed", corrupt=True)
    (tmp_path / "step-000010.json").write_text("{not json")
    found = ck.find_resumable(tmp_path)
    assert found.checkpoint is not None and found.checkpoint.step == 4
    assert found.checkpoint.status == "unconfirmed"
    reasons = dict(found.skipped)
    assert "unreadable" in reasons["step-000010.json"]
    assert "does not match its hash" in reasons["step-000008.json"]
    assert "marked bad" in reasons["step-000006.json"]
    meta, tensors = ck.latest_checkpoint(tmp_path)
    assert meta["step"] == 4 and torch.equal(tensors["lora.x"], torch.full((3,), 4.0))
    (tmp_path / "step-000004.safetensors").unlink()
    assert ck.find_resumable(tmp_path).checkpoint.step == 2  # missing tensors: the one before


def test_only_a_corrupt_checkpoint_resumes_nothing(tmp_path: Path) -> None:
    _fake(tmp_path, 2, "unconfirmed", corrupt=True)
    found = ck.find_resumable(tmp_path)
    assert found.checkpoint is None and "corrupt or truncated" in found.describe_skipped()
    assert ck.latest_checkpoint(tmp_path) is None


def test_set_status_records_and_prunes(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _fake(tmp_path, step, "good")
    _fake(tmp_path, 4, "unconfirmed")
    ck.set_status(tmp_path, 4, ck.BAD, why="nan")
    meta = json.loads((tmp_path / "step-000004.json").read_text())
    assert meta["status"] == "bad" and meta["why"] == "nan"
    assert meta["tensors_sha256"] == ck.sha256_file(tmp_path / "step-000004.safetensors")
    assert _steps(tmp_path) == [2, 3, 4]
    assert ck.newest_good(tmp_path).step == 3


def test_a_resumed_run_may_lower_the_lr_and_nothing_else(tmp_path: Path) -> None:
    saved = {"lr": 1e-3, "seed": 1, "log_every": 10, "steps": 6}
    assert ck.config_changes(saved, {**saved, "log_every": 1}) == ([], {})
    assert ck.config_changes(saved, {**saved, "lr": 1e-4}) == (
        [], {"lr": {"checkpoint": 1e-3, "now": 1e-4}})
    assert ck.config_changes(saved, {**saved, "lr": 1e-2})[0] == ["lr"]
    assert ck.config_changes(saved, {**saved, "seed": 2, "steps": 7})[0] == ["seed", "steps"]
    _fake(tmp_path, 2)
    (checkpoint,) = ck.list_checkpoints(tmp_path)
    assert ck.check_compatible(checkpoint, {"lr": 1e-4, "seed": 1, "log_every": 1}) == {
        "lr": {"checkpoint": 1e-3, "now": 1e-4}}
    with pytest.raises(ResumeError, match=r"seed: 1 -> 2"):
        ck.check_compatible(checkpoint, {"lr": 1e-3, "seed": 2, "log_every": 10})
    with pytest.raises(ResumeError, match="may only lower lr"):
        ck.check_compatible(checkpoint, {"lr": 1e-2, "seed": 1, "log_every": 10})


def test_loss_limit() -> None:
    assert ck.loss_limit(None) == math.inf
    assert ck.loss_limit(0.0) == ck.EXPLOSION_FACTOR  # a tiny first loss is floored at 1
    assert ck.loss_limit(10.0) == 10 * ck.EXPLOSION_FACTOR
    assert ck.loss_limit(float("nan")) == math.inf
