"""cbscope's Streamlit dashboard (``cbscope app``, ``cbscope demo``).

``cbscope_app.py`` is the Streamlit script; :mod:`app.state` holds the URL/sidebar/caches,
:mod:`app.compute` what is computed (Streamlit-free, shared with the benchmark) and
:mod:`app.views` one module per view.
"""
