"""gear-lab studio: the Streamlit entry point (``gear-lab app [DUMP]``).

Pages live in ``app_pages/``; shared cached loaders and widgets in ``state.py``; figures come from
:mod:`gear_lab.plots` (the notebooks draw with the same builders).
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="gear-lab studio", page_icon=":material/settings:", layout="wide")

PAGES = [
    st.Page("app_pages/dumps.py", title="Dumps", icon=":material/database:", default=True),
    st.Page("app_pages/explorer.py", title="Error explorer", icon=":material/grid_on:"),
    st.Page("app_pages/spectra.py", title="Spectra", icon=":material/show_chart:"),
    st.Page("app_pages/outliers.py", title="Outliers", icon=":material/scatter_plot:"),
    st.Page("app_pages/sweeps.py", title="Sweeps", icon=":material/tune:"),
    st.Page("app_pages/live.py", title="Live generation", icon=":material/chat:"),
]

st.navigation(PAGES).run()
