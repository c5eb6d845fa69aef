"""Screenshots of the site at 1280x800 for docs/chat-site.md (acceptance 7): chat (a real answer),
conversations, knowledge base. They are taken on every run into a temporary folder, and into
docs/screenshots only with UPDATE_SCREENSHOTS=1 (`make screenshots`), so that a test run leaves
the checkout as it found it."""

import os
import struct
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.site.conftest import VIEWPORT, ask, create_conversation, wait_answered

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def shots(tmp_path) -> Path:
    """Where the screenshots go: docs/screenshots with UPDATE_SCREENSHOTS=1, else a temporary folder."""
    return DOCS / "screenshots" if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_screenshots_of_the_chat_page_and_the_conversation_list(page, chat_user, shots):
    create_conversation(chat_user, "Packing list for a weekend hike", [("What should I pack?", "- Water\n- Map")])
    create_conversation(chat_user, "Explain recursion simply", [("Explain recursion.", "A function that calls itself.")])
    page.goto("/")  # the sidebar lists them
    ask(page, "Write a Python function that adds two numbers.", Temperature=0, **{"Max new tokens": 60})
    wait_answered(page)
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    page.get_by_label("Message").fill("")
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=shots / "chat.png")

    page.goto("/conversations/")
    page.screenshot(path=shots / "conversations.png")

    guide = (DOCS / "chat-site.md").read_text()
    for name in ("chat.png", "conversations.png"):
        assert png_size(shots / name) == (VIEWPORT["width"], VIEWPORT["height"])
        assert f"](screenshots/{name})" in guide and (DOCS / "screenshots" / name).exists()


def test_screenshot_of_the_knowledge_base_page(page, chat_user, shots):
    from knowledge import services

    kb, _ = services.knowledge_base_get_or_create(name=f"handbook-{chat_user.pk}", owner=chat_user)
    files = {
        "holidays.md": "# Holidays\n\nThe office is closed on the first Monday of May.",
        "expenses.txt": "Travel expenses are paid back within ten days of the receipt.",
    }
    for name, text in files.items():
        services.document_upload(knowledge_base=kb, name=name, data=text.encode(), uploaded_by=chat_user)
    page.goto(f"/knowledge/{kb.name}/")
    for name in files:  # the page polls until both are ingested
        row = page.locator("#documents tbody tr").filter(has=page.locator(".doc-name", has_text=name))
        expect(row).to_have_attribute("data-status", "ready", timeout=240_000)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=shots / "knowledge.png")

    assert png_size(shots / "knowledge.png") == (VIEWPORT["width"], VIEWPORT["height"])
    assert "](screenshots/knowledge.png)" in (DOCS / "chat-site.md").read_text() and (DOCS / "screenshots" / "knowledge.png").exists()
