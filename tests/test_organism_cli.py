"""``cbscope organism build|eval``: bad options are named errors before any work, and a build
never destroys what its ``--out`` held."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner


def _cli(*args: str):
    from cbscope.cli import app

    return CliRunner().invoke(app, ["organism", *args])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.output


@pytest.fixture()
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    import cbscope.organism.build

    def refuse(*args, **kwargs):
        raise AssertionError("the organism was built before the bad option was refused")

    monkeypatch.setattr(cbscope.organism.build, "build_organism", refuse)


def test_build_refuses_an_out_with_other_work(tmp_path: Path, no_build: None) -> None:
    out = tmp_path / "d"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "x").write_text("keep")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p: _digest(p) for p in out.rglob("*") if p.is_file()}
    _one_error(_cli("build", "--out", str(out), "--size", "tiny"),
               "holds checkpoints, metrics.jsonl, not a model organism")
    assert {p: _digest(p) for p in out.rglob("*") if p.is_file()} == before
    a_file = tmp_path / "organism.txt"
    a_file.write_text("notes")
    _one_error(_cli("build", "--out", str(a_file), "--size", "tiny"), "is a file")
    assert a_file.read_text() == "notes"
    _one_error(_cli("build", "--out", str(tmp_path / "new"), "--size", "huge"),
               "--size 'huge': use one of full, tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "organism.txt"]


def test_build_swaps_in_only_a_finished_organism(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import cbscope.organism.build

    out = tmp_path / "organism"

    def fails(folder, **kwargs):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # stopped half way

    monkeypatch.setattr(cbscope.organism.build, "build_organism", fails)
    result = _cli("build", "--out", str(out), "--size", "tiny")
    assert result.exit_code != 0
    assert not out.exists()  # no half organism where the spec would find one


def test_build_tiny_and_rebuild_over_it(tmp_path: Path) -> None:
    out = tmp_path / "organism"
    result = _cli("build", "--out", str(out), "--size", "tiny")
    assert result.exit_code == 0, result.output
    assert (out / "world.json").is_file() and (out / "behaviour.json").is_file()
    weights = _digest(out / "model.safetensors")
    result = _cli("build", "--out", str(out), "--size", "tiny")  # an organism: replaced
    assert result.exit_code == 0, result.output
    assert _digest(out / "model.safetensors") == weights  # deterministic for the seed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["organism"]


def test_eval_checks_out_before_evaluating(tmp_path: Path, tiny_organism: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import cbscope.organism.evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated before --out was checked")

    monkeypatch.setattr(cbscope.organism.evaluate, "evaluate_behaviour", refuse)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes")
    _one_error(_cli("eval", "--model", str(tiny_organism), "--out", str(a_file / "b.json")),
               "is a file, not a folder")
    _one_error(_cli("eval", "--model", str(tmp_path), "--out", str(tmp_path)),
               "is an existing folder")
    assert a_file.read_text() == "notes"
