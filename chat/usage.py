"""Reads for the usage dashboard (`/admin/usage/`): tokens, outcomes and time to the first token
over a range of UTC days, by deployment, user and API token.

Counts come from the daily rollup (chat/rollup.py), never from the rows. The time to the first
token (`first_token_at - queued_at`) is exact (PostgreSQL's percentile_cont over the rows, read
from the index chat_requestlog_ttft_day) for ranges up to EXACT_DAYS days, and for one user's
requests over any range; over longer ranges for everyone it comes from the per-day histograms of
the rollup (buckets 2^(1/8) wide: the value returned is the middle of the bucket that holds the
percentile, within 4.5% of it).
"""

import datetime
from dataclasses import dataclass, field

from django.contrib.auth import get_user_model
from django.db import connection, transaction

from chat.models import ApiToken, Deployment
from chat.rollup import BUCKETS_PER_DOUBLING, DAY, TTFT_MS

EXACT_DAYS = 31
MAX_DAYS = 366
PERCENTILES = (0.5, 0.99)
TOP_USERS = 8  # users with a series of their own in "tokens per day by user"
OTHERS = "others"  # the key of everyone else's series
# Sorting a month of rows for the exact percentiles takes more than PostgreSQL's default 4 MB.
EXACT_WORK_MEM = "64MB"


@dataclass(frozen=True)
class Filters:
    """A range of UTC days (both ends included), optionally one deployment and one user."""

    start: datetime.date
    end: datetime.date
    deployment_id: int | None = None
    user_id: int | None = None

    @property
    def days(self) -> list[datetime.date]:
        return [self.start + datetime.timedelta(days=i) for i in range((self.end - self.start).days + 1)]

    @property
    def exact(self) -> bool:
        """Whether the percentiles are read from the rows (else from the daily histograms)."""
        return len(self.days) <= EXACT_DAYS or self.user_id is not None

    def where(self, day: str = "day") -> tuple[str, list]:
        """SQL conditions for these filters, and their parameters."""
        sql, params = [f"{day} BETWEEN %s AND %s"], [self.start, self.end]
        for column, value in (("deployment_id", self.deployment_id), ("user_id", self.user_id)):
            if value is not None:
                sql.append(f"{column} = %s")
                params.append(value)
        return " AND ".join(sql), params


@dataclass
class Counts:
    requests: int = 0
    ok: int = 0
    error: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __iadd__(self, other: "Counts") -> "Counts":
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


@dataclass(frozen=True)
class Ttft:
    """The time to the first token of `requests` requests: p50 and p99 in milliseconds."""

    requests: int
    p50_ms: float
    p99_ms: float


@dataclass
class Usage:
    """Everything the dashboard shows for one set of filters."""

    filters: Filters
    by_day_deployment: dict[tuple, Counts] = field(default_factory=dict)
    # (day, user id, None for no user, or OTHERS) -> tokens, for the TOP_USERS busiest users
    tokens_by_day_user: dict[tuple, int] = field(default_factory=dict)
    by_user: dict[int | None, Counts] = field(default_factory=dict)
    by_token: dict[int | None, Counts] = field(default_factory=dict)
    ttft: dict[tuple, Ttft] = field(default_factory=dict)  # (day, deployment id) -> Ttft
    ttft_by_deployment: dict[int | None, Ttft] = field(default_factory=dict)
    deployment_names: dict[int | None, str] = field(default_factory=dict)
    user_names: dict[int | None, str] = field(default_factory=dict)
    token_names: dict[int | None, str] = field(default_factory=dict)

    @property
    def totals(self) -> Counts:
        return _sum(self.by_day_deployment.values())

    def by_day(self) -> dict[datetime.date, Counts]:
        days = {day: Counts() for day in self.filters.days}
        for (day, _), counts in self.by_day_deployment.items():
            days[day] += counts
        return days

    def by_deployment(self) -> list[tuple[str, Counts, Ttft | None]]:
        """Each deployment's name, sums and percentiles over the whole range, by name."""
        sums = {}
        for (_, deployment), counts in self.by_day_deployment.items():
            sums.setdefault(deployment, Counts())
            sums[deployment] += counts
        return [(self.deployment_names[d], sums.get(d, Counts()), self.ttft_by_deployment.get(d)) for d in self.deployments()]

    def deployments(self) -> list[int | None]:
        """The deployments with requests in the range, by name."""
        ids = {d for _, d in self.by_day_deployment} | {d for _, d in self.ttft}
        return sorted(ids, key=lambda d: self.deployment_names[d])

    def busiest_users(self, count: int = 10) -> list[tuple[int | None, Counts]]:
        return sorted(self.by_user.items(), key=lambda kv: (-kv[1].tokens, -kv[1].requests, self.user_names[kv[0]]))[:count]

    def busiest_tokens(self, count: int = 10) -> list[tuple[int, Counts]]:
        tokens = [(t, c) for t, c in self.by_token.items() if t is not None]
        return sorted(tokens, key=lambda kv: (-kv[1].tokens, -kv[1].requests, self.token_names[kv[0]]))[:count]

    def daily_rows(self) -> list[dict]:
        """The dashboard's table and its CSV: one row per day and deployment with requests."""
        keys = sorted(set(self.by_day_deployment) | set(self.ttft), key=lambda k: (k[0], self.deployment_names[k[1]]))
        rows = []
        for day, deployment in keys:
            ttft = self.ttft.get((day, deployment))
            counts = self.by_day_deployment.get((day, deployment), Counts())
            rows.append({"day": day, "deployment": self.deployment_names[deployment], "counts": counts, "ttft": ttft})
        return rows


