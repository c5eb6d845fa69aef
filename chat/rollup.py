"""The usage rollup (chat.models.DailyUsage, DailyTtft): kept as requests end, rebuilt from the rows.

chat/lifecycle.py calls `add` once per request, in the transaction that moves its row to an end
state, so the rollup counts every ended request once; `INSERT ... ON CONFLICT DO UPDATE` adds to a
day's counts in the database, so workers ending requests at once stay exact. `rebuild` (`manage.py
rebuild_usage`, and the migration that made the tables) counts the rows again with the same
expressions.
"""

import datetime

from django.db import connection, transaction

ENDED = ("ok", "error", "cancelled")
BUCKETS_PER_DOUBLING = 8
# A request's UTC day; the same expression as RequestLog's index chat_requestlog_ttft_day.
DAY = "(queued_at AT TIME ZONE 'UTC')::date"
TTFT_MS = "(date_part('epoch', first_token_at - queued_at) * 1000)"  # float8: cheaper than extract's numeric
BUCKET = f"greatest(0, floor({BUCKETS_PER_DOUBLING} * ln(greatest(1::float8, {TTFT_MS})) / ln(2::float8)))::int"

_ADD = f"""
WITH ended AS (
    SELECT {DAY} AS day, deployment_id, user_id, token_id, status,
           coalesce(prompt_tokens, 0) AS prompt_tokens, coalesce(completion_tokens, 0) AS completion_tokens,
           coalesce(cached_tokens, 0) AS cached_tokens,
           CASE WHEN first_token_at IS NOT NULL THEN {BUCKET} END AS bucket
    FROM chat_requestlog WHERE id = %s AND status IN {ENDED}
), usage AS (
    INSERT INTO chat_dailyusage AS u
        (day, deployment_id, user_id, token_id, status, requests, prompt_tokens, completion_tokens, cached_tokens)
    SELECT day, deployment_id, user_id, token_id, status, 1, prompt_tokens, completion_tokens, cached_tokens FROM ended
    ON CONFLICT (day, deployment_id, user_id, token_id, status) DO UPDATE SET
        requests = u.requests + 1,
        prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens,
        cached_tokens = u.cached_tokens + EXCLUDED.cached_tokens
)
INSERT INTO chat_dailyttft AS t (day, deployment_id, bucket, requests)
SELECT day, deployment_id, bucket, 1 FROM ended WHERE bucket IS NOT NULL
ON CONFLICT (day, deployment_id, bucket) DO UPDATE SET requests = t.requests + 1
"""

_REBUILD_USAGE = f"""
INSERT INTO chat_dailyusage
    (day, deployment_id, user_id, token_id, status, requests, prompt_tokens, completion_tokens, cached_tokens)
SELECT {DAY}, deployment_id, user_id, token_id, status, count(*),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0)
FROM chat_requestlog WHERE status IN {ENDED} AND {DAY} >= %s
GROUP BY 1, 2, 3, 4, 5
"""

_REBUILD_TTFT = f"""
INSERT INTO chat_dailyttft (day, deployment_id, bucket, requests)
SELECT {DAY}, deployment_id, {BUCKET}, count(*)
FROM chat_requestlog WHERE status IN {ENDED} AND first_token_at IS NOT NULL AND {DAY} >= %s
GROUP BY 1, 2, 3
"""


def add(request_id) -> None:
    """Count one request that has just ended (call it in the transaction that ended it)."""
    with connection.cursor() as cursor:
        cursor.execute(_ADD, [str(request_id)])


def rebuild(*, since: datetime.date | None = None) -> int:
    """Count the ended requests again, from `since` (a UTC day) or from the start; returns how
    many requests were counted.

    The tables are locked while it runs: a request ending meanwhile waits, then adds itself to
    the rebuilt counts (its row was not yet ended in the rebuild's snapshot), so none is lost or
    counted twice."""
    since = since or datetime.date.min
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("LOCK TABLE chat_dailyusage, chat_dailyttft IN EXCLUSIVE MODE")
        cursor.execute("DELETE FROM chat_dailyusage WHERE day >= %s", [since])
        cursor.execute("DELETE FROM chat_dailyttft WHERE day >= %s", [since])
        cursor.execute(_REBUILD_USAGE, [since])
        cursor.execute(_REBUILD_TTFT, [since])
        cursor.execute("SELECT coalesce(sum(requests), 0) FROM chat_dailyusage WHERE day >= %s", [since])
        return int(cursor.fetchone()[0])
