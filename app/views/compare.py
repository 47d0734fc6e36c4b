"""View "Compare": two or three breakers, or a request and its look-alike, on shared axes.

Everything the view shows lives in the URL like the other views: ``cmp`` (``breakers`` or
``prompts``), ``b2``/``b3`` (breakers B and C), ``tokens`` (``base``/``a``: whose continuation
the breakers read), ``look`` (the look-alike request), ``stack`` and ``diff``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from .. import compute, state

MODES = {"breakers": "Two or three breakers, same tokens",
         "prompts": "A request and its benign look-alike, one breaker"}
TOKENS_FROM = {"base": "the base model (adapter off)", "a": "breaker A"}
NONE = ""


def _breaker_choice(sel: state.Selection, slot: str, options: list[str]) -> str:
    """Breaker B or C: a known adapter, another folder, or none (C only)."""
    url = state.query(slot)
    key = f"cmp_{slot}"
    folder_key = f"cmp_{slot}_folder"
    choices = ([NONE] if slot == "b3" else []) + options + [state.FOLDER]
    if key not in st.session_state:
        if url and url in options:
            st.session_state[key] = url
        elif url:
            st.session_state[key] = state.FOLDER
            st.session_state[folder_key] = url
        else:
            rest = [o for o in options if o != sel.adapter]
            st.session_state[key] = rest[0] if slot == "b2" and rest else choices[0]
    if st.session_state[key] not in choices:
        st.session_state[key] = choices[0]
    name = "Breaker B" if slot == "b2" else "Breaker C (optional)"
    choice = st.selectbox(name, choices, key=key,
                          format_func=lambda p: "(none)" if p == NONE else state.adapter_label(p))
    if choice == state.FOLDER:
        state.init(folder_key, "")
        return st.text_input(f"{name}: adapter folder", key=folder_key,
                             placeholder="/path/to/adapter").strip()
    return choice


def _check_breaker(sel: state.Selection, adapter: str) -> str:
    """'' when the adapter can be compared, else the sentence that says why not."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        return f"The adapter folder {path} does not exist: type the folder of a LoRA adapter."
    return state.adapter_mismatch(sel.model, sel.model_path, path)


def _breakers(sel: state.Selection, request: state.Request) -> compute.Comparison | None:
    options = [str(p) for p in state.adapters_for(sel.model)]
    col1, col2, col3 = st.columns(3)
    with col1:
        b2 = _breaker_choice(sel, "b2", options)
    with col2:
        b3 = _breaker_choice(sel, "b3", options)
    state.init("cmp_tokens", state.query("tokens", "base") if state.query("tokens", "base")
               in TOKENS_FROM else "base")
    tokens_from = col3.radio("The breakers read the continuation of", list(TOKENS_FROM),
                             format_func=TOKENS_FROM.get, key="cmp_tokens",
                             help="Every breaker reads the very same ids, so their cosines sit at "
                                  "the same positions.")
    state.set_query(b2=b2 or None, b3=b3 or None, tokens=tokens_from)
    adapters = [sel.adapter] + [b for b in (b2, b3) if b]
    if len(adapters) < 2:
        st.warning("Choose breaker B (a second adapter for this model) to compare; the Train view "
                   "makes more.")
        return None
    for adapter in adapters[1:]:
        problem = _check_breaker(sel, adapter)
        if problem:
            st.error(problem)
            return None
    labels = [f"{letter}: {state.adapter_label(a)}" for letter, a in zip("ABC", adapters,
                                                                         strict=False)]
    sel.require_pair()
    try:
        compute.check_request(sel.pair, request.prompt, request.prefill, request.gen)
    except state.PromptError as err:
        st.warning(state.sentence(str(err)))
        return None
    with st.spinner(f"Loading {len(adapters)} breakers and tracing the same tokens…"):
        return state.compare_breakers(sel.model, tuple(adapters), tuple(labels), sel.device,
                                      sel.dtype, request.prompt, request.prefill, request.gen,
                                      tokens_from)


def _prompts(sel: state.Selection, request: state.Request) -> compute.Comparison | None:
    state.init("cmp_look", state.query("look") or compute.default_lookalike(sel.model_path))
    look = st.text_input("The benign look-alike (traced with the same prefill and N)",
                         key="cmp_look").strip()
    state.set_query(look=look or None)
    if not look:
        st.warning("Type a look-alike request to compare with.")
        return None
    second = state.Request(look, request.prefill, request.gen)
    first_trace = state.traced(sel, request)
    second_trace = state.traced(sel, second)
    return compute.compare_prompts([first_trace, second_trace],
                                   [f"A: {request.prompt[:40]}", f"B: {look[:40]}"])