def _sum(counts) -> Counts:
    total = Counts()
    for c in counts:
        total += c
    return total


def usage(filters: Filters) -> Usage:
    """The dashboard's numbers for `filters`: a few queries, whatever the number of rows."""
    report = Usage(filters)
    _read_counts(report)
    if filters.exact:
        report.ttft, report.ttft_by_deployment = _exact_ttft(filters, sorted({d for _, d in report.by_day_deployment}, key=str))
    else:
        report.ttft, report.ttft_by_deployment = _histogram_ttft(filters)
    _read_names(report)
    _read_tokens_by_day_user(report, [user for user, _ in report.busiest_users(TOP_USERS)])
    return report


# GROUPING(day, deployment_id, user_id, token_id) of each grouping set: a bit for each column left out.
_SETS = {3: "by_day_deployment", 13: "by_user", 14: "by_token"}
_COUNTS = """
SELECT GROUPING(day, deployment_id, user_id, token_id), day, deployment_id, user_id, token_id,
       sum(requests), sum(requests) FILTER (WHERE status = 'ok'), sum(requests) FILTER (WHERE status = 'error'),
       sum(requests) FILTER (WHERE status = 'cancelled'), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens)
FROM chat_dailyusage WHERE {where}
GROUP BY GROUPING SETS ((day, deployment_id), (user_id), (token_id))
"""


def _read_counts(report: Usage) -> None:
    """All the sums the dashboard shows, in one pass over the range's rollup rows."""
    where, params = report.filters.where()
    with connection.cursor() as cursor:
        cursor.execute(_COUNTS.format(where=where), params)
        for grouping, day, deployment, user, token, *sums in cursor.fetchall():
            counts = Counts(*(int(s or 0) for s in sums))
            key = {3: (day, deployment), 13: user, 14: token}[grouping]
            getattr(report, _SETS[grouping])[key] = counts


# The top users by id (0: requests with no user), everyone else as -1.
_TOKENS_BY_DAY_USER = """
SELECT day, CASE WHEN user_id = ANY(%s) OR (user_id IS NULL AND %s) THEN coalesce(user_id, 0) ELSE -1 END AS who,
       sum(prompt_tokens + completion_tokens)
FROM chat_dailyusage WHERE {where} GROUP BY 1, 2
"""


def _read_tokens_by_day_user(report: Usage, top: list) -> None:
    """Tokens per day of each of the `top` users, and of everyone else together."""
    where, params = report.filters.where()
    with connection.cursor() as cursor:
        cursor.execute(_TOKENS_BY_DAY_USER.format(where=where), [[u for u in top if u is not None], None in top, *params])
        for day, who, tokens in cursor.fetchall():
            report.tokens_by_day_user[(day, {0: None, -1: OTHERS}.get(who, who))] = int(tokens)


_PERCENTILES = f"percentile_cont(ARRAY{list(PERCENTILES)}::float8[]) WITHIN GROUP (ORDER BY {TTFT_MS})"
_EXACT_BY_DAY = f"""
SELECT {DAY}, deployment_id, count(*), {_PERCENTILES}
FROM chat_requestlog WHERE first_token_at IS NOT NULL AND {{where}}
GROUP BY 1, 2
"""


