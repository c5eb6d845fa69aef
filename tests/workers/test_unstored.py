"""workers/unstored.py: request ends the database could not take, stored once it is back, on the
suite's PostgreSQL. The database's absence is a raised OperationalError here; the real outage is
tests/chat/test_database_outage.py::test_postgresql_going_down_mid_answer_still_ends_the_stream."""

import datetime
import functools
import logging
import uuid

import pytest
from django.db import DataError, OperationalError
from django.utils import timezone

from chat import lifecycle
from chat.models import DailyUsage, RequestLog
from workers import unstored


@pytest.fixture(autouse=True)
def queue(monkeypatch):
    """An empty queue of kept ends, retried only by the test (no thread of its own)."""
    monkeypatch.setattr(unstored, "_pending", {})
    monkeypatch.setattr(unstored, "_retrier", object())


def running(user) -> str:
    request_id = str(uuid.uuid4())
    lifecycle.record(
        request_id=request_id, user=user, token=None, deployment=None, protocol="http", prompt="x", system_prompt="",
        history=[], params={},
    )
    assert lifecycle.start(request_id, worker="w1")
    return request_id


def finish(request_id: str, ended, text: str = "late") -> bool:
    return lifecycle.finish(
        request_id, response=text, finish_reason="stop", prompt_tokens=3, completion_tokens=5, cached_tokens=0,
        first_token_at=None, finished_at=ended,
    )


class Database:
    """Stores that fail as a database that is away does, until it is `back`."""

    def __init__(self):
        self.back = False

    def __call__(self, store):
        def attempt():
            if not self.back:
                raise OperationalError("connection refused")
            return store()

        return attempt


def test_kept_ends_are_stored_in_order_once_the_database_is_back_at_the_time_they_ended(user, caplog):
    database, ended = Database(), timezone.now() - datetime.timedelta(minutes=3)
    first, second = running(user), running(user)
    for request_id in (first, second):
        assert unstored.keep(request_id, database(functools.partial(finish, request_id, ended)), OperationalError("away"))
    assert unstored.retry() == 0 and unstored.waiting() == 2
    assert RequestLog.objects.get(id=first).status == RequestLog.Status.RUNNING

    database.back = True
    with caplog.at_level(logging.WARNING, logger="workers.unstored"):
        assert unstored.retry() == 2
    assert unstored.waiting() == 0
    for request_id in (first, second):
        row = RequestLog.objects.get(id=request_id)
        assert (row.status, row.response, row.completion_tokens, row.finished_at) == (RequestLog.Status.OK, "late", 5, ended)
    usage = DailyUsage.objects.filter(user_id=user.pk, status=RequestLog.Status.OK).values_list("completion_tokens", flat=True)
    assert sum(usage) == 10, "each late end counted once in the usage rollup"
    assert caplog.text.index(first) < caplog.text.index(second)
    assert caplog.text.count("its end was stored after the database came back") == 2


def test_a_request_keeps_its_first_end(user):
    request_id, database = running(user), Database()
    assert unstored.keep(request_id, database(functools.partial(finish, request_id, timezone.now(), "whole")), OperationalError("away"))
    # reporting the finished answer failed too: its failure is not what gets stored
    assert unstored.keep(request_id, database(lambda: lifecycle.fail(request_id, "could not report")), OperationalError("away"))
    database.back = True
    assert unstored.retry() == 1
    row = RequestLog.objects.get(id=request_id)
    assert (row.status, row.response) == (RequestLog.Status.OK, "whole")


def test_an_end_refused_by_the_rows_status_is_dropped_and_said_so(user, caplog):
    request_id = running(user)
    assert unstored.keep(request_id, functools.partial(finish, request_id, timezone.now()), OperationalError("away"))
    assert lifecycle.fail(request_id, "the stream went silent")  # the web tier, meanwhile
    with caplog.at_level(logging.WARNING, logger="workers.unstored"):
        assert unstored.retry() == 1
    assert unstored.waiting() == 0 and "the row had already ended" in caplog.text
    assert RequestLog.objects.get(id=request_id).status == RequestLog.Status.ERROR


def test_only_a_database_that_is_away_is_waited_for(user, caplog):
    request_id = running(user)
    assert not unstored.keep(request_id, lambda: True, DataError("value too long"))
    assert unstored.waiting() == 0

    def broken():
        raise DataError("value too long")

    # kept as away, then refused for another reason: dropped, not retried for ever ahead of the others
    later = running(user)
    assert unstored.keep(request_id, broken, OperationalError("away"))
    assert unstored.keep(later, functools.partial(finish, later, timezone.now()), OperationalError("away"))
    with caplog.at_level(logging.ERROR, logger="workers.unstored"):
        assert unstored.retry() == 2
    assert unstored.waiting() == 0 and "cannot be stored; dropped" in caplog.text
    assert RequestLog.objects.get(id=later).status == RequestLog.Status.OK


def test_beyond_the_limit_the_oldest_end_is_dropped(monkeypatch, caplog):
    monkeypatch.setattr(unstored, "LIMIT", 2)
    with caplog.at_level(logging.ERROR, logger="workers.unstored"):
        for name in ("a", "b", "c"):
            assert unstored.keep(name, lambda: True, OperationalError("away"))
    assert list(unstored._pending) == ["b", "c"]
    assert "generation a: its end is dropped unstored" in caplog.text
