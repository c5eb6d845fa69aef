"""Model output and user text are shown, never run (acceptance 3, without knowledge bases).

The payloads are put where they would be shown: typed as the user's message, and stored as an
assistant's answer (so rendering is proven without hoping the model echoes them).
"""

from playwright.sync_api import expect

from tests.site.conftest import ask, create_conversation, wait_answered

PAYLOADS = [
    "<script>window.pwned=1</script>",
    '<img src=x onerror="window.pwned=1">',
    "[x](javascript:window.pwned=1)",
]
# More ways in, for the Markdown renderer: raw HTML blocks, autolinks, images, entity tricks.
MORE_PAYLOADS = [
    "<svg onload=window.pwned=1></svg>",
    '<iframe srcdoc="<script>parent.pwned=1</script>"></iframe>',
    '<a href="javascript:window.pwned=1">click</a>',
    "![y](javascript:window.pwned=1)",
    "[z](JaVaScRiPt:window.pwned=1)",
    "[w](&#106;avascript:window.pwned=1)",
    '<div onmouseover="window.pwned=1">hover</div>',
]


def assert_inert(page):
    """Nothing ran, and no live element or script URL came out of the text."""
    assert page.evaluate("typeof window.pwned") == "undefined"
    messages = page.locator("#messages")
    for selector in ["script", "img", "svg", "iframe", "[onerror]", "[onload]", "[onmouseover]", 'a[href^="javascript" i]']:
        assert messages.locator(selector).count() == 0, selector
    for link in messages.locator("a").all():
        assert link.get_attribute("href").startswith(("http://", "https://", "mailto:"))


def test_payloads_typed_as_the_message_show_as_literal_text(page, chat_user):
    text = "\n".join(PAYLOADS)
    ask(page, text, **{"Max new tokens": 4})
    wait_answered(page)
    expect(page.locator('[data-role="user"]')).to_have_text(text)
    assert_inert(page)

    page.reload()  # the stored message, rendered by the server this time
    expect(page.locator('[data-role="user"]')).to_have_text(text)
    assert_inert(page)
    # The conversation's title (taken from the message) is text too.
    expect(page.locator("#conversation-title")).to_contain_text("<script>window.pwned=1</script>")
    assert_inert(page)
    assert not page.script_errors


def test_payloads_in_a_stored_answer_show_as_literal_text(page, chat_user):
    answer = "\n\n".join(
        ["Here is **bold** and `code`:", *PAYLOADS, *MORE_PAYLOADS, "```python\nprint('<b>hi</b>')\n```", "[docs](https://example.org)"]
    )
    conversation = create_conversation(chat_user, "<img src=x onerror=window.pwned=1>", [("show me", answer)])

    page.goto(f"/c/{conversation.pk}/")
    shown = page.locator('[data-role="assistant"]')
    expect(shown.locator("strong")).to_have_text("bold")  # Markdown is rendered...
    expect(shown.locator("pre code")).to_have_text("print('<b>hi</b>')")
    expect(shown.locator("a")).to_have_attribute("href", "https://example.org")
    for payload in PAYLOADS:  # ...and the payloads are shown as what they are
        expect(shown).to_contain_text(payload)
    assert_inert(page)
    shown.hover()
    assert_inert(page)

    page.goto("/conversations/")  # the title shows as text on the list page too
    expect(page.get_by_role("link", name="<img src=x onerror=window.pwned=1>")).to_be_visible()
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert not page.script_errors
