"""gear-lab studio: the Streamlit entry point (``gear-lab app [DUMP]``).

Pages live in ``app_pages/``; shared cached loaders and widgets in ``state.py``; figures come from
:mod:`gear_lab.plots` (the notebooks draw with the same builders).
"""

from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="gear-lab studio", page_icon="⚙️", layout="wide")

PAGES = [
    st.Page("app_pages/dumps.py", title="Dumps", icon="📦", default=True),
    st.Page("app_pages/explorer.py", title="Error explorer", icon="🔍"),
    st.Page("app_pages/spectra.py", title="Spectra", icon="📉"),
    st.Page("app_pages/outliers.py", title="Outliers", icon="📌"),
    st.Page("app_pages/sweeps.py", title="Sweeps", icon="🧮"),
    st.Page("app_pages/live.py", title="Live generation", icon="💬"),
]

st.navigation(PAGES).run()
