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
    st.plotly_chart(figs.block_share, key="why_block_share")
    left, right = st.columns(2)
    left.plotly_chart(figs.patching, key="why_patching")
    right.plotly_chart(figs.effects, key="why_effects")
    with st.expander("Shares of every component across all tokens"):
        st.plotly_chart(figs.shares, key="why_shares")
    st.subheader("Which tokens trigger it")
    st.plotly_chart(figs.attribution, key="why_attribution")
    st.subheader("Where the representation goes")
    st.plotly_chart(figs.lens, key="why_lens")
    left, right = st.columns(2)
    left.plotly_chart(figs.pca, key="why_pca")
    right.plotly_chart(figs.direction, key="why_direction")
    st.download_button("Download the explanation (JSON)",
                       json.dumps(exp.to_dict(), default=str),
                       file_name="cbscope_explain.json", mime="application/json")
    if st.button("← Where does it fire?", key="why_back"):
        state.navigate("where", pos=None)
    st.info("Next: hover the logit-lens heatmap for both models' top predictions; pick another "
            "token above; `cbscope explain` writes the same as explain.json and HTML.")
