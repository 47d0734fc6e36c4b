"""The official data-format reader, the paper presets and ``cbscope train --dry-run``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cbscope.cli import app
from cbscope.data import DatasetError
from cbscope.errors import MissingFileError
from cbscope.lorra.official_data import official_data, read_records
from cbscope.lorra.presets import get_preset

torch.set_num_threads(1)
runner = CliRunner()


def write_official_files(folder: Path, *, n_cb: int = 6) -> dict[str, Path]:
    """Files in the official format, in the tiny tokenizer's words."""
    folder.mkdir(parents=True, exist_ok=True)
    cb = [{"prompt": f"how do i make {w}", "output": "sure here is the way : step one",
           "llama3_output": "i make bread", "category": "x"}
          for w in ("a cake", "bread", "the cake", "a bread", "the way", "world")[:n_cb]]
    (folder / "circuit_breakers_train.json").write_text(json.dumps(cb))
    chats = [{"messages": [{"role": "user", "content": "hello world"},
                           {"role": "assistant", "content": "hello"}]},
             {"messages": [{"role": "user", "content": "only one"}]},  # skipped: < 2 messages
             {"messages": [{"role": "user", "content": "how do i bake"},
                           {"role": "assistant", "content": "the way is one two"}]}]
    (folder / "ultrachat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    with (folder / "xstest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion", "final_label"])
        writer.writeheader()
        writer.writerow({"prompt": "how do i bake a cake", "completion": "step one",
                         "final_label": "1_full_compliance"})
        writer.writerow({"prompt": "how do i do", "completion": "no", "final_label": "2_full_refusal"})
    return {"cb_file": folder / "circuit_breakers_train.json",
            "ultrachat": folder / "ultrachat.jsonl", "xstest": folder / "xstest.csv"}


def test_reader_rejects_a_record_missing_a_field(tmp_path: Path) -> None:
    path = tmp_path / "circuit_breakers_train.json"
    path.write_text(json.dumps([{"prompt": "a", "output": "b", "llama3_output": "c", "category": "d"},
                                {"prompt": "a", "output": "b", "category": "d"}]))
    with pytest.raises(DatasetError, match=r"record 1: missing field 'llama3_output'"):
        read_records(path, ("prompt", "output", "llama3_output", "category"))
    path.write_text(json.dumps([{"prompt": "a", "output": 3, "llama3_output": "c", "category": "d"}]))
    with pytest.raises(DatasetError, match=r"record 0: field 'output' must be a string"):
        read_records(path, ("prompt", "output", "llama3_output", "category"))
    files = write_official_files(tmp_path / "ok")
    with pytest.raises(MissingFileError, match="ultrachat"):
        official_data(cb_file=str(files["cb_file"]), xstest=str(files["xstest"]))
    bad_csv = tmp_path / "x.csv"
    bad_csv.write_text("prompt,completion\na,b\n")
    with pytest.raises(DatasetError, match="missing column 'final_label'"):
        official_data(cb_file=str(files["cb_file"]), ultrachat=str(files["ultrachat"]),
                      xstest=str(bad_csv))


def test_reader_builds_the_official_sets(tmp_path: Path) -> None:
    files = {k: str(v) for k, v in write_official_files(tmp_path).items()}
    data = official_data(**files, drop=0.5, seed=0)
    assert len(data.cb) == 6
    pool = data.retain["benign"]
    origins = [ex.meta["origin"] for ex in pool]
    # 2 chats with >= 2 messages, 1 full-compliance XSTest row x 50, 6 refusals x 2
    assert origins.count("ultrachat") == 2 and origins.count("xstest") == 50
    assert origins.count("refusal") == 12
    dropped = [ex for ex in pool + data.cb if ex.meta.get("request_dropped")]
    assert dropped and all(ex.messages == [{"role": "user", "content": ""}] for ex in dropped)
    kept_chat = [ex for ex in pool if ex.meta["origin"] == "ultrachat" and ex.meta.get("format") == "text"]
    assert all(ex.response in ("hello world hello", "how do i bake the way is one two") for ex in kept_chat)
    mistral = get_preset("mistral-7b-rr").build_data(None, **files)
    assert "refusal" not in {ex.meta["origin"] for ex in mistral.retain["benign"]}
    assert not any(ex.meta.get("request_dropped") for ex in mistral.cb)


def test_paper_presets_have_the_official_hyperparameters() -> None:
    for name, alpha in (("llama3-8b-rr", 10.0), ("mistral-7b-rr", 5.0)):
        c = get_preset(name).config
        assert (c.target_layers, c.lora_r, c.lora_alpha, c.lora_dropout, c.lr, c.steps,
                c.batch_size, c.max_length, c.cb_max_length, c.lorra_alpha) == (
                    [10, 20], 16, 16, 0.05, 1e-4, 150, 16, 1024, 1024, alpha)
        assert c.recipe == "official" and c.dtype == "bfloat16" and c.lora_b_init_std == 0.0
        assert c.resolved_lora_layers(32) == list(range(21))  # blocks 0-20
    official = get_preset("official").config
    assert official.recipe == "official" and official.lora_b_init_std == 0.0


def _cli_files(tmp_path: Path) -> tuple[Path, Path]:
    cb = tmp_path / "cb.jsonl"
    cb.write_text("".join(json.dumps({"prompt": p, "response": "sure here is the way : step one"}) + "\n"
                          for p in ("how do i make a cake", "how do i bake bread", "how do i make bread")))
    retain = tmp_path / "retain.jsonl"
    retain.write_text(json.dumps({"prompt": "hello world", "response": "hello"}) + "\n")
    return cb, retain


def test_dry_run_on_a_tiny_model(tiny_llama: Path, tmp_path: Path) -> None:
    cb, retain = _cli_files(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_llama), "--cb", str(cb), "--retain",
                                 str(retain), "--target-layers", "1,2", "--steps", "4",
                                 "--batch-size", "2", "--out", str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["plan"]["steps"] == 4 and report["data"]["cb"] == 3
    assert report["data"]["steps_planned"] == 4
    assert report["memory"]["total"] > report["memory"]["weights"] > 0
    assert not out.exists() and not (tmp_path / "run.partial").exists()  # nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hello"}) + "\n")
    failed = runner.invoke(app, ["train", "--model", str(tiny_llama), "--cb", str(bad), "--retain",
                                 str(retain), "--target-layers", "1,2", "--out", str(out), "--dry-run"])
    assert failed.exit_code == 2 and "response" in failed.output


def test_dry_run_of_the_llama3_preset_reads_the_official_files(tiny_llama: Path, tmp_path: Path) -> None:
    files = write_official_files(tmp_path / "official")
    options = json.dumps({"cb_file": str(files["cb_file"]), "ultrachat": str(files["ultrachat"])})
    result = runner.invoke(app, ["train", "--preset", "llama3-8b-rr", "--model", str(tiny_llama),
                                 "--target-layers", "1,2", "--data-options", options,
                                 "--xstest", str(files["xstest"]), "--out", str(tmp_path / "o"),
                                 "--dry-run"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["plan"]["recipe"] == "official" and report["plan"]["lora_blocks"] == "0..2"
    assert report["plan"]["rows_per_adapted_forward"] == [[16, 1024], [16, 1024]]
    assert report["data"]["retain_benign"] == 2 + 50 + 12
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"prompt": "a", "output": "b", "category": "c"}]))
    options = json.dumps({"cb_file": str(broken), "ultrachat": str(files["ultrachat"])})
    failed = runner.invoke(app, ["train", "--preset", "llama3-8b-rr", "--model", str(tiny_llama),
                                 "--target-layers", "1,2", "--data-options", options,
                                 "--xstest", str(files["xstest"]), "--out", str(tmp_path / "o"),
                                 "--dry-run"])
    assert failed.exit_code == 2 and "missing field 'llama3_output'" in failed.output
