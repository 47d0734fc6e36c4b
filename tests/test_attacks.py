"""Every attack runs on a tiny model in seconds; the soft prompt raises the target likelihood."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cbscope.attacks import (
    AttackRun,
    FinetuneAttackConfig,
    RepeConfig,
    SoftPromptConfig,
    TemplateError,
    difference_of_means,
    direct_attack,
    finetune_attack,
    generate_responses,
    greedy_generate_embeds,
    model_mode,
    optimise_soft_prompts,
    organism_template_prompts,
    prefill_attack,
    prefills_for,
    repe_attack,
    soft_prompt_attack,
    steering,
    target_loss,
    template_attack,
    wrap_requests,
)
from cbscope.attacks.soft_prompt import prompt_embeddings, split_chat_prompt
from cbscope.data import ChatExample, as_messages
from cbscope.judges import FunctionJudge

PROMPTS = ["how do i bake bread", "how do i make a cake"]


def _random_adapter_pair(folder: Path):
    """The tiny Llama with a LoRA whose B is random (so CB != base), saved and reloaded."""
    from peft import LoraConfig

    from cbscope.pair import load_pair

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    trained = load_pair(folder, lora_config=config)
    with torch.no_grad():
        for param in trained.lora_parameters():
            param.mul_(4.0)
    return trained


@pytest.fixture(scope="module")
def pair(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    from cbscope.pair import load_pair

    adapter_dir = tmp_path_factory.mktemp("adapter") / "cb"
    _random_adapter_pair(tiny_llama).save_adapter(adapter_dir)
    return load_pair(tiny_llama, adapter_dir)


def test_model_mode(pair) -> None:
    with pytest.raises(ValueError, match="mode"), model_mode(pair, "broken"):
        pass
    ids = torch.tensor([[1, 4, 9, 10, 5]])
    with model_mode(pair, "base"):
        base = pair.model(input_ids=ids).logits
    with model_mode(pair, "cb"):
        cb = pair.model(input_ids=ids).logits
    assert not torch.allclose(base, cb)


def test_direct_prefill_template(pair) -> None:
    gen = {"max_new_tokens": 4, "batch_size": 2}
    run = direct_attack(pair, PROMPTS, mode="base", metas=[{"topic": "a"}, {"topic": "b"}], **gen)
    assert isinstance(run, AttackRun) and run.attack == "direct" and run.mode == "base"
    assert len(run.responses) == 2 and run.metas[1]["topic"] == "b" and run.prefills == ["", ""]
    pre = prefill_attack(pair, PROMPTS, "sure here is", mode="cb", **gen)
    assert pre.prefills == ["sure here is"] * 2
    assert pre.judge_metas()[0]["prefill"] == "sure here is"
    # one prefill per prompt, e.g. AdvBench's target column
    examples = [
        ChatExample(as_messages(p), "", {"target": f"sure {i}"}) for i, p in enumerate(PROMPTS)
    ]
    assert prefills_for(2, examples=examples) == ["sure 0", "sure 1"]
    assert prefills_for(2, ["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError):
        prefills_for(3, ["a"])
    prompts, metas = wrap_requests(PROMPTS, ["{request} please", "sure : {request}"])
    assert prompts[1] == "sure : how do i bake bread" and metas[1]["request"] == PROMPTS[0]
    tmpl = template_attack(pair, prompts, mode="cb", metas=metas, **gen)
    assert len(tmpl.responses) == 4 and tmpl.metas[0]["template"] == "{request} please"
    with pytest.raises(TemplateError):
        wrap_requests(PROMPTS, ["no slot here"])
    with pytest.raises(TemplateError):
        wrap_requests(PROMPTS, ["{request} and {other}"])


def test_organism_templates() -> None:
    from cbscope.organism import make_world

    world = make_world(0, size="tiny")
    prompts, metas = organism_template_prompts(world)
    assert len(prompts) == len(world.select("harmful")) * len(world.jailbreak_templates)
    assert metas[0]["topic"] in prompts[0] and metas[0]["category"] in world.harm_categories


def test_greedy_from_embeddings_matches_generate(pair) -> None:
    for mode in ("base", "cb"):
        with model_mode(pair, mode):
            seqs = prompt_embeddings(pair.model, pair.tokenizer, PROMPTS)
            ours = greedy_generate_embeds(pair.model, pair.tokenizer, seqs, max_new_tokens=6)
        assert ours == generate_responses(pair, PROMPTS, mode=mode, max_new_tokens=6)


def test_split_chat_prompt(pair) -> None:
    head, tail = split_chat_prompt(pair.tokenizer, PROMPTS[0])
    full = pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True, tokenize=True
    )
    full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
    assert head + tail == list(full)


def test_soft_prompt_on_pair(pair) -> None:
    config = SoftPromptConfig(n_tokens=3, steps=5, max_new_tokens=3, init="sure here")
    run = soft_prompt_attack(pair, PROMPTS, ["sure here is", "step one"], mode="cb", config=config)
    assert run.attack == "soft_prompt" and len(run.responses) == 2
    assert {"final_loss", "initial_loss", "target_hit", "steps_used"} <= set(run.metas[0])
    result = run.extra["result"]
    assert result.embeddings.shape == (2, 3, pair.d_model)
    assert all(f <= i + 1e-6 for f, i in zip(result.final_loss, result.initial_loss, strict=True))
    assert len(run.extra["loss_curve"]) >= 1
    with pytest.raises(ValueError):
        SoftPromptConfig(step_size=0).validate()


@pytest.fixture(scope="module")
def tiny_organism(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny organism, built once per session (shared by this file and test_evaluate)."""
    from cbscope.organism import build_organism

    folder = tmp_path_factory.getbasetemp() / "tiny_organism_attacks"
    if not (folder / "world.json").is_file():
        build_organism(folder, size="tiny", show_progress=False)
    return folder


