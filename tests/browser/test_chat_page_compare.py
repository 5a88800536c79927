"""The chat page's compare mode with 3 and 4 answers and its answer settings, in real headless Chromium:
a ranking made by pointer (drag) and by keyboard alone, the best of several in one click, and the sampling
settings a request carries (shown, changeable, kept in the browser)."""

from __future__ import annotations

import pytest

from tests.support.browser import (
    PHONE,
    Page,
    assert_controls_are_labelled,
    assert_fits_phone_width,
    expect,
    focused,
    open_page,
    screenshot,
    send,
    tab_to,
)
from tests.support.kafka import feedback_events

pytestmark = pytest.mark.broker


def compare_with(page: Page, n: int, text: str = "Name a colour."):  # noqa: ANN201 - a Locator
    """Switch Compare on with ``n`` answers and send ``text``; returns the compare turn."""
    page.get_by_role("switch", name="Compare").check()
    page.get_by_label("Answers to compare").select_option(str(n))
    send(page, text, n)
    return page.locator("li.turn-compare").last


def response_ids(turn, labels: str) -> list[str]:  # noqa: ANN001 - a Locator
    return [turn.get_by_role("article", name=f"Answer {x}").get_attribute("data-response-id") for x in labels]


def test_three_answers_ranked_by_dragging_them(page: Page, live_server_factory, broker) -> None:  # noqa: ANN001
    server = live_server_factory()
    open_page(page, server)
    turn = compare_with(page, 3)
    expect(turn.locator(".compare-title")).to_have_text("Three answers. Pick the best, or rank them all.")
    a, b, c = response_ids(turn, "ABC")
    assert len({a, b, c}) == 3
    items = turn.locator(".rank-item")
    expect(items).to_have_text(["1stAnswer A↑↓", "2ndAnswer B↑↓", "3rdAnswer C↑↓"])
    items.nth(2).drag_to(items.nth(0))  # C to the top
    expect(items).to_have_text(["1stAnswer C↑↓", "2ndAnswer A↑↓", "3rdAnswer B↑↓"])
    turn.get_by_role("button", name="Send ranking").click()
    expect(turn.get_by_role("status")).to_contain_text("You ranked C, A, B, best first")
    expect(turn.get_by_role("button", name="Move A up")).to_be_disabled()
    expect(turn.get_by_role("button", name="C is best")).to_be_disabled()

    events = feedback_events(server.runtime.publisher, broker.bootstrap, {a, b, c}, 3)
    assert {rid: (e.kind.value, e.value, e.reward) for rid, e in events.items()} == {
        c: ("ranking", 1, 1.0),
        a: ("ranking", 2, 0.0),
        b: ("ranking", 3, -1.0),
    }
    assert events[a].sampling.temperature == 0.7 and events[a].sampling.top_p == 0.9  # the page's defaults
    assert_controls_are_labelled(page)
    screenshot(page, "chat-page-rank.png")
    assert_fits_phone_width(page)
    screenshot(page, "chat-page-rank-phone.png")


def test_four_answers_ranked_with_the_keyboard_alone(page: Page, live_server_factory, broker) -> None:  # noqa: ANN001
    server = live_server_factory()
    open_page(page, server)
    turn = compare_with(page, 4)
    ids = dict(zip("ABCD", response_ids(turn, "ABCD"), strict=True))
    tab_to(page, "Move D up", key="Shift+Tab")
    for _ in range(3):  # D to the top; the focus stays with D's arrows
        page.keyboard.press("Enter")
    assert focused(page) == "Move D down"
    expect(turn.get_by_role("status")).to_have_text("Answer D is now 1st.")
    tab_to(page, "Move A down", key="Shift+Tab")
    page.keyboard.press("Space")  # A below B
    tab_to(page, "Send ranking")
    page.keyboard.press("Enter")
    expect(turn.get_by_role("status")).to_contain_text("You ranked D, B, A, C, best first")

    events = feedback_events(server.runtime.publisher, broker.bootstrap, set(ids.values()), 4)
    places = {label: events[rid].value for label, rid in ids.items()}
    assert places == {"D": 1, "B": 2, "A": 3, "C": 4}
    assert {e.ranking_size for e in events.values()} == {4} and len(
        {e.ranking_id for e in events.values()}
    ) == 1


def test_the_best_of_three_in_one_click(page: Page, live_server_factory, broker) -> None:  # noqa: ANN001
    server = live_server_factory()
    open_page(page, server)
    turn = compare_with(page, 3)
    a, b, c = response_ids(turn, "ABC")
    best = turn.get_by_role("button", name="B is best")
    best.click()
    expect(best).to_have_attribute("aria-pressed", "true")
    expect(turn.get_by_role("status")).to_contain_text("You picked answer B as the best")
    expect(turn.get_by_role("button", name="Send ranking")).to_be_disabled()
    events = feedback_events(server.runtime.publisher, broker.bootstrap, {a, b, c}, 3)
    assert {rid: (e.value, e.reward) for rid, e in events.items()} == {
        b: ("chosen", 1.0),
        a: ("rejected", -1.0),
        c: ("rejected", -1.0),
    }


def test_answer_settings_are_shown_changeable_and_kept(page: Page, live_server_factory, broker) -> None:  # noqa: ANN001
    server = live_server_factory()
    open_page(page, server, max_tokens=None)
    page.get_by_text("Answer settings").click()
    for label, default in (("Temperature", "0.7"), ("Top-p", "0.9"), ("Max length", "128")):
        expect(page.get_by_label(label)).to_have_value(default)
    page.get_by_label("Max length").fill("6")
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Temperature").press("Tab")  # change: saved in this browser
    page.reload()
    page.get_by_text("Answer settings").click()
    expect(page.get_by_label("Max length")).to_have_value("6")
    send(page, "Say hello.", 1)
    rid = page.locator("article.msg-assistant").last.get_attribute("data-response-id")
    page.get_by_role("button", name="Good answer").click()
    (event,) = feedback_events(server.runtime.publisher, broker.bootstrap, {rid}, 1).values()
    assert event.sampling.max_tokens == 6 and event.sampling.temperature == 0.0
    assert len(event.response_token_ids) <= 6
    page.get_by_label("Max length").fill("5000")  # out of range: the default is sent, the field says so
    expect(page.get_by_label("Max length")).to_have_js_property("validity.valid", False)
    page.get_by_role("button", name="Back to the defaults").click()
    expect(page.get_by_label("Max length")).to_have_value("128")
    page.set_viewport_size(PHONE)
    assert_fits_phone_width(page)
