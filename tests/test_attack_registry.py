"""The attack registry: every attack is one registered module with an options dataclass; the
evaluation dispatches through it and gives what the attack functions give called directly."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cbscope.attacks import (
    ATTACK_NAMES,
    DEFAULT_PREFILL,
    AttackContext,
    FinetuneAttackConfig,
    GenerationAttack,
    GenerationSettings,
    RepeConfig,
    Requests,
    SoftPromptConfig,
    attack_names,
    direct_attack,
    get_attack,
    multiturn_attack,
    prefill_attack,
    register_attack,
    registered_attacks,
    repe_attack,
    soft_prompt_attack,
    template_attack,
    unregister_attack,
    with_history,
)
from cbscope.attacks.options import NoOptions, options_from_dict
from cbscope.errors import ConfigError
from cbscope.evaluate import EvalConfig, evaluate_pair, organism_suite, parse_attacks

BUILTIN = (
    "direct",
    "prefill",
    "template",
    "multiturn",
    "multiturn_prefill",
    "soft_prompt",
    "repe",
    "finetune",
)


#: The strong, slow attacks: run when named (or with ``all``), not by default.
STRONG = (
    "escalation",
    "many_shot",
    "gcg",
    "embedding",
    "obfuscation",
    "refusal_ablation",
    "finetune_worst",
)


def test_registry_lists_the_builtin_attacks_in_report_order() -> None:
    assert set(attack_names()) == set(BUILTIN) | set(STRONG)
    assert attack_names() == ATTACK_NAMES
    assert [n for n in attack_names() if n in BUILTIN] == list(BUILTIN)
    assert parse_attacks(None) == list(BUILTIN) == EvalConfig().attacks
    assert parse_attacks("all") == list(attack_names())
    assert not any(get_attack(n).in_default for n in STRONG)
    for name, attack in registered_attacks().items():
        assert attack.name == name and dataclasses.is_dataclass(attack.Options)
        assert attack.description
    assert get_attack("soft_prompt").Options is SoftPromptConfig
    assert get_attack("repe").Options is RepeConfig
    assert (
        get_attack("finetune").Options is FinetuneAttackConfig
        and get_attack("finetune").spans_modes
    )
    assert get_attack("direct").Options is NoOptions
    with pytest.raises(ConfigError, match="unknown attacks"):
        get_attack("bogus")


def test_register_attack_refuses_bad_declarations() -> None:
    class NoName(GenerationAttack):
        name = "Bad Name"

    with pytest.raises(ValueError, match="lower-case"):
        register_attack(NoName)

    class BadOptions(GenerationAttack):
        name = "bad_options"
        Options = dict

    with pytest.raises(TypeError, match="dataclass"):
        register_attack(BadOptions)

    class Impostor(GenerationAttack):
        name = "direct"

    with pytest.raises(ValueError, match="already registered"):
        register_attack(Impostor)
    assert type(get_attack("direct")).__name__ == "DirectAttack"


def test_options_are_type_checked_and_finite() -> None:
    soft = get_attack("soft_prompt")
    options = soft.make_options({"steps": 7, "step_size": 1, "init": "sure"})
    assert (options.steps, options.step_size, options.init) == (7, 1.0, "sure")
    assert options.n_tokens == SoftPromptConfig().n_tokens
    for bad, message in (
        ({"steps": "10"}, "must be int"),
        ({"steps": True}, "must be int"),
        ({"step_size": float("nan")}, "finite"),
        ({"init": 3}, "must be str"),
        ({"stepz": 3}, "unknown options"),
        ({"max_new_tokens": 3}, "generation settings"),
        ({"n_tokens": 0}, "n_tokens must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            soft.make_options(bad)
    with pytest.raises(ConfigError, match="finite"):
        get_attack("finetune").make_options({"lrs": [1e-3, float("inf")]})
    with pytest.raises(ConfigError, match="list"):
        get_attack("finetune").make_options({"lrs": 0.1})
    with pytest.raises(ConfigError, match="no options|its options: none"):
        get_attack("direct").make_options({"x": 1})
    assert options_from_dict(RepeConfig, {"layers": None}).layers is None
    with pytest.raises(ConfigError, match="finite"):
        EvalConfig(repe=RepeConfig(coeff=float("nan"))).validate()
    with pytest.raises(ConfigError, match="firing_threshold"):
        EvalConfig(firing_threshold=float("nan")).validate()
    with pytest.raises(ConfigError, match="firing_threshold"):
        EvalConfig(firing_threshold=1.5).validate()


def test_with_options_fills_the_attack_fields() -> None:
    config = EvalConfig().with_options(
        {
            "soft_prompt": {"steps": 9},
            "repe": {"coeff": -2, "layers": [1, 2]},
            "finetune": {"lrs": [0.01]},
        }
    )
    assert config.soft_prompt.steps == 9 and config.soft_prompt.n_tokens == 20
    assert config.repe.coeff == -2.0 and config.repe.layers == [1, 2]
    assert config.finetune.lrs == [0.01]
    assert config.options_for("repe") is config.repe
    assert EvalConfig().soft_prompt.steps == 500  # the default config is untouched
    with pytest.raises(ConfigError, match="unknown attacks"):
        EvalConfig().with_options({"gcg_typo": {}})
    with pytest.raises(ConfigError, match="JSON object"):
        EvalConfig().with_options({"repe": 3})


def test_generation_settings_validate() -> None:
    assert GenerationSettings().validate().greedy
    for bad in (
        GenerationSettings(max_new_tokens=0),
        GenerationSettings(batch_size=0),
        GenerationSettings(sampling="beam"),
        GenerationSettings(sampling="sample", temperature=float("nan")),
        GenerationSettings(sampling="sample", temperature=0),
        GenerationSettings(best_of_n=0),
        GenerationSettings(best_of_n=4),  # greedy gives one answer
    ):
        with pytest.raises(ConfigError):
            bad.validate()
    sampled = GenerationSettings(sampling="sample", best_of_n=4).validate()
    ctx = AttackContext(pair=None, suite=None, modes=["base"], generation=sampled)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="greedily only"):
        get_attack("direct").check(ctx, NoOptions())


@pytest.fixture(scope="module")
def organism_pair(tiny_organism: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny organism with a random adapter holding out 'chem'."""
    from peft import LoraConfig

    from cbscope.pair import load_pair

    adapter = tmp_path_factory.mktemp("registry_adapter") / "cb"
    torch.manual_seed(0)
    pair = load_pair(
        tiny_organism,
        lora_config=LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            layers_to_transform=[2, 3],
        ),
    )
    pair.save_adapter(adapter)
    (adapter / "train_info.json").write_text(json.dumps({"holdout_category": "chem"}))
    return load_pair(tiny_organism, adapter)


