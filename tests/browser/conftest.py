"""Browser tests: the chat page in Debian's headless chromium, driven by Playwright (its own browser
download is never used). Without either, every test here is skipped with a loud reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.browser import ANSWER_TIMEOUT_MS, DESKTOP, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip(
            "!!! CHAT PAGE BROWSER TESTS NOT RUN: the 'playwright' package is missing "
            "(`make test` installs it; or .venv/bin/pip install playwright) !!!"
        )
    if not CHROMIUM.exists():
        pytest.skip(
            f"!!! CHAT PAGE BROWSER TESTS NOT RUN: {CHROMIUM} is missing "
            "(`make test` installs it when it can; or as root: apt-get install -y chromium) !!!"
        )
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (empty localStorage); any uncaught JavaScript error fails the test."""
    context = browser.new_context(viewport=DESKTOP, reduced_motion="reduce")
    page = context.new_page()
    page.set_default_timeout(ANSWER_TIMEOUT_MS)
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    yield page
    context.close()
    assert not js_errors, f"JavaScript errors on the page: {js_errors}"
