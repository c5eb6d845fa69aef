"""A client that closes an SSE stream early cancels the generation on the worker, which moves on."""

import time

from chat.models import RequestLog

LONG = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


def wait_for_final_status(user, timeout=180):
    deadline = time.monotonic() + timeout  # a bound on waiting, not a timing assertion
    while time.monotonic() < deadline:
        row = RequestLog.objects.filter(user=user).first()
        if row is not None and row.status not in (RequestLog.Status.QUEUED, RequestLog.Status.RUNNING):
            return row
        time.sleep(0.5)
    raise AssertionError("the request never finished")


def test_closing_the_stream_early_cancels_the_generation(client, user):
    stream = client.chat.completions.create(model="default", messages=LONG, temperature=0, max_tokens=1000, stream=True)
    pieces = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
        if pieces == 3:
            break
    stream.close()

    row = wait_for_final_status(user)
    assert row.status == RequestLog.Status.CANCELLED
    assert row.finish_reason == "cancelled"
    assert row.completion_tokens < 1000

    answer = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=16
    )
    assert "Paris" in answer.choices[0].message.content
