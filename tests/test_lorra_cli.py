"""``cbscope train``: a run from files, user errors as one line, resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from cbscope.cli import app

torch.set_num_threads(1)
runner = CliRunner()


def _files(tmp_path: Path) -> tuple[Path, Path]:
    cb = tmp_path / "cb.jsonl"
    cb.write_text("".join(
        json.dumps({"prompt": p, "response": "sure here is the way : step one two"}) + "\n"
        for p in ("how do i make a cake", "how do i bake bread", "how do i make bread")
    ))
    retain = tmp_path / "retain.jsonl"
    retain.write_text(
        json.dumps({"prompt": "hello world", "response": "hello"}) + "\n"
        + json.dumps({"prompt": "how do i make a cake", "response": "the way is one",
                      "source": "refusal"}) + "\n"
    )
    return cb, retain


def test_train_from_files(tiny_llama: Path, tmp_path: Path) -> None:
    cb, retain = _files(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama), "--cb", str(cb), "--retain", str(retain),
            "--steps", "3", "--batch-size", "2", "--max-length", "32", "--target-layers", "1,2",
            "--loss", "rr", "--out", str(out), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.output
    assert (out / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "lorra_config.json").read_text())
    assert saved["steps"] == 3 and saved["target_layers"] == [1, 2] and saved["max_length"] == 32
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = runner.invoke(app, [*args, "--resume"])  # a finished run: nothing to resume
    assert again.exit_code == 2 and "holds a finished run" in again.output, again.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_user_errors_are_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    cb, retain = _files(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hello", "response": "hi"}\n{"prompt": "x"}\n')
    result = runner.invoke(app, ["train", "--model", str(tiny_llama), "--cb", str(bad), "--retain",
                                 str(retain), "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 2
    assert "bad.jsonl, line 2: missing field 'response'" in result.output
    assert "Traceback" not in result.output
    bad_layers = runner.invoke(app, ["train", "--model", str(tiny_llama), "--cb", str(cb),
                                     "--retain", str(retain), "--target-layers", "9",
                                     "--out", str(tmp_path / "o")])
    assert bad_layers.exit_code == 2 and "out of range" in bad_layers.output
    no_data = runner.invoke(app, ["train", "--model", str(tiny_llama), "--out", str(tmp_path / "o")])
    assert no_data.exit_code == 2 and "--cb and --retain" in no_data.output
    bad_preset = runner.invoke(app, ["train", "--preset", "nope", "--out", str(tmp_path / "o")])
    assert bad_preset.exit_code == 2 and "unknown preset" in bad_preset.output


def test_preset_data_options(tiny_organism: Path, tmp_path: Path) -> None:
    """``--data-options`` reaches the preset's data builder; unknown keys and bad JSON are named."""
    base = ["train", "--preset", "organism", "--model", str(tiny_organism), "--steps", "2",
            "--target-layers", "2,4",
            "--batch-size", "2", "--no-progress"]
    typo = runner.invoke(app, [*base, "--data-options", '{"noise_word": 4}', "--out", str(tmp_path / "a")])
    assert typo.exit_code == 2 and "unknown --data-options ['noise_word']" in typo.output
    assert "noise_words" in typo.output  # the accepted keys are listed
    bad_json = runner.invoke(app, [*base, "--data-options", "{noise", "--out", str(tmp_path / "b")])
    assert bad_json.exit_code == 2 and "not valid JSON" in bad_json.output
    plain = runner.invoke(app, [*base, "--data-options", '{"n_novel": 0, "noise_words": 0}', "--out", str(tmp_path / "c")])
    noisy = runner.invoke(app, [*base, "--data-options", '{"n_novel": 0, "noise_words": 3}',
                                "--out", str(tmp_path / "d")])
    assert plain.exit_code == 0 and noisy.exit_code == 0, plain.output + noisy.output
    sizes = [json.loads((tmp_path / run / "train_info.json").read_text())["sizes"] for run in "cd"]
    assert sizes[1]["cb"] > sizes[0]["cb"]  # the noisy copies of the harmful requests
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
