"""Thin launcher: ``streamlit run app/studio.py`` serves the studio packaged in ``gear_lab.studio``.

``gear-lab app`` runs the packaged script directly; this file exists for the project's top-level
``app/`` layout and runs the same code.
"""

import runpy

from gear_lab.studio import STUDIO_SCRIPT

runpy.run_path(str(STUDIO_SCRIPT), run_name="__main__")
