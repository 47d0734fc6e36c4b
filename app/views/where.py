"""View "Where does it fire?": one request, both generations, the Figure-6 trace."""

from __future__ import annotations

import html

import streamlit as st

from .. import compute, state


def _generation(column: st.delta_generator.DeltaGenerator, title: str, prefill: str,
                text: str, gen: int) -> None:
    column.markdown(f"**{title}**")
    if gen == 0:
        column.caption("No tokens generated (N = 0): the trace covers the prefill only.")
    shown = (f"<i>{html.escape(prefill)}</i> " if prefill else "") + html.escape(text or "")
    empty = "<span style='color:#999'>(empty)</span>"
    column.markdown(
        "<div style='border:1px solid #ddd;border-radius:6px;padding:8px;min-height:3em;"
        f"white-space:pre-wrap'>{shown or empty}</div>",
        unsafe_allow_html=True,
    )


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
    figs = compute.where_figures(trace, sel.layers, sel.threshold)
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

    st.plotly_chart(figs.lines, key="fig6_lines")
    st.caption("Next: hover a point for its token; change the plotted layers or the threshold in "
               "the sidebar; the heatmap below shows every layer.")
    st.plotly_chart(figs.strip, key="fig6_strip")
    st.plotly_chart(figs.heatmap, key="fig6_heatmap")
    with st.expander("Residual-stream norms (original solid, circuit-broken dashed)"):
        st.plotly_chart(figs.norms, key="fig6_norms")
    st.download_button("Download the trace (CSV)", trace.to_dataframe().to_csv(index=False),
                       file_name="cbscope_trace.csv", mime="text/csv")
    st.info("Next: **Dataset** shows how often the breaker fires over many requests and where; "
            "**Probe** puts a harmfulness probe's per-token scores beside this trace. "
            "The page's URL holds this view: copy it to share it.")
