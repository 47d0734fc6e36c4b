"""cbscope dashboard: run with ``cbscope app`` (or ``streamlit run app/cbscope_app.py``).

Views: "Where does it fire?" (one request or conversation, Figure 6), "Why does it fire?"
(decomposition, adapter patching, attribution, logit lens, direction), "Compare" (two or three
breakers, or a request and its look-alike, on shared axes), "Dataset" (firing
statistics), "Train" (a LoRRA run with live curves), "Probe" (a harmfulness probe beside the
trace) and "Generalisation" (the cross-category matrix of ``cbscope generalise``). The model
pair comes from the sidebar, the URL (``?model=...&adapter=...``) or the environment
(``CBSCOPE_APP_MODEL``, ``CBSCOPE_APP_ADAPTER``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if (HERE.parent / "__init__.py").is_file():
    PACKAGE = f"{HERE.parent.name}.{HERE.name}"  # installed: the wheel ships app/ as cbscope.app
else:
    PACKAGE = HERE.name  # a checkout: app/ beside cbscope/, wherever Streamlit was started from
    if str(HERE.parent) not in sys.path:
        sys.path.insert(0, str(HERE.parent))
# Streamlit runs this file as a script; naming its package makes the relative imports work
# (PEP 366) under either name.
__package__ = PACKAGE  # noqa: A001

import streamlit as st  # noqa: E402

st.set_page_config(page_title="cbscope", page_icon="⚡", layout="wide")

_STARTING = f"{PACKAGE}.state" not in sys.modules  # the first run of this server process
if _STARTING:  # a visible loading state while torch, transformers and cbscope import
    _loading = st.empty()
    _loading.info("⏳ Starting cbscope: importing torch, transformers and TransformerLens (about "
                  "10-30 s, once per server), then loading the model pair…")

import torch  # noqa: E402

torch.set_num_threads(1)

from . import state  # noqa: E402
from .views import compare, dataset, generalisation, probe, train, where, why  # noqa: E402

RENDERERS = {"where": where.render, "why": why.render, "compare": compare.render,
             "dataset": dataset.render, "train": train.render,
             "probe": probe.render, "generalisation": generalisation.render}


def main() -> None:
    """One run of the script."""
    state.apply_pending()
    try:
        sel = state.sidebar()
    except Exception as err:  # noqa: BLE001 - a sentence in the page, never a trace
        state.show_error(err, "the sidebar failed")
        return
    finally:
        if _STARTING:
            _loading.empty()
    if sel.error and sel.view not in ("train", "generalisation"):
        st.error(sel.error)
    try:
        RENDERERS[sel.view](sel)
    except Exception as err:  # noqa: BLE001
        state.show_error(err, state.VIEWS[sel.view])


main()
