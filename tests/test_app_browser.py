"""A real browser on the app: Debian's chromium, driven by Playwright through `executable_path` (Playwright
downloads no browser), loads the page, runs one image comparison on ref-flux (the page's default model) and
checks that the slider and the metrics appear, then saves a screenshot (to $ACCEL_APP_SCREENSHOT when set, as
docs/app.png is made). Outside CI the test skips when Playwright or chromium is missing; in CI (CI=true, which
.ci/run sets after installing chromium) it fails instead."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

gr = pytest.importorskip("gradio")

from accel.app import build_app  # noqa: E402
from accel.app.ui import launch  # noqa: E402

IN_CI = os.environ.get("CI") == "true"
TIMEOUT_MS = 180_000  # for each wait: a loaded 2-core machine can take a minute for the first comparison


def _missing(what: str):
    if IN_CI:
        pytest.fail(f"{what} is missing in CI; .ci/run installs it")
    pytest.skip(f"{what} is not installed")


def _browser_parts():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright (pip install playwright; no browser download needed)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        _missing("Debian's chromium (apt-get install chromium)")
    return sync_playwright, chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_comparison_in_a_browser(tmp_path, monkeypatch):
    sync_playwright, chromium = _browser_parts()
    # The page as on a CPU without Triton's interpreter (which tests/conftest.py turns on): INT8 and sparse
    # attention are disabled with their reason, as a user on this machine sees them.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    demo = build_app(max_models=1, device="cpu")
    launch(demo, port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # root in CI
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(demo.local_url)
                page.get_by_text("Pick a model: loading it shows").wait_for()  # the page is built
                page.wait_for_timeout(3000)  # and its events are wired (a click before that is lost)
                page.get_by_role("button", name="Compare", exact=True).click()
                for row in ("wall time (s)", "denoiser passes computed / reused", "PSNR vs baseline (dB)"):
                    page.get_by_text(row).filter(visible=True).first.wait_for()  # gradio also keeps hidden copies
                pictures = page.locator("img[src*='/gradio_api/file=']")  # the slider's two pictures
                pictures.nth(1).wait_for()
                assert pictures.count() == 2 and all(pictures.nth(i).is_visible() for i in range(2))
                page.get_by_text("(balanced); PSNR").filter(visible=True).wait_for()  # the summary line
                page.get_by_text("INT8 attention needs a CUDA GPU").filter(visible=True).wait_for()
                shot = os.environ.get("ACCEL_APP_SCREENSHOT") or str(tmp_path / "app.png")
                page.screenshot(path=shot, full_page=True)
                assert os.path.getsize(shot) > 10_000
            finally:
                browser.close()
    finally:
        demo.close()
