"""View "Where does it fire?": one request, both generations, the Figure-6 trace."""

from __future__ import annotations

from typing import Any

import streamlit as st

from cbscope import plots

from .. import compute, state


def _generation(column: Any, title: str, prefill: str, text: str, gen: int) -> None:
    column.markdown(f"**{title}**")
    if gen == 0:
        column.caption("No tokens generated (N = 0): the trace covers the prefill only.")
    column.html(state.plain_text(text, prefill=prefill))


def _clicked_cell(trace: Any) -> None:
    """The heatmap cell the user clicked: its token, layer, cosine and norms, and the way to the
    "Why does it fire?" view at that token."""
    points = [p for p in state.selected_points("fig6_heatmap") if p.get("customdata")]
    if not points:
        st.caption("Click a heatmap cell to open that token here.")
        return
    label, cos, norm_o, norm_cb, layer, pos, _ = points[0]["customdata"]
    start = trace.response_start[0]
    where = (f"{pos - start} tokens after the response start" if pos >= start
             else "in the request")
    st.markdown(f"**Token {label}**, layer {layer} ({where}): cosine **{cos:.3f}**, norm "
                f"{norm_o:.2f} (original) vs {norm_cb:.2f} (circuit-broken).")
    if st.button(f"Why does the cosine move at this token (pos {pos})? →", key="where_cell_why"):
        state.navigate("why", pos=int(pos))


def render(sel: state.Selection) -> None:
    """Draw the view."""
    st.header("Where does it fire?")
    st.caption(
        "Type a request, optionally a prefill (the start of the assistant's answer, as in a "
        "prefilling attack), choose how many tokens the circuit-broken model generates, then "
        "press **Trace**. Both models read the same tokens; the plots show the cosine between "
        "their residual streams (1 = untouched, near 0 or below = rerouted). For a multi-turn "
        "conversation, write one turn per line (`user: ...`, `assistant: ...`, ending with a "
        "user turn)."
    )
    request = state.request_form(sel, "where_form")
    gtrace = state.traced(sel, request)
    trace = gtrace.trace
    n = len(trace.tokens[0])
    window = state.window_control(n, "where_window")
    figs = compute.where_figures(trace, sel.layers, sel.threshold, window=window)
    if len(trace.turn_starts[0]) > 1:
        st.caption(f"Multi-turn conversation: {len(trace.turn_starts[0])} turns, starting at "
                   f"token positions {', '.join(map(str, trace.turn_starts[0]))} (the dotted "
                   "purple lines in the plots).")

    left, right = st.columns(2)
    _generation(left, "Original model (adapter off)", gtrace.prefill, gtrace.text_orig, request.gen)
    _generation(right, "Circuit-broken model (adapter on)", gtrace.prefill, gtrace.text_cb,
                request.gen)

    title, caption = compute.headline(trace, figs.layers, sel.threshold)
    st.markdown(f"#### {title}")
    st.caption(caption)
    if st.button("Why does it fire? →", key="where_why", type="primary",
                 help="Which blocks' adapters, attention or MLP, which tokens, and where the "
                      "representation goes, for exactly these tokens."):
        state.navigate("why", pos=None)  # the new request starts at its own firing point

    state.chart(figs.lines, "fig6_lines", name="cbscope_figure6")
    st.caption("Next: hover a point for its token; change the plotted layers or the threshold in "
               "the sidebar; the heatmap below shows every layer.")
    st.markdown("**The response, coloured by its lowest cosine**")
    with_request = st.checkbox("Show the request's tokens too", key="where_request_text")
    st.html(plots.token_html(trace, 0, figs.layers, include_request=with_request))
    state.chart(figs.heatmap, "fig6_heatmap", name="cbscope_heatmap", clickable=True)
    _clicked_cell(trace)
    with st.expander("Residual-stream norms (original solid, circuit-broken dashed)"):
        state.chart(figs.norms, "fig6_norms", name="cbscope_norms")
    st.download_button("Download the trace (CSV)", trace.to_dataframe().to_csv(index=False),
                       file_name="cbscope_trace.csv", mime="text/csv")
    st.info("Next: **Compare** puts two breakers, or this request and its benign look-alike, on "
            "one set of axes; **Dataset** shows how often the breaker fires over many requests; "
            "**Probe** puts a harmfulness probe's per-token scores under this trace. "
            "The page's URL holds this view: copy it to share it.")
