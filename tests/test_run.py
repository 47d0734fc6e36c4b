"""cbscope.run: the runner never destroys work, and every bad input is a named error, exit 2.

Each case of the issue's "Why" list that concerns training runs is here: the named error (exit
code 2 on the command line, one line, no traceback) and, where there were files before, every
file's sha256 unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cbscope.cli import app
from cbscope.errors import (
    AdapterMismatchError,
    ConfigError,
    DatasetError,
    MissingFileError,
    NonFiniteLossError,
    ResumeError,
)
from cbscope.lorra import LorraConfig, train_circuit_breaker
from cbscope.lorra.checkpoint import CHECKPOINT_DIR, list_checkpoints
from cbscope.lorra.outputs import staging_dir
from cbscope.run import RunConfig, Runner, field_docs

torch.set_num_threads(1)
runner = CliRunner()
ADAPTER = "adapter_model.safetensors"
CB = [
    {"prompt": "how do i make a cake", "response": "sure here is the way : step one two three"},
    {"prompt": "how do i bake bread", "response": "sure here is the way : step two three one"},
    {"prompt": "how do i make bread", "response": "sure here is the way : step three one"},
    {"prompt": "how do i bake a cake", "response": "sure here is the way : step one"},
]
RETAIN = [
    {"prompt": "hello world", "response": "hello"},
    {"prompt": "hello", "response": "hello world how"},
    {"prompt": "how do i make a cake", "response": "here is the way : one", "source": "refusal"},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    return _jsonl(tmp_path / "cb.jsonl", CB), _jsonl(tmp_path / "retain.jsonl", RETAIN)


def _args(model: Path, files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    cb, retain = files
    return ["train", "--model", str(model), "--cb", str(cb), "--retain", str(retain),
            "--out", str(out), "--steps", "4", "--batch-size", "2", "--max-length", "32",
            "--target-layers", "1,2", "--lora-r", "4", "--lr", "5e-3", "--val-size", "0",
            "--log-every", "2", "--checkpoint-every", "2", "--no-progress", *extra]


def hashes(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders (and of a file given as a folder)."""
    out = {}
    for folder in folders:
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for path in paths:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def fails(args: list[str], match: str) -> str:
    """Run the CLI; assert a one-line named error (exit 2) matching ``match``."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(match, errors[0]), result.output
    assert "Traceback" not in result.output
    return errors[0]


@pytest.fixture()
def finished(tiny_llama: Path, files: tuple[Path, Path], tmp_path: Path) -> Path:
    """A finished run."""
    out = tmp_path / "done"
    result = runner.invoke(app, _args(tiny_llama, files, out))
    assert result.exit_code == 0, result.output
    assert (out / ADAPTER).is_file() and (out / "metrics.jsonl").stat().st_size > 0
    return out


# ---------------------------------------------------------------------- outputs never destroy work
def test_out_with_other_files_is_refused_then_overwritten(tiny_llama: Path, files, tmp_path: Path) -> None:
    out = tmp_path / "d"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "x").write_text("keep\n")
    (out / "notes.txt").write_text("mine\n")
    before = hashes(out)
    fails(_args(tiny_llama, files, out), r"holds files that are not a cbscope run's: "
          r"checkpoints/x, notes\.txt.*--overwrite")
    assert hashes(out) == before and not staging_dir(out).exists()
    result = runner.invoke(app, _args(tiny_llama, files, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (out / ADAPTER).is_file() and not (out / "notes.txt").exists()


def test_failing_rerun_into_a_finished_run_changes_nothing(tiny_llama: Path, files, finished: Path) -> None:
    before = hashes(finished)
    fails(_args(tiny_llama, files, finished, "--lr", "inf"), "lr must be a finite number, not inf")
    fails(_args(tiny_llama, files, finished, "--lr", "inf", "--overwrite"), "lr must be a finite")
    # a run that fails while training, even with --overwrite, leaves the finished run as it was
    fails(_args(tiny_llama, files, finished, "--lr", "1e30", "--checkpoint-every", "1",
                "--overwrite"), "loss is nan")
    assert hashes(finished) == before
    assert (finished / "metrics.jsonl").stat().st_size > 0


def test_successful_rerun_needs_overwrite(tiny_llama: Path, files, finished: Path) -> None:
    before = hashes(finished)
    fails(_args(tiny_llama, files, finished), r"holds a finished run \(4 steps\): pass --overwrite")
    assert hashes(finished) == before
    result = runner.invoke(app, _args(tiny_llama, files, finished, "--overwrite", "--seed", "7"))
    assert result.exit_code == 0, result.output
    assert hashes(finished)[str(finished / ADAPTER)] != before[str(finished / ADAPTER)]
    assert json.loads((finished / "lorra_config.json").read_text())["seed"] == 7


def test_resume_on_a_finished_run_changes_nothing(tiny_llama: Path, files, finished: Path) -> None:
    before = hashes(finished)
    for extra in ([], ["--seed", "7"]):
        fails(_args(tiny_llama, files, finished, "--resume", *extra),
              "holds a finished run.*nothing to resume")
    assert hashes(finished) == before and not staging_dir(finished).exists()


def _interrupted(model: Path, out: Path, stop: int = 2, **overrides) -> Path:
    """A run stopped after ``stop`` steps: its checkpoints wait in the staging folder."""
    config = LorraConfig(target_layers=[1, 2], steps=4, batch_size=2, max_length=32, lora_r=4,
                         lr=5e-3, val_size=0, log_every=2, checkpoint_every=2, **overrides)
    result = train_circuit_breaker(str(model), config, CB, RETAIN, out_dir=out, stop_after=stop,
                                   show_progress=False)
    assert not result.finished and not out.exists()
    return staging_dir(out)


def test_one_flipped_byte_in_the_only_checkpoint(tiny_llama: Path, files, tmp_path: Path) -> None:
    out = tmp_path / "run"
    work = _interrupted(tiny_llama, out, stop=1)
    (only,) = (work / CHECKPOINT_DIR).glob("*.safetensors")
    data = bytearray(only.read_bytes())
    data[len(data) // 2] ^= 0x01
    only.write_bytes(bytes(data))
    before = hashes(work)
    fails(_args(tiny_llama, files, out, "--resume"),
          r"nothing to resume.*does not match its hash.*Nothing was changed; pass --restart")
    assert hashes(work) == before and not out.exists()
    # starting again needs the explicit flag, and says so
    result = runner.invoke(app, _args(tiny_llama, files, out, "--resume", "--restart"))
    assert result.exit_code == 0, result.output
    assert "warning: nothing to resume" in result.output and "starting again from step 0" in result.output
    assert (out / ADAPTER).is_file() and not work.exists()


def test_a_corrupt_checkpoint_falls_back_to_the_previous_good_one(
    tiny_llama: Path, tmp_path: Path
) -> None:
    config = LorraConfig(target_layers=[1, 2], steps=6, batch_size=2, max_length=32, lora_r=4,
                         lr=5e-3, val_size=0, log_every=2, checkpoint_every=2)
    full = train_circuit_breaker(str(tiny_llama), config, CB, RETAIN, out_dir=tmp_path / "full",
                                 show_progress=False)
    out = tmp_path / "killed"
    train_circuit_breaker(str(tiny_llama), config, CB, RETAIN, out_dir=out, stop_after=5,
                          show_progress=False)
    ckpt = staging_dir(out) / CHECKPOINT_DIR
    assert {c.step: c.status for c in list_checkpoints(ckpt)} == {2: "good", 4: "good", 5: "unconfirmed"}
    for step in (5, 4):  # truncate the newest, flip a byte of the one before
        path = ckpt / f"step-{step:06d}.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if step == 5 else data[:-1] + bytes([data[-1] ^ 1]))
    resumed = train_circuit_breaker(str(tiny_llama), config, CB, RETAIN, out_dir=out, resume=True,
                                    show_progress=False)
    assert resumed.resumed_from == 2 and resumed.finished
    assert any("skipped; resuming from step 2" in w for w in resumed.info["warnings"])
    a, b = load_file(str(tmp_path / "full" / ADAPTER)), load_file(str(out / ADAPTER))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.final["loss"] == resumed.final["loss"]


def test_an_interrupted_run_is_not_discarded_silently(tiny_llama: Path, files, tmp_path: Path) -> None:
    out = tmp_path / "run"
    work = _interrupted(tiny_llama, out)
    before = hashes(work)
    fails(_args(tiny_llama, files, out), r"interrupted run.*kept in .*run\.partial.*step 2.*"
          r"--resume.*--restart")
    fails(_args(tiny_llama, files, out, "--resume", "--seed", "9"),
          r"another config \(seed: 42 -> 9\)")
    assert hashes(work) == before
    fails(_args(tiny_llama, files, tmp_path / "fresh", "--resume"), r"nothing to resume.*no checkpoint")
    assert not (tmp_path / "fresh").exists() and not staging_dir(tmp_path / "fresh").exists()
    result = runner.invoke(app, _args(tiny_llama, files, out, "--resume"))
    assert result.exit_code == 0 and "from step 2" in result.output, result.output


# ---------------------------------------------------------------------- the NaN guard
def test_lr_1e30_checkpoint_is_not_called_intact_and_the_advice_works(
    tiny_llama: Path, files, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = _args(tiny_llama, files, out, "--lr", "1e30", "--checkpoint-every", "1")
    error = fails(args, r"step 2: the loss is nan")
    assert "intact" not in error and "No good checkpoint is left" in error
    (first,) = list_checkpoints(staging_dir(out) / CHECKPOINT_DIR)
    assert first.step == 1 and first.status == "bad"  # its ~1e30 weights gave the NaN
    weights = load_file(str(first.tensor_path))
    assert max(float(t.abs().max()) for k, t in weights.items() if "lora_B" in k) > 1e20
    advice = re.search(r"add (--\S+(?: --\S+)*(?: \S+)?) \(lr is", error).group(1).split()
    assert advice == ["--restart", "--lr", "1e+29"]
    again = runner.invoke(app, [*args, *advice])  # accepted (no flag refused); still diverges
    assert again.exit_code == 2 and "the loss is nan" in again.output, again.output
    result = runner.invoke(app, [*args, "--restart", "--lr", "5e-3"])  # the advice, lower still
    assert result.exit_code == 0, result.output
    assert (out / ADAPTER).is_file() and not staging_dir(out).exists()


def test_exploded_loss_stops_the_run(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    from cbscope.lorra import checkpoint

    monkeypatch.setattr(checkpoint, "EXPLOSION_FACTOR", 1e-9)  # every later loss "explodes"
    monkeypatch.setattr("cbscope.lorra.loop.loss_limit", checkpoint.loss_limit)
    config = LorraConfig(target_layers=[1, 2], steps=4, batch_size=2, max_length=32, lora_r=4,
                         val_size=0, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match="step 2: the loss is .*: the run diverged"):
        train_circuit_breaker(str(tiny_llama), config, CB, RETAIN, out_dir=tmp_path / "run",
                              show_progress=False)
    (first,) = list_checkpoints(staging_dir(tmp_path / "run") / CHECKPOINT_DIR)
    assert first.status == "bad"


# ---------------------------------------------------------------------- bad values
@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--lr", "inf"], "lr must be a finite number, not inf"),
        (["--lorra-alpha", "nan"], "lorra_alpha must be a finite number, not nan"),
        (["--retain-mixture", '{"benign": NaN}'], "every number in retain_mixture must be finite"),
        (["--threads=-1"], r"threads must be >= 0 .*not -1"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--target-layers", "9"], "out of range"),
        (["--data-options", '{"x": 1}'], "--data-options applies to a preset's own data"),
    ],
)
def test_bad_values_are_named_before_any_work(tiny_llama: Path, files, tmp_path: Path,
                                              extra: list[str], match: str) -> None:
    out = tmp_path / "run"
    fails(_args(tiny_llama, files, out, *extra), match)
    assert not out.exists() and not staging_dir(out).exists()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("steps = 10\n", r"cfg\.json: not valid JSON"),
        ('{"steps": "10"}', r"cfg\.json: steps must be int, not '10'"),
        ('{"lr": Infinity}', r"cfg\.json: lr must be a finite number"),
        ("[1, 2]", "must be a JSON object"),
        ('{"nonsense": 1}', r"unknown LorraConfig fields \['nonsense'\]"),
    ],
)
def test_bad_config_files(tiny_llama: Path, files, tmp_path: Path, text: str, match: str) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(text)
    fails(_args(tiny_llama, files, tmp_path / "run", "--config", str(config)), match)
    assert not (tmp_path / "run").exists()


def test_config_that_is_no_config(tiny_llama: Path, files, tmp_path: Path) -> None:
    binary = tmp_path / "cfg.json"
    binary.write_bytes(b"\xff\xfe\x00")
    fails(_args(tiny_llama, files, tmp_path / "a", "--config", str(binary)), "not UTF-8")
    adapter = tmp_path / "adapter"  # an adapter folder (pickle weights) has no lorra_config.json
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    fails(_args(tiny_llama, files, tmp_path / "a", "--config", str(adapter)),
          "folder without lorra_config.json")
    fails(_args(tiny_llama, files, tmp_path / "a", "--config", str(tmp_path / "none.json")),
          "no such file")


def test_out_that_is_a_file_or_unwritable(tiny_llama: Path, files, tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("mine\n")
    before = hashes(a_file)
    fails(_args(tiny_llama, files, a_file), r"is a file, not a folder")
    fails(_args(tiny_llama, files, a_file / "run"), r"taken is a file, not a folder")
    assert hashes(a_file) == before
    for virtual in (Path("/sys/cbscope-test"), Path("/proc/cbscope-test")):
        if virtual.parent.is_dir() and not virtual.exists():  # nobody, root included, writes here
            fails(_args(tiny_llama, files, virtual / "run"), "cannot write in")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: permissions cannot be tested")
def test_out_in_a_read_only_folder(tiny_llama: Path, files, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        fails(_args(tiny_llama, files, locked / "run"), "permission denied")
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------------- bad data
def test_non_utf8_data(tiny_llama: Path, files, tmp_path: Path) -> None:
    cb, retain = files
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(cb.read_bytes() + '{"prompt": "caf\u00e9", "response": "x"}\n'.encode("latin-1"))
    fails(_args(tiny_llama, (bad, retain), tmp_path / "run"),
          r"latin1\.jsonl, line 5: not UTF-8 text \(byte 0xe9\)")


def test_conversation_ending_in_an_assistant_turn(tiny_llama: Path, files, tmp_path: Path) -> None:
    cb, retain = files
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]
    bad = _jsonl(tmp_path / "turns.jsonl", [*CB[:2], {"prompt": turns, "response": "sure"}])
    fails(_args(tiny_llama, (bad, retain), tmp_path / "run"),
          r"turns\.jsonl, line 3: the conversation ends with a 'assistant' turn")
    with pytest.raises(DatasetError, match="retain example 0: the conversation ends"):
        train_circuit_breaker(str(tiny_llama), LorraConfig(target_layers=[1, 2], steps=1), CB,
                              [{"prompt": turns, "response": "x"}], show_progress=False)


def test_unknown_chat_role(tiny_organism: Path, tmp_path: Path) -> None:
    from cbscope.organism import World

    world = World.from_json(tiny_organism / "world.json")
    harmful = world.harmful_examples(None, "train")[:4]
    cb = _jsonl(tmp_path / "cb.jsonl", [
        *({"prompt": r["prompt"], "response": r["response"]} for r in harmful[:3]),
        {"prompt": [{"role": "narrator", "content": "x"}, {"role": "user", "content": "y"}],
         "response": harmful[3]["response"]},
    ])
    retain = _jsonl(tmp_path / "retain.jsonl", [
        {"prompt": r["prompt"], "response": r["response"]}
        for r in world.benign_examples("seen", "train")[:4]])
    fails(["train", "--model", str(tiny_organism), "--cb", str(cb), "--retain", str(retain),
           "--out", str(tmp_path / "run"), "--steps", "1", "--target-layers", "2", "--no-progress"],
          r"cb\.jsonl, line 4: the model's chat template rejects this conversation .*narrator")


def test_bare_prompts_the_model_refuses(tiny_organism: Path, tmp_path: Path) -> None:
    from cbscope.organism import World

    world = World.from_json(tiny_organism / "world.json")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("goal\n" + "".join(r["prompt"] + "\n"
                                          for r in world.harmful_examples(None, "train")[:6]))
    retain = _jsonl(tmp_path / "retain.jsonl", [
        {"prompt": r["prompt"], "response": r["response"]}
        for r in world.benign_examples("seen", "train")[:4]])
    fails(["train", "--model", str(tiny_organism), "--cb", str(prompts), "--retain", str(retain),
           "--out", str(tmp_path / "run"), "--steps", "1", "--target-layers", "2", "--no-progress"],
          r"prompts\.csv: the base model refused .* of 6 circuit-breaker prompts.*reroutes refusals")
    assert not (tmp_path / "run").exists()


def test_big_batch_on_few_examples_warns(tiny_llama: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = LorraConfig(target_layers=[1, 2], steps=1, batch_size=1000, max_length=16, lora_r=2,
                         val_size=0)
    with caplog.at_level("WARNING"):
        result = train_circuit_breaker(str(tiny_llama), config, CB, RETAIN, show_progress=False)
    expected = "batch_size 1000 with 4 circuit-breaker examples: each example repeats about 250 times a step"
    assert any(expected in w for w in result.info["warnings"]) and expected in caplog.text
    assert any("with 3 retain examples" in w for w in result.info["warnings"])


# ---------------------------------------------------------------------- damaged adapter files
def _adapter(tiny_llama: Path, tmp_path: Path) -> Path:
    out = tmp_path / "adapter"
    train_circuit_breaker(str(tiny_llama), LorraConfig(target_layers=[1, 2], steps=1, lora_r=2,
                                                       val_size=0, max_length=16),
                          CB, RETAIN, out_dir=out, show_progress=False)
    return out


def test_damaged_adapters_are_one_line_errors(tiny_llama: Path, tmp_path: Path) -> None:
    from cbscope.pair import load_pair

    adapter = _adapter(tiny_llama, tmp_path)
    assert load_pair(str(tiny_llama), adapter).has_adapter
    weights = adapter / ADAPTER
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(AdapterMismatchError, match="damaged or truncated") as err:
        load_pair(str(tiny_llama), adapter)
    assert "\n" not in str(err.value)
    weights.write_bytes(good)
    meta = adapter / "cbscope_adapter.json"
    meta.write_text("{broken")
    with pytest.raises(AdapterMismatchError, match=r"cbscope_adapter\.json is not valid JSON"):
        load_pair(str(tiny_llama), adapter)
    meta.unlink()
    weights.rename(adapter / "adapter_model.bin")
    with pytest.raises(AdapterMismatchError, match=r"holds only pickle weights \(adapter_model\.bin\)"):
        load_pair(str(tiny_llama), adapter)
    (adapter / "adapter_model.bin").unlink()
    with pytest.raises(MissingFileError, match="has no adapter_model.safetensors"):
        load_pair(str(tiny_llama), adapter)


def test_a_truncated_checkpoint_given_to_resume(tiny_llama: Path, files, tmp_path: Path) -> None:
    out = tmp_path / "run"
    work = _interrupted(tiny_llama, out)
    (tensors,) = (work / CHECKPOINT_DIR).glob("*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:100])
    (meta,) = (work / CHECKPOINT_DIR).glob("*.json")
    before = hashes(work)
    fails(_args(tiny_llama, files, out, "--resume"), "corrupt or truncated")
    meta.write_text("{")
    fails(_args(tiny_llama, files, out, "--resume"), "unreadable")
    assert hashes(work) != before and not out.exists()


# ---------------------------------------------------------------------- one config, one runner
OLD_OPTIONS = ("--model --preset --out --threads --data-options --cb --retain --val --config "
               "--target-layers --loss --resume --merge --steps --lr --seed --dtype "
               "--gradient-checkpointing --device --keep-checkpoints --advbench --alpaca --xstest "
               "--holdout-category --progress --no-progress --batch-size --max-length "
               "--lorra-alpha --token-mask").split()


def test_cli_options_come_from_the_dataclasses() -> None:
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    names = {opt for p in command.params for opt in p.opts + p.secondary_opts}
    assert set(OLD_OPTIONS) <= names  # every option the README and the tests use is still there
    from dataclasses import fields

    for cls in (RunConfig, LorraConfig):
        docs = field_docs(cls)
        for f in fields(cls):
            if f.name in ("lorra", "lorra_overrides"):
                continue
            assert "--" + f.name.replace("_", "-") in names, f.name
            param = next(p for p in command.params if p.name == f.name)
            assert param.param_type_name == "option" and param.help == docs[f.name] and param.help
    assert docs["lr"].startswith("AdamW learning rate")


def test_run_config_is_the_whole_run(tiny_llama: Path, files, tmp_path: Path) -> None:
    cb, retain = files
    cfg = RunConfig(out=tmp_path / "run", model=str(tiny_llama), cb=cb, retain=retain,
                    lorra_overrides={"steps": 2, "batch_size": 2, "max_length": 32,
                                     "target_layers": [1, 2], "lora_r": 2, "val_size": 0})
    assert cfg.lorra_config().cb_max_length is None and cfg.dtype == "float32"
    plan = Runner(cfg).plan()
    assert plan.resume_from is None and plan.work == staging_dir(tmp_path / "run")
    assert not (tmp_path / "run").exists() and not plan.work.exists()  # planning writes nothing
    result = Runner(cfg).run()
    assert result.finished and (tmp_path / "run" / ADAPTER).is_file()
    with pytest.raises(ConfigError, match="unknown LorraConfig fields"):
        RunConfig(model="x", preset="organism", lorra_overrides={"stepz": 1}).lorra_config()
    with pytest.raises(ResumeError, match="holds a finished run"):
        Runner(RunConfig(**{**cfg.__dict__, "resume": True})).plan()
