"""The chat page at / in a real headless Chromium, against a real server and the session broker.

Playwright for Python drives Debian's chromium (tests/browser/conftest.py); `make test` installs both where
it can. Screenshots go to artifacts/ (gitignored).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.support import ROOT, USER_CACHE
from tests.support.browser import (
    Page,
    answers,
    assert_controls_are_labelled,
    assert_fits_phone_width,
    expect,
    focused,
    open_page,
    screenshot,
    send,
    tab_to,
    wait_for_answers,
)
from tests.support.kafka import feedback_events

pytestmark = pytest.mark.broker


def test_streamed_answers_thumb_up_multi_turn_and_screenshot(
    page: Page,
    live_server_factory,
    broker,
) -> None:
    server = live_server_factory()
    open_page(page, server)
    send(page, "Hello! What can you do?", 1)
    first = answers(page).nth(0)
    assert int(first.get_attribute("data-chunks")) >= 2, "the answer did not arrive as a stream of chunks"
    assert first.locator(".msg-body").inner_text().strip()
    expect(first.locator(".badge-adapter")).to_contain_text("v0")  # the adapter version that answered
    assert first.get_attribute("data-adapter") == "v0"

    send(page, "Tell me more, please.", 2)  # the second turn carries the first as context
    second = answers(page).nth(1)
    up = second.get_by_role("button", name="Good answer")
    up.click()
    expect(up).to_have_attribute("aria-pressed", "true")
    expect(second.get_by_role("status")).to_contain_text("Thanks")
    expect(second.get_by_role("button", name="Bad answer")).to_be_disabled()
    assert_controls_are_labelled(page)

    rid = second.get_attribute("data-response-id")
    assert rid and rid != first.get_attribute("data-response-id")
    ev = feedback_events(server.runtime.publisher, broker.bootstrap, {rid}, 1)[rid]
    assert ev.reward == 1.0 and ev.kind.value == "thumb" and ev.value == "up"
    assert ev.adapter_version == "v0"
    assert [m.role for m in ev.messages] == ["user", "assistant", "user"]
    assert (
        ev.messages[0].content == "Hello! What can you do?"
        and ev.messages[2].content == "Tell me more, please."
    )
    assert ev.messages[1].content == first.locator(".msg-body").evaluate("el => el.textContent")

    shot = screenshot(page, "chat-page.png")
    assert shot.stat().st_size > 10_000
    assert_fits_phone_width(page)
    screenshot(page, "chat-page-phone.png")


def test_compare_mode_pick_the_better_of_two_streamed_answers(
    page: Page,
    live_server_factory,
    broker,
) -> None:
    server = live_server_factory()
    open_page(page, server)
    page.get_by_role("switch", name="Compare").check()
    send(page, "Name a colour.", 2)
    turn = page.locator("li.turn-compare")
    a, b = turn.get_by_role("article", name="Answer A"), turn.get_by_role("article", name="Answer B")
    for card in (a, b):
        expect(card.locator(".badge-adapter")).to_contain_text("v0")
    rid_a, rid_b = a.get_attribute("data-response-id"), b.get_attribute("data-response-id")
    assert rid_a and rid_b and rid_a != rid_b

    choose_b = turn.get_by_role("button", name="B is better")
    choose_b.click()
    expect(choose_b).to_have_attribute("aria-pressed", "true")
    expect(turn.get_by_role("status")).to_contain_text("You preferred answer B")
    expect(turn.get_by_role("button", name="A is better")).to_be_disabled()

    events = feedback_events(server.runtime.publisher, broker.bootstrap, {rid_a, rid_b}, 2)
    assert events[rid_b].reward == 1.0 and events[rid_b].value == "chosen"
    assert events[rid_a].reward == -1.0 and events[rid_a].value == "rejected"
    assert events[rid_b].paired_response_id == rid_a
    screenshot(page, "chat-page-compare.png")
    assert_fits_phone_width(page)
    screenshot(page, "chat-page-compare-phone.png")


def test_keyboard_only_thumbs_and_rating(page: Page, live_server_factory, broker) -> None:
    """No mouse: Tab to the message box, type, Enter; Shift+Tab back to the thumb; Space presses it."""
    server = live_server_factory()
    open_page(page, server)
    tab_to(page, "prompt")
    page.keyboard.type("Hi from the keyboard")
    page.keyboard.press("Enter")
    wait_for_answers(page, 1)
    assert focused(page) == "prompt", "focus should stay in the message box after sending"

    tab_to(page, "Good answer", key="Shift+Tab")
    page.keyboard.press("Space")
    answer = answers(page).nth(0)
    expect(answer.get_by_role("button", name="Good answer")).to_have_attribute("aria-pressed", "true")
    expect(answer.get_by_role("status")).to_contain_text("Thanks")
    rid = answer.get_attribute("data-response-id")

    # The 1-5 rating with a comment, also by keyboard only: open the panel, arrow keys pick the rating.
    tab_to(page, "prompt")
    page.keyboard.type("One more")
    page.keyboard.press("Enter")
    wait_for_answers(page, 2)
    tab_to(page, "Rate 1–5…", key="Shift+Tab")
    page.keyboard.press("Enter")
    assert focused(page).startswith("rating-"), "opening the rating panel should focus the first rating"
    for _ in range(3):
        page.keyboard.press("ArrowRight")  # 1 -> 4
    page.keyboard.press("Tab")
    page.keyboard.type("Clear, but a bit short.")
    screenshot(page, "chat-page-rating.png")
    page.keyboard.press("Tab")
    assert focused(page) == "Send rating"
    page.keyboard.press("Enter")
    second = answers(page).nth(1)
    expect(second.get_by_role("status")).to_contain_text("4 out of 5")
    rid2 = second.get_attribute("data-response-id")

    events = feedback_events(server.runtime.publisher, broker.bootstrap, {rid, rid2}, 2)
    assert events[rid].reward == 1.0 and events[rid].value == "up"
    assert events[rid2].reward == 0.5 and events[rid2].value == 4
    assert events[rid2].comment == "Clear, but a bit short."


def test_api_key_is_asked_for_kept_in_local_storage_and_used(
    page: Page,
    live_server_factory,
    broker,
) -> None:
    server = live_server_factory(api_keys="page-key")
    users: list[str] = []  # the `user` of every chat request: this browser's id (canaries are per user)

    def record_user(request) -> None:  # noqa: ANN001
        if request.url.endswith("/v1/chat/completions"):
            users.append(json.loads(request.post_data)["user"])

    page.on("request", record_user)
    open_page(page, server)
    page.get_by_label("Message", exact=True).fill("Hello?")
    page.get_by_role("button", name="Send").click()
    key_box = page.get_by_label("API key")
    expect(key_box).to_be_focused()
    expect(page.locator("#key-help")).to_contain_text("needs an API key")
    screenshot(page, "chat-page-api-key.png")
    key_box.fill("wrong-key")
    page.get_by_role("button", name="Save key").click()
    expect(page.locator("#key-help")).to_contain_text("not accepted")
    key_box.fill("page-key")
    page.get_by_role("button", name="Save key").click()
    wait_for_answers(page, 1)  # the message was retried
    expect(page.locator("li.turn-user")).to_have_count(1)
    assert page.evaluate("localStorage.getItem('thumbtune.apiKey')") == "page-key"

    page.reload()  # the key survives a reload: no prompt this time
    expect(page.get_by_role("button", name="Forget API key")).to_be_visible()
    send(page, "Hello again", 1)
    expect(page.locator("#key-form")).to_be_hidden()
    answer = answers(page).nth(0)
    answer.get_by_role("button", name="Bad answer").click()
    expect(answer.get_by_role("status")).to_contain_text("Thanks")
    rid = answer.get_attribute("data-response-id")
    ev = feedback_events(server.runtime.publisher, broker.bootstrap, {rid}, 1)[rid]
    assert ev.reward == -1.0 and ev.value == "down" and ev.api_key_id is not None
    assert len(users) >= 3 and len(set(users)) == 1 and users[0].startswith("browser-"), users  # and reloads


def test_errors_are_shown_inline_in_plain_words(page: Page, live_server_factory) -> None:
    server = live_server_factory(completion_ttl_s=1)
    open_page(page, server)

    # An expired answer can no longer be rated.
    send(page, "Quick one", 1)
    time.sleep(1.3)
    answer = answers(page).nth(0)
    answer.get_by_role("button", name="Good answer").click()
    expect(answer.get_by_role("status")).to_contain_text("can no longer be rated")
    expect(answer.get_by_role("button", name="Good answer")).to_have_attribute("aria-pressed", "false")

    # Rate limits and a busy server (the page's handling of 429 and 503 with Retry-After).
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=429,
            headers={"retry-after": "20"},
            content_type="application/json",
            body='{"error": {"message": "rate limit", "type": "rate_limit_error", '
            '"param": null, "code": null}}',
        ),
    )
    page.get_by_label("Message", exact=True).fill("Again")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("alert")).to_contain_text(
        "Too many requests right now. Please try again in 20 seconds."
    )
    page.unroute("**/v1/chat/completions")
    page.get_by_role("button", name="Try again").click()  # retry works once the limit is gone
    wait_for_answers(page, 2)
    expect(page.get_by_role("alert")).to_have_count(0)

    page.route(
        "**/v1/feedback",
        lambda route: route.fulfill(
            status=503,
            headers={"retry-after": "30"},
            content_type="application/json",
            body='{"error": {"message": "backlog", "type": "service_unavailable", '
            '"param": null, "code": null}}',
        ),
    )
    second = answers(page).nth(1)
    second.get_by_role("button", name="Good answer").click()
    expect(second.get_by_role("status")).to_contain_text(
        "can't take ratings right now. Please try again in 30"
    )
    expect(second.get_by_role("button", name="Good answer")).to_be_enabled()  # the user can try again
    page.unroute("**/v1/feedback")

    # The server goes away.
    server.__exit__(None, None, None)
    page.get_by_label("Message", exact=True).fill("Are you there?")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("alert")).to_contain_text("Can't reach the server")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    screenshot(page, "chat-page-errors.png")


def test_page_and_assets_are_served_without_anything_external(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("/static/app.css", "/static/compare.js", "/static/app.js"):
        assert asset in page.text
        assert client.get(asset).status_code == 200
    for name in ("index.html", "app.css", "compare.js", "app.js"):
        text = client.get(f"/static/{name}").text
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, (
            f"{name} refers to something outside this server"
        )


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("THUMBTUNE_DOCS_SCREENSHOT"),
    reason="opt-in: THUMBTUNE_DOCS_SCREENSHOT=1 redraws docs/chat-page.png with the real model",
)
def test_redraw_readme_screenshot(page: Page, live_server_factory) -> None:
    """docs/chat-page.png for the README: the real embedded model, a thumbed-up answer and a compare turn.

    Sampling is pinned (temperature 0.7, fixed seeds) by rewriting the page's requests, so the
    picture is the same on every redraw.
    """
    server = live_server_factory(model="embedded", cache_dir=USER_CACHE, default_max_tokens=40)
    seeds = iter([1, 2])

    def pin_sampling(route) -> None:
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps(body | {"temperature": 0.7, "seed": next(seeds)}))

    page.route("**/v1/chat/completions", pin_sampling)
    page.set_viewport_size({"width": 1000, "height": 830})
    open_page(page, server)
    send(page, "What is the capital of France?", 1, timeout_ms=180_000)
    answers(page).nth(0).get_by_role("button", name="Good answer").click()
    expect(page.locator("[aria-pressed=true]")).to_have_count(1)
    page.get_by_role("switch", name="Compare").check()
    send(page, "Give me one tip for sleeping better.", 3, timeout_ms=180_000)
    page.get_by_role("button", name="A is better").click()
    expect(page.locator(".msg.chosen")).to_have_count(1)
    page.locator("main").evaluate("m => m.scrollTop = m.scrollHeight")
    page.screenshot(path=str(ROOT / "docs" / "chat-page.png"))
