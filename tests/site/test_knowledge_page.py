"""The knowledge-base page and the chat's knowledge-base picker in a real browser.

Acceptance 4 (upload a .md by drag and drop, it reaches ready without a reload, the chat answers
from it and names it among the sources), acceptance 3's knowledge-base parts (payloads in a
document's text and in an uploaded file's name are shown as text) and acceptance 6's (a second
user sees none of the first user's knowledge bases, and gets 404 by address).
"""

import uuid

from playwright.sync_api import expect

from tests.site.conftest import ask, log_in, make_user, wait_answered
from tests.site.test_markdown_safety import PAYLOADS

# Ingestion runs on the busy test worker; this bounds the wait, it asserts no speed.
READY_TIMEOUT_MS = 240_000


def create_knowledge_base(page) -> str:
    name = f"kb-{uuid.uuid4().hex[:10]}"
    page.goto("/knowledge/")
    page.get_by_label("New knowledge base").fill(name)
    page.get_by_role("button", name="Create").click()
    expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible()
    return name


def drop_file(page, name: str, text: str) -> None:
    """Drop a file on the upload zone as a person dragging it from their desktop would."""
    transfer = page.evaluate_handle(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, { type: "text/markdown" }));
            return transfer;
        }""",
        [name, text],
    )
    page.dispatch_event("#upload", "drop", {"dataTransfer": transfer})


def document_row(page, name: str):
    return page.locator("#documents tbody tr").filter(has=page.locator(".doc-name", has_text=name))


def ask_with(page, knowledge_base: str, question: str) -> None:
    page.goto("/")
    page.get_by_label("Knowledge base").select_option(knowledge_base)
    ask(page, question, Temperature=0, **{"Max new tokens": 40})


def test_an_uploaded_md_reaches_ready_without_reloading_and_grounds_the_chat(page, chat_user):
    from knowledge.models import Chunk, Document

    kb = create_knowledge_base(page)
    page.evaluate("window.notReloaded = true")
    drop_file(
        page,
        "zorblax.md",
        "The Zorblax project studies glowing moss that grows in deep caves.\n\n"
        "The secret code of the Zorblax project is 7391.\n\n"
        "Its team meets on Mondays in a wooden hut near the river.\n",
    )
    row = document_row(page, "zorblax.md")
    expect(row).to_have_attribute("data-status", "ready", timeout=READY_TIMEOUT_MS)
    expect(row.locator(".doc-status")).to_have_text("ready")
    assert page.evaluate("window.notReloaded") is True  # the status came by polling
    document = Document.objects.get(knowledge_base__name=kb, name="zorblax.md")
    expect(row.locator(".doc-progress")).to_contain_text(f"{document.chunks_total}/{document.chunks_total}")

    ask_with(page, kb, "What is the secret code of the Zorblax project?")
    answer = wait_answered(page)
    sources = page.locator(".turn-assistant").last.locator(".sources")
    expect(sources).to_be_visible()
    expect(sources.locator("li strong").first).to_have_text("zorblax.md")
    expect(sources).to_contain_text("The secret code of the Zorblax project is 7391.")
    assert "7391" in answer

    page.reload()  # the stored answer keeps its sources, and the conversation its knowledge base
    sources = page.locator(".turn-assistant").last.locator(".sources")
    expect(sources.locator("li strong").first).to_have_text("zorblax.md")
    expect(page.get_by_label("Knowledge base")).to_have_value(kb)

    # Delete the document: it and its chunks are gone.
    assert Chunk.objects.filter(document=document).exists()
    page.goto(f"/knowledge/{kb}/")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete zorblax.md").click()
    expect(document_row(page, "zorblax.md")).to_have_count(0)
    assert not Document.objects.filter(pk=document.pk).exists()
    assert not Chunk.objects.filter(document_id=document.pk).exists()
    assert not page.script_errors


def assert_inert(page, where: str):
    assert page.evaluate("typeof window.pwned") == "undefined"
    box = page.locator(where)
    for selector in ["script", "img", "svg", "iframe", "[onerror]", "[onload]", 'a[href^="javascript" i]']:
        assert box.locator(selector).count() == 0, selector


def test_payloads_in_a_document_and_its_name_are_shown_as_text(page, chat_user):
    kb = create_knowledge_base(page)
    # A file name cannot hold "/" (the server keeps what follows the last one, as for a path) and
    # the browser sends '"' in a file name as %22, so the name holds the script tag's opening and
    # the image without quotes; the document's text holds all three payloads whole.
    name = "<img src=x onerror=window.pwned=1> [x](javascript:window.pwned=1) <script>window.pwned=1.md"
    text = "# Pwned notes\n\nThe pwned notes hold these lines:\n\n" + "\n\n".join(PAYLOADS) + "\n"
    page.get_by_label("Choose files").set_input_files([{"name": name, "mimeType": "text/markdown", "buffer": text.encode()}])
    row = document_row(page, "window.pwned=1.md")
    expect(row).to_have_attribute("data-status", "ready", timeout=READY_TIMEOUT_MS)
    expect(row.locator(".doc-name")).to_have_text(name)
    assert_inert(page, "#documents")
    page.reload()  # the server-rendered table: text too
    expect(document_row(page, "window.pwned=1.md").locator(".doc-name")).to_have_text(name)
    assert_inert(page, "#documents")

    ask_with(page, kb, "What lines do the pwned notes hold?")
    wait_answered(page)
    sources = page.locator(".turn-assistant").last.locator(".sources")
    expect(sources.locator("li strong").first).to_have_text(name)
    for payload in PAYLOADS:
        expect(sources.locator("blockquote").first).to_contain_text(payload)
    assert_inert(page, "#messages")
    page.reload()  # the stored sources, rendered by the server: text too
    sources = page.locator(".turn-assistant").last.locator(".sources")
    expect(sources.locator("li strong").first).to_have_text(name)
    for payload in PAYLOADS:
        expect(sources.locator("blockquote").first).to_contain_text(payload)
    assert_inert(page, "#messages")
    assert not page.script_errors


def test_a_second_user_sees_none_of_the_first_users_knowledge_bases(page, new_context):
    from knowledge import services

    owner, owner_password = make_user()
    kb, _ = services.knowledge_base_get_or_create(name=f"kb-private-{uuid.uuid4().hex[:8]}", owner=owner)
    document, _ = services.document_create(knowledge_base=kb, name="private.md", data=b"# Private\n\nOnly mine.")

    stranger, password = make_user()
    log_in(page, stranger, password)
    page.goto("/knowledge/")
    expect(page.get_by_role("heading", name="Knowledge bases")).to_be_visible()
    expect(page.locator("#knowledge-bases")).not_to_contain_text(kb.name)
    page.goto("/")
    assert page.locator(f'#knowledge_base option[value="{kb.name}"]').count() == 0
    for path in (f"/knowledge/{kb.name}/", f"/knowledge/{kb.name}/documents.json"):
        response = page.goto(path)
        assert response.status == 404, path
        expect(page.locator("body")).not_to_contain_text("private.md")
    csrf = page.context.cookies()
    token = next(c["value"] for c in csrf if c["name"] == "csrftoken")
    for path in (f"/knowledge/{kb.name}/upload", f"/knowledge/{kb.name}/documents/{document.pk}/delete"):
        response = page.request.post(path, headers={"X-CSRFToken": token}, multipart={"file": {"name": "x.md", "mimeType": "text/markdown", "buffer": b"x"}})
        assert response.status == 404, path
    assert kb.documents.count() == 1

    # The owner sees it, in the list and in the chat's picker.
    own_page = new_context().new_page()
    log_in(own_page, owner, owner_password)
    own_page.goto("/knowledge/")
    expect(own_page.get_by_role("link", name=kb.name)).to_be_visible()
    own_page.goto(f"/knowledge/{kb.name}/")
    expect(own_page.locator(".doc-name")).to_have_text("private.md")
