"""View "Why does it fire?": which adapters, attention or MLP, which tokens, and where to."""

from __future__ import annotations

import json

import streamlit as st

from cbscope.plots import display_token

from .. import compute, state


def _token_choice(exp: object) -> int:
    """The token the per-token figures show (the firing point by default; ``pos`` in the URL)."""
    n = len(exp.tokens)
    wanted = state.parse_int(state.query("pos", str(exp.focus.pos)), exp.focus.pos, 0, n - 1)
    if st.session_state.get("why_pos") not in range(n) or st.session_state.get("_why_for") != \
            exp.token_ids:
        st.session_state["why_pos"] = wanted
    st.session_state["_why_for"] = exp.token_ids
    pos = st.selectbox("Token for the block x component figures", list(range(n)),
                       key="why_pos",
                       format_func=lambda p: f"{display_token(exp.tokens[p])} (pos {p})"
                       + ("  ← firing point" if p == exp.focus.pos else ""))
    state.set_query(pos=pos if pos != exp.focus.pos else None)
    return int(pos)


def render(sel: state.Selection) -> None:
    """Draw the view."""
    st.header("Why does it fire?")
    st.caption(
        "The same request as in **Where does it fire?**, explained at its firing point: the "
        "rerouting delta split exactly into every block's attention and MLP output, each "
        "block's adapter switched off (necessity) or left alone on (sufficiency), every input "
        "token occluded, and the logit lens and the rerouting direction of both models."
    )
    request = state.request_form(sel, "why_form", button="Explain")
    state.traced(sel, request)  # checks the request and traces it (cached, as in Where)
    with st.spinner("Explaining: decomposition, patching, attribution, logit lens, direction…"):
        exp = state.explanation(*sel.key, request.prompt, request.prefill, request.gen,
                                sel.threshold, state.layers_tuple(sel.layers))
    layers_text = ", ".join(map(str, exp.layers))
    st.markdown(f"#### The breaker {exp.focus.describe()}")
    st.caption(f"Threshold {sel.threshold:g} at layers {layers_text} (the sidebar's layers); "
               f"explained in {exp.seconds.get('total', 0):.1f} s.")
    answers = compute.why_answers(exp)
    st.markdown(
        f"- **Which blocks' adapters make it fire?** {answers['blocks']}\n"
        f"- **Attention or MLP?** {answers['route']}\n"
        f"- **Which tokens trigger it?** {answers['tokens']}\n"
        f"- **Where does the representation go?** {answers['goes']}"
    )
    pos = _token_choice(exp)
    figs = compute.why_figures(exp, pos)
    st.subheader("Which blocks, through attention or the MLP")
    state.chart(figs.block_share, "why_block_share", name="cbscope_why_block_share")
    left, right = st.columns(2)
    state.chart(figs.patching, "why_patching", name="cbscope_why_patching", where=left)
    state.chart(figs.effects, "why_effects", name="cbscope_why_effects", where=right)
    with st.expander("Shares of every component across all tokens"):
        state.chart(figs.shares, "why_shares", name="cbscope_why_shares")
    st.subheader("Which tokens trigger it")
    state.chart(figs.attribution, "why_attribution", name="cbscope_why_attribution")
    st.subheader("Where the representation goes")
    state.chart(figs.lens, "why_lens", name="cbscope_why_lens")
    left, right = st.columns(2)
    state.chart(figs.pca, "why_pca", name="cbscope_why_pca", where=left)
    state.chart(figs.direction, "why_direction", name="cbscope_why_direction", where=right)
    st.download_button("Download the explanation (JSON)",
                       json.dumps(exp.to_dict(), default=str),
                       file_name="cbscope_explain.json", mime="application/json")
    if st.button("← Where does it fire?", key="why_back"):
        state.navigate("where", pos=None)
    st.info("Next: hover the logit-lens heatmap for both models' top predictions; pick another "
            "token above; `cbscope explain` writes the same as explain.json and HTML.")
