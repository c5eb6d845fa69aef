"""The daily rollup (chat/rollup.py): kept by chat/lifecycle.py as requests end, exact when many
end at once, never counting a request twice, and rebuilt from the rows to the same numbers."""

import datetime
import io
import threading
import uuid

from django.core.management import call_command
from django.db import connection

from chat import lifecycle
from chat.models import DailyTtft, DailyUsage, RequestLog
from tests.dashboard.conftest import D1, D3, D_CONCURRENT, end_request


def rollup_rows(start, end):
    usage = set(DailyUsage.objects.filter(day__range=(start, end)).values_list(
        "day", "deployment_id", "user_id", "token_id", "status", "requests", "prompt_tokens", "completion_tokens", "cached_tokens"
    ))
    ttft = set(DailyTtft.objects.filter(day__range=(start, end)).values_list("day", "deployment_id", "bucket", "requests"))
    return usage, ttft


def test_the_rollup_holds_a_row_per_day_deployment_user_token_and_outcome(seed):
    usage, ttft = rollup_rows(D1, D3)
    a, alice, alices_token = seed.deployments["a"].pk, seed.users["alice"].pk, seed.tokens["alice"].pk
    assert (D1, a, alice, alices_token, "ok", 2, 40, 60, 5) in usage
    assert (D1, a, seed.users["bob"].pk, seed.tokens["bob"].pk, "error", 1, 0, 0, 0) in usage
    assert (D1, seed.deployments["b"].pk, seed.users["carol"].pk, None, "ok", 1, 100, 50, 0) in usage
    assert sum(row[5] for row in usage) == 10
    # 100, 200 and 300 ms: bucket floor(8 * log2(ms))
    assert {(bucket, n) for day, deployment, bucket, n in ttft if (day, deployment) == (D1, a)} == {(53, 1), (61, 1), (65, 1)}
    assert sum(row[3] for row in ttft) == 8  # the requests that had a first token


def test_rebuild_counts_the_rows_as_the_lifecycle_did(seed):
    kept = rollup_rows(D1, D3)
    DailyUsage.objects.filter(day__range=(D1, D3)).delete()
    DailyTtft.objects.filter(day__range=(D1, D3)).delete()
    out = io.StringIO()
    call_command("rebuild_usage", "--since", D1.isoformat(), stdout=out)
    assert rollup_rows(D1, D3) == kept
    assert "ended requests from 2025-01-06" in out.getvalue()


def test_requests_ending_at_once_are_all_counted(seed):
    """Workers' threads finishing requests of one day, deployment, user and token at the same time."""
    threads, each = 8, 6
    deployment, user, token = seed.deployments["a"], seed.users["bob"], seed.tokens["bob"]
    ids = [
        end_request(day=D_CONCURRENT, deployment=deployment, user=user, token=token, outcome="running",
                    prompt_tokens=0, completion_tokens=0, cached_tokens=0, ttft_ms=None)
        for _ in range(threads * each)
    ]
    queued_at = RequestLog.objects.get(id=ids[0]).queued_at
    barrier, failures = threading.Barrier(threads), []

    def finish(part):
        try:
            barrier.wait()
            for request_id in part:
                assert lifecycle.finish(request_id, response="x", finish_reason="stop", prompt_tokens=3, completion_tokens=4,
                                        cached_tokens=1, first_token_at=queued_at + datetime.timedelta(milliseconds=250))
        except Exception as exc:  # reported below, in the test's thread
            failures.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=finish, args=(ids[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures
    row = DailyUsage.objects.get(day=D_CONCURRENT, deployment=deployment, user=user, token=token, status="ok")
    assert (row.requests, row.prompt_tokens, row.completion_tokens, row.cached_tokens) == (48, 144, 192, 48)
    assert DailyTtft.objects.get(day=D_CONCURRENT, deployment=deployment, bucket=63).requests == 48  # 250 ms


def test_a_refused_second_end_is_not_counted_again(seed):
    deployment, user, token = seed.deployments["b"], seed.users["alice"], seed.tokens["alice"]
    request_id = end_request(day=D_CONCURRENT, deployment=deployment, user=user, token=token, outcome="ok",
                             prompt_tokens=2, completion_tokens=2, cached_tokens=0, ttft_ms=50)
    key = dict(day=D_CONCURRENT, deployment=deployment, user=user, token=token)
    before = list(DailyUsage.objects.filter(**key).values_list("status", "requests"))
    assert not lifecycle.finish(request_id, response="again", finish_reason="stop", prompt_tokens=2, completion_tokens=2,
                                cached_tokens=0, first_token_at=None)  # a second delivery of the task
    assert not lifecycle.fail(request_id, "the stream went silent")  # the web tier, too late
    assert not lifecycle.cancel_queued(request_id)
    assert list(DailyUsage.objects.filter(**key).values_list("status", "requests")) == before == [("ok", 1)]


def test_an_embeddings_call_is_counted_as_it_is_recorded(user):
    ok = lifecycle.record_done(request_id=str(uuid.uuid4()), user=user, token=None, protocol="embeddings", prompt="x", params={}, prompt_tokens=6, error="")
    lifecycle.record_done(request_id=str(uuid.uuid4()), user=user, token=None, protocol="embeddings", prompt="y", params={}, prompt_tokens=None, error="too long")
    day = ok.queued_at.date()  # UTC: the site's time zone
    rows = DailyUsage.objects.filter(user=user, day=day).values_list("deployment_id", "status", "requests", "prompt_tokens")
    assert set(rows) == {(None, "ok", 1, 6), (None, "error", 1, 0)}