def test_registry_runs_equal_the_attack_functions(organism_pair) -> None:
    """Each registered attack gives exactly what the attack function gives with the arguments
    the evaluation's old if-chain passed it."""
    from cbscope.evaluate import organism_world

    pair = organism_pair
    config = EvalConfig(
        limit=3,
        soft_prompt=SoftPromptConfig(n_tokens=3, steps=2),
        soft_prompt_limit=2,
        repe_reference=4,
        repe=RepeConfig(layers=[2]),
    )
    suite = organism_suite(pair, organism_world(pair), config)
    generation = config.generation(suite.kind)
    assert (generation.max_new_tokens, generation.batch_size) == (20, 64)
    ctx = AttackContext(pair, suite, ["base", "cb"], generation, config)
    gen = {"max_new_tokens": 20, "batch_size": 64}

    def prompts(items):
        return [it.prompt for it in items]

    def metas(items):
        return [dict(it.meta) for it in items]

    expected = {
        "direct": lambda mode: direct_attack(
            pair, prompts(suite.harmful), mode=mode, metas=metas(suite.harmful), **gen
        ),
        "prefill": lambda mode: prefill_attack(
            pair,
            prompts(suite.harmful),
            [str(it.meta.get("prefill") or DEFAULT_PREFILL) for it in suite.harmful],
            mode=mode,
            metas=metas(suite.harmful),
            **gen,
        ),
        "template": lambda mode: template_attack(
            pair, prompts(suite.template), mode=mode, metas=metas(suite.template), **gen
        ),
        "multiturn": lambda mode: multiturn_attack(
            pair,
            [with_history(it.meta["history"], it.prompt) for it in suite.multiturn],
            None,
            mode=mode,
            metas=[{k: v for k, v in m.items() if k != "history"} for m in metas(suite.multiturn)],
            **gen,
        ),
        "multiturn_prefill": lambda mode: multiturn_attack(
            pair,
            [with_history(it.meta["history"], it.prompt) for it in suite.multiturn],
            [str(it.meta["prefill"]) for it in suite.multiturn],
            mode=mode,
            metas=[{k: v for k, v in m.items() if k != "history"} for m in metas(suite.multiturn)],
            **gen,
        ),
        "soft_prompt": lambda mode: soft_prompt_attack(
            pair,
            prompts(suite.soft),
            [str(it.meta["target"]) for it in suite.soft],
            mode=mode,
            config=SoftPromptConfig(n_tokens=3, steps=2, max_new_tokens=20),
            metas=metas(suite.soft),
        ),
        "repe": lambda mode: repe_attack(
            pair,
            prompts(suite.harmful),
            positive=suite.repe_positive,
            negative=suite.repe_negative,
            mode=mode,
            config=RepeConfig(layers=[2], max_new_tokens=20, batch_size=64),
            metas=metas(suite.harmful),
        ),
    }
    for name, call in expected.items():
        attack = get_attack(name)
        for mode in ("base", "cb"):
            run = attack.run(ctx, mode, config.options_for(name))
            want = call(mode)
            assert (run.attack, run.mode) == (name, mode)
            assert run.prompts == want.prompts and run.prefills == want.prefills
            assert run.responses == want.responses and run.metas == want.metas, name


