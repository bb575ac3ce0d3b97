"""Real-browser test of the studio: ``gear-lab app DUMP`` headless, driven by Debian's chromium.

Every page is opened in chromium (through playwright; it cannot download its own browser here,
``.ci/run`` installs ``chromium``), must render its plotly charts and show no exception; a
screenshot of each lands in ``test-artifacts/screenshots/<page>.png``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
# page -> (url path, plotly charts it must render, button to press first)
PAGES = {
    "dumps": ("", 0, None),
    "explorer": ("explorer", 3, None),
    "spectra": ("spectra", 3, None),
    "outliers": ("outliers", 4, None),
    "sweeps": ("sweeps", 2, "Run sweep"),
    "live": ("live", 1, "Generate"),
    "long_context": ("long_context", 1, "Run"),
}
TIMEOUT_MS = 240_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def studio(smol_dump: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of ``gear-lab app <smol_dump>`` served on a free local port; killed afterwards."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium (.ci/run does)")
    workdir = tmp_path_factory.mktemp("studio")
    port = _free_port()
    log = (workdir / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("gear-lab")),
            "app",
            str(smol_dump),
            "--port",
            str(port),
        ],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: streamlit goes down with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"gear-lab app exited {proc.returncode}: {(workdir / 'server.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gear-lab app did not answer on its port within 90 s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.mark.parametrize("name", list(PAGES))
def test_page_renders_in_chromium(name: str, studio: str, browser) -> None:
    path, charts, button = PAGES[name]
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(f"{studio}/{path}")
        page.get_by_role("heading", level=1).first.wait_for()
        if name == "live":  # fewest new tokens: the slider's first value
            page.get_by_role("slider").first.focus()
            page.keyboard.press("Home")
        if button:
            page.get_by_role("button", name=button).click()
        if charts:
            page.wait_for_function(
                "n => [...document.querySelectorAll('.js-plotly-plot')]"
                ".filter(e => e.querySelector('.main-svg')).length >= n",
                arg=charts,
                timeout=TIMEOUT_MS,
            )
        else:
            page.locator('[data-testid="stMetric"]').first.wait_for()
        if name == "dumps":  # the capture form comes last (after the installed-models scan)
            page.locator('[data-testid="stFormSubmitButton"]').first.wait_for()
        page.wait_for_selector('[data-testid="stStatusWidget"]', state="detached")
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.locator(".js-plotly-plot").count() >= charts
        # the app scrolls inside its main block: grow the window to show the whole page
        height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
        page.set_viewport_size({"width": 1500, "height": min(int(height) + 50, 8000)})
        page.wait_for_timeout(500)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
    finally:
        page.close()
