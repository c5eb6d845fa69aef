"""Case 12, every page: the injection payloads stored wherever a user, a model or a document can put
text (a prompt, an answer, a conversation title, a document's name, text and ingestion error, the
sources under an answer, a request row) are shown as text on the chat pages, the knowledge pages
and the admin's pages, and nothing runs. The admin has no content security policy, so what keeps
it safe there is escaping alone."""

import uuid

from playwright.sync_api import expect

from tests.site.conftest import create_conversation, log_in, make_user
from tests.site.test_markdown_safety import MORE_PAYLOADS, PAYLOADS

ALL = PAYLOADS + MORE_PAYLOADS
TEXT = "\n\n".join(ALL)
NAME = "<svg onload=window.pwned=1> <img src=x onerror=window.pwned=1>.md"
LIVE = ["script", "iframe", "[onerror]", "[onload]", "[onmouseover]", 'a[href^="javascript" i]', 'img[src="x"]', "svg[onload]"]


def assert_nothing_ran(page, where="body"):
    page.mouse.move(5, 5)
    page.mouse.move(400, 400)  # hover over whatever is there
    assert page.evaluate("typeof window.pwned") == "undefined", page.url
    box = page.locator(where)
    for selector in LIVE:
        if selector == "script" and where == "body":
            continue  # the page's own scripts; the payloads' are caught by the checks below
        assert box.locator(selector).count() == 0, (page.url, selector)
    assert box.locator("script:not([src]):not([type=\"application/json\"])").filter(has_text="pwned").count() == 0, page.url
    assert not page.script_errors, page.script_errors


def test_payloads_stored_everywhere_are_inert_on_every_page(page):
    from chat.models import Deployment, Message, RequestLog
    from knowledge import services
    from knowledge.models import Document

    admin, password = make_user(is_staff=True, is_superuser=True)
    log_in(page, admin, password)
    kb, _ = services.knowledge_base_get_or_create(name=f"kb-xss-{uuid.uuid4().hex[:8]}", owner=admin)
    document, _ = services.document_create(knowledge_base=kb, name=NAME, data=TEXT.encode())
    Document.objects.filter(pk=document.pk).update(status=Document.Status.FAILED, error=f"Could not read {TEXT}")
    conversation = create_conversation(admin, "<svg onload=window.pwned=1>", [(TEXT, TEXT)])
    sources = [{"document": NAME, "chunk": 0, "score": 0.9, "text": TEXT}]
    Message.objects.filter(conversation=conversation, role=Message.Role.ASSISTANT).update(sources=sources)
    request = RequestLog.objects.create(
        user=admin, deployment=Deployment.objects.get(name="default"), protocol="http", prompt=TEXT,
        system_prompt=TEXT, history=[[TEXT, TEXT]], response=TEXT, error=TEXT, status=RequestLog.Status.ERROR,
    )

    page.goto(f"/c/{conversation.pk}/")
    answer = page.locator(".turn-assistant").last
    expect(answer.locator(".sources li strong").first).to_have_text(NAME)
    expect(answer.locator(".sources blockquote").first).to_contain_text("<svg onload=window.pwned=1></svg>")
    assert_nothing_ran(page, "#messages")
    assert_nothing_ran(page)

    for path in [
        "/conversations/",
        f"/knowledge/{kb.name}/",
        "/knowledge/",
        "/admin/chat/requestlog/",
        f"/admin/chat/requestlog/{request.pk}/change/",
        "/admin/knowledge/document/",
        f"/admin/knowledge/document/{document.pk}/change/",
        "/admin/chat/conversation/",
        f"/admin/chat/conversation/{conversation.pk}/change/",
    ]:
        page.goto(path)
        assert_nothing_ran(page)
    expect(page.locator("body")).to_contain_text("<svg onload=window.pwned=1>")  # shown, as text
