"""Bad ``cbscope eval`` input is a one-line named error (exit 2) before any work is done.

Each case checks the message, that neither the model was loaded nor the evaluation run, and
that the files which were there (an earlier report, the file named as ``--out``) are unchanged,
byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with an earlier report and a data file; loading a model or evaluating fails."""
    prior = tmp_path / "report"
    prior.mkdir()
    for name in ("report.json", "report.md", "report.html"):
        (prior / name).write_text(f"an earlier {name}\n")
    (tmp_path / "cb.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bad input was not caught before the work started")

    import cbscope.evaluate
    import cbscope.pair

    monkeypatch.setattr(cbscope.pair, "load_pair", no_work)
    monkeypatch.setattr(cbscope.evaluate, "evaluate_pair", no_work)
    monkeypatch.chdir(tmp_path)
    return tmp_path


CASES = {
    "out is a file": (["--out", "cb.jsonl"], "is a file, not a folder"),
    "out under a file": (["--out", "cb.jsonl/report"], "is a file, so no folder"),
    "unknown attack": (["--out", "report", "--attacks", "direct,bogus"], "unknown attacks"),
    "attack twice": (["--out", "report", "--attacks", "direct,direct"], "named twice"),
    "bad modes": (["--out", "report", "--modes", "base,xx"], "modes must be"),
    "empty modes": (["--out", "report", "--modes", ","], "modes must be"),
    "cb without adapter": (["--out", "report", "--modes", "cb"], "without --adapter"),
    "unknown source": (["--out", "report", "--sources", "nope"], "unknown source 'nope'"),
    "missing source file": (["--out", "report", "--sources", "mine=missing.csv"], "not found"),
    "malformed source": (["--out", "report", "--sources", "=x"], "give NAME=PATH"),
    "bad source rows": (["--out", "report", "--source-rows", "some"], "source_rows"),
    "options not json": (["--out", "report", "--attack-options", "{bad"], "not JSON"),
    "options unknown attack": (
        ["--out", "report", "--attack-options", '{"bogus": {}}'],
        "unknown attacks",
    ),
    "options unknown field": (
        ["--out", "report", "--attack-options", '{"soft_prompt": {"stepz": 1}}'],
        "unknown options ['stepz']",
    ),
    "options wrong type": (
        ["--out", "report", "--attack-options", '{"soft_prompt": {"steps": "10"}}'],
        "steps must be int",
    ),
    "options nan": (["--out", "report", "--attack-options", '{"repe": {"coeff": NaN}}'], "finite"),
    "options shared field": (
        ["--out", "report", "--attack-options", '{"repe": {"batch_size": 2}}'],
        "generation settings",
    ),
    "flag and options disagree": (
        [
            "--out",
            "report",
            "--soft-prompt-steps",
            "5",
            "--attack-options",
            '{"soft_prompt": {"steps": 6}}',
        ],
        "set twice",
    ),
    "nan step size": (["--out", "report", "--soft-prompt-step-size", "nan"], "finite"),
    "infinite lr": (["--out", "report", "--finetune-lrs", "1e-3,inf"], "finite"),
    "bad positions": (["--out", "report", "--repe-positions", "sideways"], "positions"),
    "bad soft target": (["--out", "report", "--soft-prompt-target", "all"], "soft_prompt_target"),
    "zero limit": (["--out", "report", "--limit", "0"], "limit must be >= 1"),
    "zero batch": (["--out", "report", "--batch-size", "0"], "batch_size must be >= 1"),
    "zero budget": (["--out", "report", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    "zero threads": (["--out", "report", "--threads", "0"], "--threads must be >= 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_eval_input_is_a_named_error_before_any_work(workdir: Path, case: str) -> None:
    from cbscope.cli import app

    args, message = CASES[case]
    before = _hashes(workdir)
    result = CliRunner().invoke(app, ["eval", "--model", "organism", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert _hashes(workdir) == before


@pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() == 0, reason="needs a folder root could still write to"
)
def test_unwritable_out_is_refused_before_any_work(workdir: Path) -> None:
    from cbscope.cli import app

    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = CliRunner().invoke(app, ["eval", "--out", str(locked / "report")])
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2 and "cannot write in" in result.output


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_out_on_a_filesystem_nobody_can_write_is_refused(workdir: Path) -> None:
    """/proc refuses new files even to root, so this runs where the chmod test cannot."""
    from cbscope.cli import app

    before = _hashes(workdir)
    result = CliRunner().invoke(app, ["eval", "--out", "/proc/cbscope-report"])
    assert result.exit_code == 2 and "cannot write in /proc" in result.output
    assert not Path("/proc/cbscope-report").exists()
    assert _hashes(workdir) == before


def test_report_dir_checks(tmp_path: Path) -> None:
    from cbscope.errors import ConfigError
    from cbscope.evaluate import Report, check_report_dir

    assert check_report_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert list(tmp_path.iterdir()) == []  # and leaves no probe file behind
    (tmp_path / "r" / "report.json").mkdir(parents=True)
    with pytest.raises(ConfigError, match="is a folder"):
        check_report_dir(tmp_path / "r")
    (tmp_path / "f").write_text("keep")
    report = Report.from_rows([], {})
    with pytest.raises(ConfigError, match="is a file"):
        report.save(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "keep"


def test_options_the_model_cannot_take_fail_before_the_first_attack(
    tiny_organism: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers, an init string or target modules the model does not have, a held-out category
    the world does not have: refused after the model loads, before any attack runs."""
    from cbscope.attacks import RepeConfig, SoftPromptConfig, get_attack
    from cbscope.errors import CbscopeError, ConfigError, LayerError
    from cbscope.evaluate import EvalConfig, evaluate_pair
    from cbscope.pair import load_pair

    def no_attack(*args: object, **kwargs: object) -> None:
        raise AssertionError("an attack ran before the bad option was refused")

    monkeypatch.setattr(type(get_attack("direct")), "run", no_attack)
    pair = load_pair(tiny_organism)
    cases: list[tuple[dict, type[CbscopeError], str]] = [
        ({"attacks": ["direct", "repe"], "repe": RepeConfig(layers=[99])}, LayerError, "99"),
        (
            {"attacks": ["direct", "soft_prompt"], "soft_prompt": SoftPromptConfig(init=" ")},
            ConfigError,
            "has no tokens",
        ),
        ({"attacks": ["direct", "finetune"]}, ConfigError, "target modules"),
        ({"attacks": ["direct"], "heldout_categories": ["nope"]}, ConfigError, "unknown harm"),
        ({"attacks": ["direct"], "modes": ["cb"]}, ConfigError, "no adapter"),
    ]
    for values, error, message in cases:
        config = EvalConfig(limit=2, **values)
        if values["attacks"][-1] == "finetune":
            config = config.with_options({"finetune": {"target_modules": ["nope"]}})
        with pytest.raises(error, match=message):
            evaluate_pair(pair, config=config, show_progress=False)