def _exact_ttft(filters: Filters, deployments: list) -> tuple[dict, dict]:
    """p50 and p99 from the rows, per day and deployment (the rows in the index's order), and per
    deployment over the range: one aggregate each, with no GROUP BY, which spares sorting all the
    rows by deployment first (a third of the time over a month of a million rows)."""
    where, params = filters.where(DAY)
    by_day, by_deployment = {}, {}
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL work_mem = '{EXACT_WORK_MEM}'")
        cursor.execute(_EXACT_BY_DAY.format(where=where), params)
        for day, deployment, requests, (p50, p99) in cursor.fetchall():
            by_day[(day, deployment)] = Ttft(requests, round(p50, 1), round(p99, 1))
        if not deployments:
            return by_day, by_deployment
        conditions = ["deployment_id IS NULL" if d is None else f"deployment_id = {int(d)}" for d in deployments]
        columns = ", ".join(f"count(*) FILTER (WHERE {c}), {_PERCENTILES} FILTER (WHERE {c})" for c in conditions)
        cursor.execute(f"SELECT {columns} FROM chat_requestlog WHERE first_token_at IS NOT NULL AND {where}", params)
        values = cursor.fetchone()
    for i, deployment in enumerate(deployments):
        requests, percentiles = values[2 * i], values[2 * i + 1]
        if requests:
            by_deployment[deployment] = Ttft(requests, round(percentiles[0], 1), round(percentiles[1], 1))
    return by_day, by_deployment


_HISTOGRAM = """
WITH h AS (
    SELECT GROUPING(day) AS whole, day, deployment_id, bucket, sum(requests) AS n
    FROM chat_dailyttft WHERE {where}
    GROUP BY GROUPING SETS ((day, deployment_id, bucket), (deployment_id, bucket))
), c AS (
    SELECT whole, day, deployment_id, bucket,
           sum(n) OVER (PARTITION BY whole, day, deployment_id ORDER BY bucket) AS below,
           sum(n) OVER (PARTITION BY whole, day, deployment_id) AS total
    FROM h
)
SELECT whole, day, deployment_id, max(total), min(bucket) FILTER (WHERE below >= %s * total),
       min(bucket) FILTER (WHERE below >= %s * total)
FROM c GROUP BY whole, day, deployment_id
"""


def bucket_middle_ms(bucket: int) -> float:
    """The middle (geometric) of a histogram bucket, in milliseconds."""
    return round(2 ** ((bucket + 0.5) / BUCKETS_PER_DOUBLING), 1)


def _histogram_ttft(filters: Filters) -> tuple[dict, dict]:
    """p50 and p99 from the daily histograms: the bucket that holds each percentile's rank, per
    day and deployment and per deployment over the range."""
    where, params = filters.where()
    by_day, by_deployment = {}, {}
    with connection.cursor() as cursor:
        cursor.execute(_HISTOGRAM.format(where=where), [*params, *PERCENTILES])
        for whole, day, deployment, requests, p50, p99 in cursor.fetchall():
            ttft = Ttft(int(requests), bucket_middle_ms(p50), bucket_middle_ms(p99))
            if whole:
                by_deployment[deployment] = ttft
            else:
                by_day[(day, deployment)] = ttft
    return by_day, by_deployment


def _read_names(report: Usage) -> None:
    """Names for the ids the report holds; ids whose object is gone show as deleted."""
    deployments = {k[1] for k in report.by_day_deployment} | {k[1] for k in report.ttft} | set(report.ttft_by_deployment)
    names = dict(Deployment.objects.filter(pk__in=deployments - {None}).values_list("pk", "name"))
    report.deployment_names = {d: names.get(d, f"(deleted deployment {d})") for d in deployments}
    report.deployment_names[None] = "(no deployment)"
    users = set(report.by_user)
    names = dict(get_user_model().objects.filter(pk__in=users - {None}).values_list("pk", "username"))
    report.user_names = {u: names.get(u, f"(deleted user {u})") for u in users}
    report.user_names[None] = "(no user)"
    tokens = ApiToken.objects.filter(pk__in=set(report.by_token) - {None}).select_related("user")
    names = {t.pk: " ".join(filter(None, [f"{t.prefix}…", t.name, f"({t.user.username})"])) for t in tokens}
    report.token_names = {t: names.get(t, f"(deleted token {t})") for t in report.by_token}
    report.token_names[None] = "(no token: the chat page)"
