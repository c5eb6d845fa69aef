"""The place in line on the chat page (issue 22): while an answer waits for its turn the page shows
"Waiting: N ahead of you" in place of it, and the answer replaces it when it starts."""

import re

from playwright.sync_api import expect

from chat.tokens import token_create
from tests.chat.test_fairness import fair_deployment, open_streams, rows, wait_until
from tests.site.conftest import ANSWER_TIMEOUT_MS, ask, last_answer, make_user, wait_answered


def test_a_waiting_answer_shows_its_place_in_line_until_it_starts(page, chat_user, stack):
    deployment = fair_deployment("default", max_batch_size=1)
    ahead = []
    try:
        for _ in range(3):  # one runs, two of other users wait ahead of the page's answer
            someone, _password = make_user()
            ahead += open_streams(stack, token_create(user=someone)[1], deployment.name, 1)
            wait_until(lambda: rows(someone, deployment.name).exists(), "its row")
        page.reload()
        page.get_by_label("Deployment").select_option(deployment.name)
        ask(page, "What is the capital of France?", Temperature=0, **{"Max new tokens": 8})
        expect(last_answer(page)).to_have_text(re.compile(r"^Waiting: 2 ahead of you( \(about \d+ s\))?$"), timeout=ANSWER_TIMEOUT_MS)
        for socket in ahead:
            socket.close()  # the line moves: the answer starts and replaces the waiting text
        text = wait_answered(page)
        assert "Waiting" not in text and "Paris" in text
        assert not page.script_errors
    finally:
        for socket in ahead:
            socket.close()