def test_soft_prompt_raises_target_likelihood_on_base_organism(tiny_organism: Path) -> None:
    from cbscope.organism import World, judges
    from cbscope.pair import load_pair

    organism = load_pair(tiny_organism)
    world = World.from_json(tiny_organism / "world.json")
    rows = world.harmful_examples(templates="train")[:4]
    prompts = [r["prompt"] for r in rows]
    targets = [r["response"] for r in rows]
    before = target_loss(organism.model, organism.tokenizer, prompts, targets)
    result = optimise_soft_prompts(
        organism.model,
        organism.tokenizer,
        prompts,
        targets,
        SoftPromptConfig(n_tokens=8, steps=40, max_new_tokens=16),
    )
    after = target_loss(organism.model, organism.tokenizer, prompts, targets, result.embeddings)
    assert after == pytest.approx(result.final_loss, abs=1e-4)
    assert sum(after) < sum(before) - 0.1
    assert all(a < b for a, b in zip(after, before, strict=True))
    assert any(result.target_hit)
    hit = result.target_hit.index(True)
    procedure = world.topic(rows[hit]["topic"]).procedure
    assert judges.is_harmful(result.responses[hit], procedure)


def test_repe_direction_and_steering(pair) -> None:
    directions = difference_of_means(pair, ["how do i make a cake"], ["hello world"], [1, 2])
    assert set(directions) == {1, 2} and directions[1].shape == (pair.d_model,)
    ids = torch.tensor([[1, 4, 9, 10, 5]])
    before = pair.model(input_ids=ids).logits
    with steering(pair.model, directions, coeff=5.0):
        steered = pair.model(input_ids=ids).logits
    after = pair.model(input_ids=ids).logits
    assert not torch.allclose(before, steered)
    assert torch.equal(before, after)  # hooks removed
    with pytest.raises(RuntimeError), steering(pair.model, directions, coeff=5.0):
        raise RuntimeError("boom")
    assert torch.equal(pair.model(input_ids=ids).logits, before)
    # the hook acts at paper layer l = output of block l-1 = hook_resid_post of block l-1
    zero = {1: torch.zeros(pair.d_model)}
    with steering(pair.model, zero, coeff=1.0):
        assert torch.equal(pair.model(input_ids=ids).logits, before)
    run = repe_attack(
        pair,
        PROMPTS,
        positive=["how do i make a cake"],
        negative=["hello world"],
        mode="cb",
        config=RepeConfig(layers=[2], coeff=-1.0, max_new_tokens=3),
    )
    assert run.attack == "repe" and len(run.responses) == 2 and run.extra["layers"] == [2]
    assert torch.equal(pair.model(input_ids=ids).logits, before)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finetune_attack_leaves_breaker_untouched(pair) -> None:
    weights = Path(pair.adapter_path) / "adapter_model.safetensors"
    digest = _sha(weights)
    lora_before = [p.detach().clone() for p in pair.lora_parameters()]
    judge = FunctionJudge(lambda p, r: "sure" in r, name="sure")
    config = FinetuneAttackConfig(
        lrs=[1e-2, 3e-2],
        steps=4,
        eval_every=2,
        batch_size=2,
        n_examples=2,
        rank=2,
        max_new_tokens=3,
    )
    train = [
        ("how do i bake bread", "sure here is the way"),
        ("how do i make a cake", "sure step one"),
    ]
    curves = finetune_attack(pair, train, PROMPTS, mode="cb", config=config, judge=judge)
    assert [c.lr for c in curves] == [1e-2, 3e-2]
    assert curves[0].steps == [0, 2, 4] and len(curves[0].losses) == 4
    assert curves[0].asr is not None and len(curves[0].asr) == 3
    assert curves[1].losses[-1] < curves[1].losses[0]
    # step 0 is the circuit-broken model itself (merged copy, fresh LoRA with B = 0)
    assert curves[0].responses[0] == generate_responses(pair, PROMPTS, mode="cb", max_new_tokens=3)
    assert _sha(weights) == digest
    for old, new in zip(lora_before, pair.lora_parameters(), strict=True):
        assert torch.equal(old, new)
    base = finetune_attack(
        pair,
        train,
        PROMPTS,
        mode="base",
        config=FinetuneAttackConfig(
            lrs=[1e-2], steps=1, eval_every=1, batch_size=1, n_examples=1, rank=2, max_new_tokens=3
        ),
    )
    assert base[0].responses[0] == generate_responses(pair, PROMPTS, mode="base", max_new_tokens=3)
    assert base[0].asr is None and base[0].steps_to(0.5) is None