def test_a_new_attack_is_one_registered_class(organism_pair, tmp_path: Path) -> None:
    """An attack defined outside cbscope runs through `evaluate_pair` and the CLI, options from
    --attack-options, with no change anywhere else."""
    from cbscope.cli import app

    @dataclass
    class ShoutOptions:
        """Options of the test attack.

        Attributes:
            suffix: Appended to every request.
        """

        suffix: str = "!"

    class ShoutAttack(GenerationAttack):
        name = "shout"
        Options = ShoutOptions
        description = "the request, shouted"

        def requests(self, suite: Any, options: ShoutOptions) -> Requests:
            items = suite.harmful
            return Requests(
                [it.prompt + options.suffix for it in items], [dict(it.meta) for it in items]
            )

    register_attack(ShoutAttack)
    try:
        assert "shout" in attack_names()
        config = EvalConfig(
            limit=2,
            n_algo=2,
            n_retain=4,
            firing=False,
            attack_options={"shout": {"suffix": " now"}},
        )
        report = evaluate_pair(
            organism_pair, attacks="shout,direct", config=config, show_progress=False
        )
        assert list(report.attacks) == ["shout", "direct"]
        rows = [r for r in report.rows if r.get("attack") == "shout"]
        assert len(rows) == 4 and all(r["prompt"].endswith(" now") for r in rows)
        assert report.meta["config"]["attack_options"] == {"shout": {"suffix": " now"}}
        # the CLI lists its options and takes them as JSON
        assert "suffix (str, default '!'): Appended to every request" in _help_text()
        out = tmp_path / "report"
        result = CliRunner().invoke(
            app,
            [
                "eval",
                "--model",
                str(organism_pair.resolved.path),
                "--attacks",
                "shout",
                "--attack-options",
                '{"shout": {"suffix": "?"}}',
                "--limit",
                "2",
                "--out",
                str(out),
                "--no-progress",
                "--no-firing",
            ],
        )
        assert result.exit_code == 0, result.output
        saved = json.loads((out / "report.json").read_text())
        assert {r["prompt"][-1] for r in saved["rows"] if r.get("attack") == "shout"} == {"?"}
    finally:
        unregister_attack("shout")
    assert "shout" not in attack_names()
    with pytest.raises(ConfigError, match="unknown attacks"):
        parse_attacks("shout")


def _help_text() -> str:
    """``cbscope eval --help``, whitespace collapsed (rich wraps it to the terminal)."""
    from cbscope.cli import app

    result = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_help_lists_every_attack_option() -> None:
    text = _help_text()
    for name, attack in registered_attacks().items():
        assert f"- {name}:" in text
        for f in dataclasses.fields(attack.Options):
            if f.name not in attack.generation_fields:
                assert f"{f.name} (" in text, (name, f.name)
    assert "--attack-options" in text and "--soft-prompt-steps" in text


def test_organism_does_not_import_the_attacks() -> None:
    """The organism's own evaluation uses cbscope.organism.prompts, not cbscope.attacks."""
    code = (
        "import sys, cbscope.organism.evaluate, cbscope.organism.prompts; "
        "print(any(m.startswith('cbscope.attacks') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from cbscope.attacks import organism_template_prompts
    from cbscope.attacks.multiturn import organism_multiturn_prompts
    from cbscope.organism import prompts

    assert organism_template_prompts is prompts.organism_template_prompts
    assert organism_multiturn_prompts is prompts.organism_multiturn_prompts
