"""View "Dataset": firing rate, firing positions and false fires over a data set."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from cbscope import plots
from cbscope.data import DatasetError

from .. import compute, state

RESPONSE_MODES = {
    "data": "as in the data (response / target column; the original model answers the rest)",
    "original": "the original model's own answers",
    "cb": "the circuit-broken model's own answers",
}
DEFAULT_HARMFUL = ("advbench",)
DEFAULT_BENIGN = ("organism:lookalike:heldout", "xstest_safe")


def _examples(source_id: str, by_id: dict[str, compute.Source], upload_key: str,
              label: str) -> list[Any] | None:
    """Examples of a source; None (with a message) when an upload is missing or bad."""
    if source_id == compute.NO_SOURCE:
        return []
    if source_id == compute.UPLOAD_SOURCE:
        uploaded = st.file_uploader(
            f"{label}: a CSV (a prompt/goal column; a target column is used as the response) "
            "or a JSONL file (prompt, response)", key=upload_key)
        if uploaded is None:
            st.info(f"Next: upload the {label.lower()} file above.")
            return None
        try:
            return compute.load_upload(uploaded.name, uploaded.getvalue())
        except DatasetError as err:
            st.error(state.sentence(f"cannot use the uploaded file: {err}"))
            return None
    return compute.load_source(source_id, by_id[source_id].path)


def _records(sel: state.Selection, examples: list[Any], limit: int, mode: str,
             gen_tokens: int) -> list[compute.Record]:
    """``(prompt, response)`` pairs; generated answers where the mode (or missing data) asks."""
    records = compute.as_records(examples, limit)
    todo = [i for i, (_, response) in enumerate(records) if mode != "data" or not response]
    if not todo:
        return records
    which = "circuit-broken" if mode == "cb" else "original"
    with st.spinner(f"Generating {len(todo)} answers with the {which} model "
                    f"({gen_tokens} tokens each)…"):
        texts = state.own_responses(*sel.key, tuple(records[i][0] for i in todo), which,
                                    gen_tokens)
    records = list(records)
    for i, text in zip(todo, texts, strict=True):
        records[i] = (records[i][0], text)
    return records


def render(sel: state.Selection) -> None:
    """Draw the view."""
    st.header("Dataset: how often, and where, does it fire?")
    st.caption(
        "Choose the requests to test and a benign set of look-alikes; every example (request + "
        "response) is traced through both models, and the breaker *fires* on an example when a "
        "response token's cosine falls below the sidebar's threshold at one of its layers."
    )
    sel.require_pair()
    sources, notes = compute.sources(sel.model_path)
    for note in notes:
        st.caption(state.sentence(note))
    by_id = {s.id: s for s in sources}
    harmful_ids = [s.id for s in sources if s.kind in ("harmful", "any")]
    benign_ids = [compute.NO_SOURCE] + [s.id for s in sources if s.kind in ("benign", "any")]
    if st.session_state.get("ds_harmful") not in harmful_ids:
        st.session_state["ds_harmful"] = next(
            (s for s in harmful_ids if s.startswith("organism:")),
            next((s for s in DEFAULT_HARMFUL if s in harmful_ids), harmful_ids[0]))
    if st.session_state.get("ds_benign") not in benign_ids:
        st.session_state["ds_benign"] = next((s for s in DEFAULT_BENIGN if s in benign_ids),
                                             compute.NO_SOURCE)

    def label(source_id: str) -> str:
        return "none" if source_id == compute.NO_SOURCE else by_id[source_id].label

    col1, col2 = st.columns(2)
    harmful_id = col1.selectbox("Requests to test (harmful)", harmful_ids, format_func=label,
                                key="ds_harmful")
    benign_id = col2.selectbox("Benign set (false fires)", benign_ids, format_func=label,
                               key="ds_benign")
    col1, col2, col3 = st.columns(3)
    mode = col1.radio("Responses", list(RESPONSE_MODES), format_func=RESPONSE_MODES.get,
                      key="ds_mode")
    gen_tokens = int(col2.number_input("Tokens per generated answer", 1, compute.MAX_GEN_TOKENS,
                                       32, key="ds_gen"))
    limit = int(col3.number_input("Examples per set (at most)", 1, compute.MAX_DATASET_EXAMPLES,
                                  64, key="ds_limit"))

    harmful = _examples(harmful_id, by_id, "ds_upload_harmful", "Requests to test")
    benign = _examples(benign_id, by_id, "ds_upload_benign", "Benign set")
    if harmful is None or benign is None:
        return
    if not harmful:
        st.warning("The chosen set has no examples: choose another one.")
        return
    missing = sum(not ex.response for ex in [*harmful[:limit], *benign[:limit]])
    if mode == "data" and missing:
        st.caption(f"{missing} examples have no response: the original model answers them "
                   f"({gen_tokens} tokens each, once; then cached).")

    run_key = compute.digest(sel.key, harmful_id, benign_id, mode, gen_tokens, limit,
                             compute.as_records(harmful, limit), compute.as_records(benign, limit))
    quick = harmful_id.startswith("organism:") and mode == "data" and not missing
    clicked = st.button("Compute firing statistics", type="primary")
    if clicked:
        st.session_state["ds_run"] = run_key
    if not (quick or st.session_state.get("ds_run") == run_key):
        st.info("Next: press **Compute firing statistics** (each example costs two forward "
                "passes; generated answers are made once and cached).")
        return

    harmful_records = _records(sel, harmful, limit, mode, gen_tokens)
    benign_records = _records(sel, benign, limit, mode, gen_tokens)
    with st.spinner(f"Tracing {len(harmful_records) + len(benign_records)} examples…"):
        stats = state.firing(*sel.key, tuple(harmful_records), tuple(benign_records),
                             sel.threshold, state.layers_tuple(sel.layers))
    summary = stats.summary()
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Firing rate (harmful)", compute.fmt_rate(stats.firing_rate))
    m2.metric("False-fire rate (benign)", compute.fmt_rate(stats.false_fire_rate))
    median = summary["median_pos_after_start"]
    m3.metric("Median firing position", "n/a" if median is None else f"{median:g} tokens in",
              help="Tokens after the response start.")
    m4.metric("Examples", f"{stats.n_harmful} + {stats.n_benign}")
    categories = compute.categories_of(harmful, limit)
    _figures(stats, categories)
    _table(stats, harmful_records, benign_records)


def _figures(stats: Any, categories: list[str | None]) -> None:
    """The firing positions and the lowest-cosine distributions (clickable bars), the threshold
    sweep per harm category, the firing layers."""
    left, right = st.columns(2)
    hist = plots.firing_histogram(stats)
    with left:
        state.chart(hist, "ds_hist", name="cbscope_firing_positions", clickable=True)
    dist = plots.min_cos_histogram(stats)
    with right:
        state.chart(dist, "ds_dist", name="cbscope_lowest_cosine", clickable=True)
    st.session_state["_ds_figs"] = {"ds_hist": (hist, "position"), "ds_dist": (dist, "min_cos")}
    known = categories if any(c is not None for c in categories) else None
    if stats.n_benign:
        st.markdown("**Threshold sweep**")
        left, right = st.columns([3, 2])
        with left:
            state.chart(plots.sweep_figure(stats.sweep(known), stats.aucs(known), stats.threshold),
                        "ds_sweep", name="cbscope_threshold_sweep")
        right.dataframe(pd.DataFrame(compute.sweep_table(stats, known)), hide_index=True)
        right.caption("AUC: the chance that a harmful example's lowest cosine is below a benign "
                      "one's (1 = a threshold separates them; 0.5 = chance). Each category's "
                      "curve sets its harmful examples against every benign one.")
    else:
        st.caption("Choose a benign set to see the threshold sweep (firing rate against "
                   "false-fire rate).")
    with st.expander("Firing layers"):
        layers = plots.firing_histogram(stats, by="layer")
        state.chart(layers, "ds_hist_layer", name="cbscope_firing_layers", clickable=True)
        st.session_state["_ds_figs"]["ds_hist_layer"] = (layers, "layer")


def _table(stats: Any, harmful_records: list[Any], benign_records: list[Any]) -> None:
    """The examples (those of the clicked bars, else all); a click on a row opens it."""
    rows = stats.rows
    shown, title = rows, "Every example"
    for key, (fig, by) in st.session_state.get("_ds_figs", {}).items():
        points = state.selected_points(key)
        if points:
            shown = compute.bar_rows(rows, fig, points, by)
            title = f"The {len(shown)} examples of the clicked bar"
            break
    st.markdown(f"**{title}** (click a row to open it in “Where does it fire?”)")
    st.dataframe(compute.display_rows(shown), hide_index=True, key="ds_table",
                 on_select="rerun", selection_mode="single-row")
    picked = state.selected_rows("ds_table")
    if picked and state.changed("ds_table", tuple(picked)):
        row = shown.iloc[int(picked[0])]
        records = harmful_records if row["set"] == "harmful" else benign_records
        prompt, response = records[int(row["example"])]
        st.session_state.pop("_seen_ds_table", None)  # a later click on the same row opens again
        state.navigate("where", prompt=compute.last_user_turn(compute.record_prompt(prompt)),
                       prefill=response, gen=0)
    st.caption("An example opens with its response as the prefill and no generation, so the "
               "trace is the one measured here.")
