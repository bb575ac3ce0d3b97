"""The gear-lab studio (Streamlit), shipped inside the package so ``pip install .`` serves it.

``studio.py`` is the Streamlit entry script (``st.navigation`` over ``app_pages/``), ``state.py``
holds the shared cached loaders and widgets. ``gear-lab app`` runs :data:`STUDIO_SCRIPT`.
"""

from __future__ import annotations

from pathlib import Path

DUMP_ENV = "GEAR_LAB_DUMP"  # environment variable naming the dump the studio opens first
STUDIO_SCRIPT = Path(__file__).resolve().parent / "studio.py"
