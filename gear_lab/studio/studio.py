"""gear-lab studio: the Streamlit entry script (``gear-lab app [DUMP]``).

Pages live in ``app_pages/`` beside this file; shared cached loaders and widgets in ``state.py``;
figures come from :mod:`gear_lab.plots` (the notebooks draw with the same builders). Page paths
are absolute, so the top-level ``app/studio.py`` launcher can serve the same studio.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

st.set_page_config(page_title="gear-lab studio", page_icon=":material/settings:", layout="wide")

PAGE_DIR = Path(__file__).resolve().parent / "app_pages"

PAGES = [
    st.Page(PAGE_DIR / "dumps.py", title="Dumps", icon=":material/database:", default=True),
    st.Page(PAGE_DIR / "explorer.py", title="Error explorer", icon=":material/grid_on:"),
    st.Page(PAGE_DIR / "spectra.py", title="Spectra", icon=":material/show_chart:"),
    st.Page(PAGE_DIR / "outliers.py", title="Outliers", icon=":material/scatter_plot:"),
    st.Page(PAGE_DIR / "sweeps.py", title="Sweeps", icon=":material/tune:"),
    st.Page(PAGE_DIR / "live.py", title="Live generation", icon=":material/chat:"),
    st.Page(PAGE_DIR / "long_context.py", title="Long context", icon=":material/search:"),
]

st.navigation(PAGES).run()