def _clicked(key: str, comparison: compute.Comparison) -> None:
    points = [p for p in state.selected_points(key) if p.get("customdata")]
    if not points:
        st.caption("Click a heatmap cell to open that token here.")
        return
    data = points[0]["customdata"]
    if key == "cmp_diff":
        token_a, token_b, cos_a, cos_b, diff, layer = data[:6]
        st.markdown(f"**Layer {layer}**: A reads {token_a}, cosine **{cos_a:.3f}**; B reads "
                    f"{token_b}, cosine **{cos_b:.3f}** (difference {diff:+.3f}).")
        return
    label, cos, norm_o, norm_cb, layer, _pos, who = data
    st.markdown(f"**{who}**: token {label}, layer {layer}: cosine **{cos:.3f}**, norm "
                f"{norm_o:.2f} (original) vs {norm_cb:.2f} (circuit-broken).")


def render(sel: state.Selection) -> None:
    """Draw the view."""
    st.header("Compare")
    st.caption("Two or three breakers on the same tokens, or a harmful request and its benign "
               "look-alike through one breaker, on one set of axes: a colour per trace and a "
               "dash per layer, heatmaps with one colour scale, and where they differ. The "
               "request, prefill and N are the form's; breaker A is the sidebar's.")
    state.init("cmp_mode", state.query("cmp", "breakers") if state.query("cmp", "breakers")
               in MODES else "breakers")
    mode = st.radio("Compare", list(MODES), format_func=MODES.get, key="cmp_mode",
                    horizontal=True)
    state.set_query(cmp=mode)
    if mode == "prompts":
        state.set_query(b2=None, b3=None, tokens=None)
    else:
        state.set_query(look=None)
    sel.require_pair()
    request = state.request_form(sel, "compare_form", button="Compare")
    try:
        comparison = _breakers(sel, request) if mode == "breakers" else _prompts(sel, request)
    except state.USER_ERRORS as err:
        state.show_error(err, "cannot compare")
        return
    if comparison is None:
        return
    st.caption(comparison.note)
    st.dataframe(pd.DataFrame(compute.compare_rows(comparison, sel.layers, sel.threshold)),
                 hide_index=True, key="cmp_table")

    n = len(comparison.traces[0].tokens[0])
    window = (state.window_control(n, "cmp_window") if comparison.align == "position"
              else None)
    col1, col2 = st.columns(2)
    state.init("cmp_stack", state.query("stack") == "1")
    stacked = col1.checkbox("Heatmaps one above the other (one token axis)", key="cmp_stack")
    diff = 1
    if len(comparison.traces) > 2:
        state.init("cmp_diff_with", state.parse_int(state.query("diff", "1"), 1, 1, 2))
        diff = int(col2.selectbox("Difference of", [1, 2], key="cmp_diff_with",
                                  format_func=lambda i: f"{comparison.labels[i]} minus "
                                                        f"{comparison.labels[0]}"))
    state.set_query(stack="1" if stacked else None, diff=diff if diff != 1 else None)
    figs = compute.compare_figures(comparison, sel.layers, sel.threshold, stacked=stacked,
                                   diff=diff, window=window)
    state.chart(figs.lines, "cmp_lines", name="cbscope_compare_lines")
    state.chart(figs.heatmaps, "cmp_heatmaps", name="cbscope_compare_heatmaps", clickable=True)
    _clicked("cmp_heatmaps", comparison)
    if figs.difference is not None:
        st.markdown("**Where they differ**")
        state.chart(figs.difference, "cmp_diff", name="cbscope_compare_difference",
                    clickable=True)
        _clicked("cmp_diff", comparison)
        rows = compute.top_differences(comparison.traces[0], comparison.traces[diff],
                                       comparison.align)
        st.dataframe(_rounded(rows), hide_index=True, key="cmp_top")
    st.info("The page's URL holds this comparison: copy it to share it.")


def _rounded(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in ("cos A", "cos B", "difference"):
        if column in frame:
            frame[column] = frame[column].round(3)
    return frame
