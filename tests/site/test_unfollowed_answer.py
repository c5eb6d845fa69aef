"""An answer the page cannot follow: when the server cannot resume an answer still being written
(a failure it did not expect, a database away), the page stops showing it as streaming, says so
under it and gives the controls back, rather than waiting for ever.

The page and the server are real; Playwright stands between them on the chat socket and answers
the page's "resume" with the error the server sends for a failure it did not expect
(chat/chat_consumer.py, `_guarded`), since no real failure can be made to order in the server
process.
"""

import json
import re

from playwright.sync_api import expect

from chat.models import Deployment, Message, RequestLog
from tests.site.conftest import create_conversation

SERVER_ERROR = {
    "type": "error", "code": "server_error",
    "message": "The server could not handle this message (RuntimeError); try again shortly.",
}


def test_an_answer_whose_resume_fails_stops_streaming_on_the_page(page, chat_user):
    conversation = create_conversation(chat_user, "unfollowed", [("Tell me a story.", "Once upon")])
    request = RequestLog.objects.create(
        user=chat_user, deployment=Deployment.objects.get(name="default"), protocol="chat", status=RequestLog.Status.RUNNING
    )
    Message.objects.filter(conversation=conversation, role=Message.Role.ASSISTANT).update(
        status=Message.Status.STREAMING, request=request
    )
    resumes = []

    def between(socket):
        server = socket.connect_to_server()

        def from_page(message):
            if json.loads(message).get("type") == "resume":
                resumes.append(message)
                socket.send(json.dumps(SERVER_ERROR))
            else:
                server.send(message)

        socket.on_message(from_page)

    page.route_web_socket(re.compile(r"/ws/chat/$"), between)
    page.goto(f"/c/{conversation.pk}/")

    answer = page.locator(".turn-assistant").last
    expect(answer.locator(".note.error")).to_have_text("This answer could not be followed: reload the page to see how it ended.")
    expect(answer).not_to_have_class(re.compile(r"\bstreaming\b"))
    expect(page.locator("#chat-error")).to_have_text(SERVER_ERROR["message"])
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    assert len(resumes) == 1 and json.loads(resumes[0])["request"] == str(request.pk)
    assert not page.script_errors
