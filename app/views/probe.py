"""View "Probe": a harmfulness probe's per-token scores under the cosine trace, one token axis."""

from __future__ import annotations

import streamlit as st

from cbscope import plots
from cbscope.data import DatasetError
from cbscope.layers import default_target_layers

from .. import compute, state


def _data(sel: state.Selection) -> compute.ProbeData | None:
    """The probe's training data: the organism's sets, or two uploaded JSONL files."""
    world_file = compute.world_path(sel.model_path)
    if world_file is not None:
        return compute.organism_probe_data(world_file)
    st.info("This model is not an organism: upload harmful and benign examples with responses "
            "(JSONL: prompt, response) to train the probe on.")
    col1, col2 = st.columns(2)
    files = []
    for column, label, key in ((col1, "Harmful examples", "probe_harmful"),
                               (col2, "Benign examples", "probe_benign")):
        uploaded = column.file_uploader(label, key=key)
        if uploaded is None:
            return None
        try:
            examples = compute.load_upload(uploaded.name, uploaded.getvalue())
        except DatasetError as err:
            st.error(state.sentence(f"cannot use {uploaded.name}: {err}"))
            return None
        records = [r for r in compute.as_records(examples, compute.MAX_DATASET_EXAMPLES) if r[1]]
        if not records:
            st.error(f"{uploaded.name} has no examples with a response: the probe reads "
                     "response tokens.")
            return None
        files.append(records)
    return compute.ProbeData(files[0], files[1], "your uploaded examples")


def render(sel: state.Selection) -> None:
    """Draw the view."""
    st.header("Probe: a harmfulness probe beside the breaker")
    st.caption(
        "A logistic-regression probe reads one layer's residual stream and scores every token's "
        "harmfulness (its threshold is calibrated to a 5% false-positive rate on benign answers). "
        "Compare where the probe flags a token with where the breaker's cosine drops."
    )
    pair = sel.require_pair()
    options = list(range(1, pair.n_layers + 1))
    default_layer = max(default_target_layers(pair.n_layers))
    col1, col2, col3 = st.columns(3)
    layer = col1.selectbox("Probe layer", options, index=options.index(default_layer),
                           key="probe_layer")
    reads = col2.radio("The probe reads", ["original", "circuit-broken"], key="probe_reads",
                       horizontal=True)
    fpr = float(col3.number_input("False-positive rate", 0.0, 0.5, 0.05, step=0.01,
                                  key="probe_fpr"))
    data = _data(sel)
    if data is None:
        return
    with st.spinner("Training the probe (once per layer and data)…"):
        probe = state.harm_probe(*sel.key, int(layer), reads == "circuit-broken", fpr,
                                 tuple(data.harmful), tuple(data.benign))
    st.caption(f"Trained on {data.note} ({len(data.harmful)} + {len(data.benign)} examples): "
               f"token AUC {probe.metrics.get('train_auc_token', float('nan')):.3f} on its "
               f"training data, threshold {probe.threshold:.3f}.")

    request = state.request_form(sel, "probe_form", button="Score")
    gtrace = state.traced(sel, request)
    trace = gtrace.trace
    loaded = sel.loaded
    with loaded.lock:
        scores = compute.probe_scores(pair, probe, trace)
    figs = compute.where_figures(trace, sel.layers, sel.threshold)
    flag = compute.first_flag(scores, probe.threshold, trace.response_start[0])
    breaker = (figs.point.describe() if figs.point is not None
               else compute.no_fire_sentence(trace, figs.layers, sel.threshold))
    probe_text = (f'flags token "{trace.tokens[0][flag].strip()}" (position {flag}) first, '
                  f"score {float(scores[flag]):.2f}" if flag is not None
                  else "flags no response token")
    st.markdown(f"**Probe (layer {probe.layer}, {reads}):** {probe_text}.  \n"
                f"**Breaker:** {breaker}.")
    note = compute.probe_note(probe.threshold, probe.metrics.get("train_auc_token"))
    if note:
        st.warning(note)
    window = state.window_control(len(trace.tokens[0]), "probe_window")
    fig = plots.probe_trace_figure(trace, scores, probe.threshold, figs.layers, sel.threshold,
                                   window=window)
    state.chart(fig, "probe_trace", name="cbscope_probe_and_cosine")
    st.caption("Top: the breaker's cosine; bottom: the probe's score, on one token axis. Flags "
               "(×) mark response tokens above the probe's threshold: the request is never "
               "flagged, as \"flags first\" reads the response only.")
    st.info("Next: change the probe layer, or try a benign look-alike request: a good breaker and "
            "a good probe both stay quiet on it. **Where does it fire?** shows the full trace.")
