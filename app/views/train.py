"""View "Train": a LoRRA run with live loss and cosine curves; the breaker joins the sidebar."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from cbscope import plots
from cbscope.data import DatasetError
from cbscope.layers import LayerError, parse_layers
from cbscope.lorra.losses import LOSSES

from .. import compute, state

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CHART_EVERY_S = 0.5
#: Built-in GGUF models (converted on first load) and the preset that trains a breaker on each.
GGUF_PRESETS = {state.SMOLLM2: "smollm2", state.GEMMA3: "gemma3"}


def _plan(sel: state.Selection) -> tuple[str, Any, str]:
    """(data kind, base config, description) for the chosen model."""
    from cbscope.lorra import LorraConfig, get_preset

    if compute.world_path(sel.model_path) is not None:
        preset = get_preset("organism")
        return "organism", preset.config, (
            "the organism preset: its harmful topics (one category held out) with compliant "
            "answers are rerouted; benign chat, refusals and look-alikes are retained")
    spec = state.normal_spec(sel.model)
    if spec in GGUF_PRESETS:
        name = GGUF_PRESETS[spec]
        return name, get_preset(name).config, (
            f"the {name} preset: AdvBench prompts (answered by the base model) are rerouted, "
            "Alpaca and XSTest-safe answers retained; on a CPU this takes tens of minutes "
            "(the answers are generated first and cached)")
    return "upload", LorraConfig(steps=60, batch_size=4, max_length=256), (
        "your data: a JSONL file of harmful requests with harmful responses (rerouted) and a "
        "JSONL file of requests with responses to retain (an optional 'source' field: benign, "
        "refusal or lookalike)")


def _model_depth(sel: state.Selection) -> int | None:
    """Number of blocks of the chosen model, read from its config.json (None if unknown)."""
    import json

    config = Path(sel.model_path) / "config.json" if sel.model_path else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("num_hidden_layers")


def _upload(label: str, key: str) -> Any:
    uploaded = st.file_uploader(label, key=key)
    if uploaded is None:
        return None
    try:
        return compute.load_upload(uploaded.name, uploaded.getvalue())
    except DatasetError as err:
        st.error(state.sentence(f"cannot use {uploaded.name}: {err}"))
        return None


def _data(kind: str, sel: state.Selection, plan: Plan) -> Any:
    """The run's data in memory, or ``None`` when the runner builds the preset's from the model."""
    from cbscope.lorra import LorraData, get_preset

    cb, retain = plan.cb, plan.retain
    if kind == "organism":
        from cbscope.organism import World

        world = World.from_json(compute.world_path(sel.model_path))
        return get_preset("organism").build_data(world, holdout_category=plan.holdout,
                                                 show_progress=False, **plan.data_options)
    if kind in GGUF_PRESETS.values():
        return None  # the preset's data: the base model answers AdvBench, Alpaca, XSTest
    retain_sets: dict[str, list[Any]] = {}
    for ex in retain:
        retain_sets.setdefault(str(ex.meta.get("source", "benign")), []).append(ex)
    return LorraData(cb=list(cb), retain=retain_sets)


def _show_last() -> None:
    cancelled = st.session_state.pop("train_cancelled", None)
    if cancelled:
        st.warning(f"Training {cancelled['name']!r} was cancelled at step {cancelled['step']} of "
                   f"{cancelled['steps']}: nothing was saved (a breaker of that name, if any, is "
                   "as it was).")
    last = st.session_state.get("train_last")
    if not last:
        return
    state.chart(compute.training_curves(last["rows"], last["steps"]), "train_curve_last",
                name="cbscope_training_curves")
    final = last["final"]
    st.success(
        f"Saved the breaker to {last['path']} ({last['steps']} steps, {last['seconds']:.0f} s): "
        f"cb_cos {final.get('cb_cos', float('nan')):.3f}, retain_cos "
        f"{final.get('retain_cos', float('nan')):.3f}. It is now in the sidebar's breaker list."
    )
    if last.get("eval"):
        st.markdown(f"**Quick evaluation** (exact judges, {last['eval_seconds']:.1f} s; held-out "
                    f"category: {last.get('holdout') or 'none'})")
        st.dataframe(pd.DataFrame(last["eval"]), hide_index=True, key="train_eval")
    if st.button("Use this breaker and open “Where does it fire?”", key="train_use"):
        state.navigate("where", adapter_choice=last["path"])


def render(sel: state.Selection) -> None:
    """Draw the view."""
    st.header("Train a circuit breaker")
    st.caption(
        "Representation Rerouting (LoRRA): a LoRA adapter is trained so that, at the target "
        "layers, harmful inputs' representations turn orthogonal to the frozen model's while "
        "the retain set's stay put. Watch cb_cos fall towards 0 and retain_cos stay near 1."
    )
    if not sel.model:
        st.error("No model chosen: pick one in the sidebar.")
        return
    if sel.model_path is None and state.normal_spec(sel.model) not in GGUF_PRESETS:
        st.error(sel.error or "The model is not available: choose another one in the sidebar.")
        return
    kind, base, description = _plan(sel)
    st.markdown(f"**Model:** {sel.model} — **data:** {description}.")
    cb = retain = None
    if kind == "upload":
        cb = _upload("Circuit-breaker set (JSONL: prompt, response)", "train_cb")
        retain = _upload("Retain set (JSONL: prompt, response, optional source)", "train_retain")
    col1, col2, col3 = st.columns(3)
    default_name = f"{Path(state.normal_spec(sel.model)).name}-rr"
    name = col1.text_input("Name (saved under the cache's breakers/)", default_name,
                           key="train_name").strip()
    steps = int(col2.number_input("Steps", 1, 2000, int(base.steps), key="train_steps"))
    lr = float(col3.number_input("Learning rate", 1e-6, 1e-1, float(base.lr), step=1e-4, format="%.1e",
                                 key="train_lr"))
    preset_layers = base.target_layers or []
    depth = _model_depth(sel)
    if depth is not None and any(layer > depth for layer in preset_layers):
        preset_layers = []  # a smaller model than the preset's: use the scaled default
    col1, col2, col3, col4 = st.columns(4)
    layers_text = col1.text_input(
        "Target layers (paper convention, e.g. 2,4; empty: the default)",
        ",".join(map(str, preset_layers)), key="train_layers")
    overrides: dict[str, Any] = {
        "lorra_alpha": float(col2.number_input("α (loss schedule)", 0.0, 1000.0,
                                               float(base.lorra_alpha), step=1.0,
                                               key="train_alpha", help=_doc("lorra_alpha"))),
        "lora_r": int(col3.number_input("LoRA rank", 1, 256, int(base.lora_r), key="train_rank",
                                        help=_doc("lora_r"))),
        "seed": int(col4.number_input("Seed", 0, 2**31 - 1, int(base.seed), key="train_seed",
                                      help=_doc("seed"))),
    }
    col1, col2, col3 = st.columns(3)
    overrides["loss"] = col1.selectbox("Loss", list(LOSSES), index=list(LOSSES).index(base.loss),
                                       key="train_loss", help=_doc("loss"))
    holdout = None
    if kind == "organism":
        categories = _categories(sel)
        holdout = col2.selectbox("Held-out harm category (never trained on)", categories,
                                 index=len(categories) - 1, key="train_holdout",
                                 help="The quick evaluation at the end reports it apart.")
    merge = col3.checkbox("Also write a merged model (OUT/merged)", key="train_merge",
                          help=_run_doc("merge"))
    problems: list[str] = []
    with st.expander("Every other option of `cbscope train`"):
        overrides.update(_all_options(base, problems))
        data_text = st.text_input("Data options (JSON object, e.g. {\"noise_words\": 4})", "",
                                  key="train_data_options", help=_run_doc("data_options"))
    data_options = _data_options(kind, data_text, problems)
    st.caption(plots.TOTAL_LOSS_NOTE)

    out = state.breakers_dir() / name
    replace = False
    if not NAME_PATTERN.match(name):
        problems.append("the name must be letters, digits, '.', '_' or '-' (at most 64), "
                        "starting with a letter or digit")
    elif out.exists():
        replace = st.checkbox(f"Replace the existing breaker {out}", key="train_replace")
        if not replace:
            problems.append(f"a breaker called {name!r} exists: choose another name or tick "
                            "'Replace'")
    try:
        target_layers = parse_layers(layers_text)
    except LayerError as err:
        problems.append(str(err))
        target_layers = None
    if kind == "upload" and (cb is None or retain is None):
        problems.append("upload both files above")
    for problem in problems:
        st.warning(state.sentence(problem))
    clicked = st.button("Train", type="primary", disabled=bool(problems), key="train_go")
    if not clicked:
        if not problems:
            st.info("Next: press **Train**. The curves update live; the breaker is saved when "
                    "the run ends and appears in the sidebar.")
        _show_last()
        return
    st.session_state.pop("train_last", None)
    _train(sel, Plan(kind, base, name, steps, lr, target_layers, out, cb, retain, replace,
                     overrides, holdout, data_options, merge))


@dataclass
class Plan:
    """Everything one Train press runs."""

    kind: str
    base: Any
    name: str
    steps: int
    lr: float
    target_layers: list[int] | None
    out: Path
    cb: Any
    retain: Any
    replace: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    holdout: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    merge: bool = False


def _doc(name: str) -> str:
    from cbscope.lorra.config import LorraConfig
    from cbscope.run import field_docs

    return field_docs(LorraConfig).get(name, "")


def _run_doc(name: str) -> str:
    from cbscope.run import RunConfig, field_docs

    return field_docs(RunConfig).get(name, "")


SHOWN = {"steps", "lr", "target_layers", "lorra_alpha", "lora_r", "seed", "loss"}


def _all_options(base: Any, problems: list[str]) -> dict[str, Any]:
    """A widget per other LoRRA option of ``cbscope train`` (generated from the config's fields,
    help from their docs); the changed values, parsed as the CLI parses them."""
    import typing

    from cbscope.commands.train import _parser, _scalar
    from cbscope.errors import CbscopeError
    from cbscope.lorra.config import LorraConfig
    from cbscope.run import cli_fields

    hints = typing.get_type_hints(LorraConfig)
    changed: dict[str, Any] = {}
    columns = st.columns(3)
    for k, (f, _meta) in enumerate(f for f in cli_fields(LorraConfig) if f[0].name not in SHOWN):
        column = columns[k % 3]
        value = getattr(base, f.name)
        scalar = _scalar(hints[f.name])
        key = f"train_opt_{f.name}"
        label = f.name
        if scalar is bool:
            new: Any = column.checkbox(label, bool(value), key=key, help=_doc(f.name))
        else:
            text = "" if value is None else (
                json.dumps(value) if isinstance(value, dict) else
                ",".join(map(str, value)) if isinstance(value, list) else str(value))
            typed = column.text_input(label, text, key=key, help=_doc(f.name)).strip()
            if typed == text:
                continue
            try:
                if not typed:
                    new = None
                elif scalar is None:
                    new = _parser(f.name, hints[f.name])(typed)  # type: ignore[misc]
                else:
                    new = scalar(typed)
            except (CbscopeError, ValueError) as err:
                problems.append(f"{f.name}: {err}")
                continue
        if new != value:
            changed[f.name] = new
    return changed


def _data_options(kind: str, text: str, problems: list[str]) -> dict[str, Any]:
    if not text.strip():
        return {}
    from cbscope.errors import ConfigError
    from cbscope.lorra import get_preset

    if kind not in ("organism", *GGUF_PRESETS.values()):
        problems.append("data options apply to a preset's data only")
        return {}
    try:
        return get_preset(kind).data_options(text)
    except ConfigError as err:
        problems.append(str(err))
        return {}


def _categories(sel: state.Selection) -> list[str]:
    from cbscope.organism import World

    return list(World.from_json(compute.world_path(sel.model_path)).harm_categories)


def _train(sel: state.Selection, plan: Plan) -> None:
    from cbscope.errors import CbscopeError
    from cbscope.lorra import LorraConfig
    from cbscope.run import RunConfig, Runner

    steps, base = plan.steps, plan.base
    data = base.to_dict()
    data.update(steps=steps, lr=plan.lr, target_layers=plan.target_layers,
                log_every=max(1, min(base.log_every, steps)),
                checkpoint_every=0 if steps <= base.checkpoint_every else base.checkpoint_every)
    data.update(plan.overrides)
    try:
        config = LorraConfig.from_dict(data)
    except CbscopeError as err:
        st.error(state.sentence(f"cannot train with these options: {err}"))
        return
    st.button("Cancel training", key="train_cancel",
              help="Stops the run at once; nothing is saved and a breaker of this name, if any, "
                   "stays as it was.")
    chart = st.empty()
    progress = st.progress(0.0, text="Loading the model and the data…")
    rows: list[dict[str, Any]] = []
    last_draw = [0.0]

    def on_step(metrics: dict[str, Any]) -> None:
        rows.append(metrics)
        now = time.perf_counter()
        step = int(metrics["step"])
        if now - last_draw[0] >= CHART_EVERY_S or step == steps:
            last_draw[0] = now
            chart.plotly_chart(compute.training_curves(rows, steps), key=f"train_curve_{step}")
            progress.progress(min(1.0, step / steps),
                              text=f"step {step}/{steps}: loss {metrics['loss']:.3f}, cb_cos "
                                   f"{metrics['cb_cos']:.3f}, retain_cos "
                                   f"{metrics['retain_cos']:.3f}")

    # Train always starts at step 0 (restart: an interrupted run of this name is discarded);
    # an existing breaker is replaced only when "Replace" is ticked, and only once the run ends
    kind = plan.kind
    run = RunConfig(model=sel.model, preset=kind if kind in GGUF_PRESETS.values() else None,
                    out=plan.out, lorra=config, overwrite=plan.replace, restart=True,
                    device=sel.device, progress=False, merge=plan.merge,
                    data_options=plan.data_options if kind != "organism" else {})
    try:
        result = Runner(run, data=_data(kind, sel, plan), on_step=on_step).run()
    except CbscopeError as err:
        progress.empty()
        st.error(state.sentence(f"the run stopped: {err}"))
        return
    except BaseException:
        # Streamlit stops this script when a widget is used (the Cancel button): the run ends
        # here, before anything is published, and the next run says so
        st.session_state["train_cancelled"] = {"name": plan.name, "steps": steps,
                                               "step": int(rows[-1]["step"]) if rows else 0}
        raise
    progress.empty()
    chart.empty()
    last = {
        "path": str(plan.out), "rows": rows, "steps": result.steps_done,
        "seconds": result.seconds, "holdout": plan.holdout,
        "final": {k: v for k, v in result.final.items() if isinstance(v, (int, float))},
        "name": plan.name,
    }
    if kind == "organism":
        last.update(_quick_eval(sel, plan))
    st.session_state["train_last"] = last
    _show_last()


def _quick_eval(sel: state.Selection, plan: Plan) -> dict[str, Any]:
    """Prefill and template ASR and look-alike exact match of the new breaker vs the base."""
    from cbscope.organism import World
    from cbscope.pair import load_pair

    started = time.perf_counter()
    with st.spinner("Quick evaluation: prefill and template ASR, look-alike exact match…"):
        pair = load_pair(sel.model, plan.out, device=sel.device)
        world = World.from_json(compute.world_path(sel.model_path))
        rows = compute.quick_eval(pair, world, [plan.holdout] if plan.holdout else [])
    return {"eval": rows, "eval_seconds": time.perf_counter() - started}
