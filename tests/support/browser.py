"""Driving the chat page in Chromium (tests/browser): opening it, sending, waiting for answers, focus,
screenshots, and the checks every state of the page must pass (phone width, labelled controls)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import ROOT

try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment: tests/browser/conftest.py skips, loudly
    Page = expect = sync_playwright = None

ARTIFACTS = ROOT / "artifacts"
"""Screenshots (gitignored)."""
ANSWER_TIMEOUT_MS = 30_000
DESKTOP = {"width": 1100, "height": 820}
PHONE = {"width": 390, "height": 844}


SETTINGS_STORE = "thumbtune.sampling"
"""Where the page keeps its answer settings (service/static/app.js)."""


def open_page(page: Page, server, max_tokens: int | None = 16) -> None:  # noqa: ANN001 - a LiveServer
    """Open the chat page; ``max_tokens`` sets its answer length first (the tiny model's answers stay short
    and a conversation fits the test server's context), None keeps the page's own default."""
    if max_tokens is not None:
        settings = json.dumps({"max_tokens": max_tokens})
        page.add_init_script(f"localStorage.setItem({SETTINGS_STORE!r}, {settings!r})")
    page.goto(server.url + "/")
    expect(page.locator("html[data-ready=true]")).to_have_count(1)
    expect(page.get_by_role("heading", name="thumbtune")).to_be_visible()


def answers(page: Page):
    return page.locator("article.msg-assistant")


def wait_for_answers(page: Page, done_total: int, timeout_ms: int = ANSWER_TIMEOUT_MS) -> None:
    """Until `done_total` answers have finished streaming."""
    expect(page.locator("article.msg-assistant[data-state=done]")).to_have_count(
        done_total, timeout=timeout_ms
    )


def send(page: Page, text: str, done_total: int, timeout_ms: int = ANSWER_TIMEOUT_MS) -> None:
    """Type a message, send it with the button and wait until `done_total` answers have finished."""
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_role("button", name="Send").click()
    wait_for_answers(page, done_total, timeout_ms)


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def assert_fits_phone_width(page: Page) -> None:
    page.set_viewport_size(PHONE)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways at {PHONE['width']} px ({overflow} px too wide)"


def assert_controls_are_labelled(page: Page) -> None:
    """Every visible button, input and textarea has an accessible name (checked in the page)."""
    unnamed = page.evaluate("""() => [...document.querySelectorAll('button, input, textarea, select')]
        .filter(el => el.getClientRects().length || el.closest('.switch, .star'))
        .filter(el => !(el.getAttribute('aria-label') || el.labels?.length || el.textContent.trim()
                        || el.getAttribute('aria-labelledby')))
        .map(el => el.outerHTML.slice(0, 80))""")
    assert unnamed == [], f"controls without a label: {unnamed}"


def focused(page: Page) -> str:
    """A short description of the focused element: its id or accessible label or text."""
    return page.evaluate("""() => { const el = document.activeElement;
        return el.id || el.getAttribute('aria-label') || el.textContent.trim() || el.tagName; }""")


def tab_to(page: Page, target: str, key: str = "Tab", limit: int = 25) -> None:
    for _ in range(limit):
        if focused(page) == target:
            return
        page.keyboard.press(key)
    raise AssertionError(f"{target!r} is not reachable with {key} (focus ended on {focused(page)!r})")
