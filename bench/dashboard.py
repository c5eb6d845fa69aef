"""Render time of the admin's usage dashboard over a large history (`make bench-dashboard`).

Fills chat_requestlog with 10,000 and then 1,000,000 ended requests (PostgreSQL COPY through
psycopg) spread over the last HISTORY_DAYS UTC days, builds the rollup with the backfill
(chat/rollup.py `rebuild`, what `manage.py rebuild_usage` runs), lets PostgreSQL vacuum and
analyse the tables as autovacuum would, then renders the dashboard through Django's test client
as a logged-in superuser: each view once to warm up, then REPEAT times (the median is reported,
with the median time of its queries and of its charts, timed on their own). Last, the same 1,000,000 rows packed into
the last 31 days: the exact percentiles' worst case. Each page's total of requests is checked
against a count of the rows. Prints one table and writes bench/results/dashboard.json. Run it on
its own database: the Makefile target starts one in var/bench-dashboard.
"""

import datetime
import io
import json
import os
import random
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402

from chat import rollup, usage, usage_charts  # noqa: E402
from chat.models import Deployment  # noqa: E402
from chat.tokens import token_create  # noqa: E402

SIZES = [int(n) for n in os.environ.get("BENCH_DASHBOARD_SIZES", "10000,1000000").split(",")]
HISTORY_DAYS = 365
DENSE_DAYS = 31
USERS, DEPLOYMENTS, REPEAT = 200, 4, 5
COLUMNS = (
    "id, user_id, token_id, deployment_id, protocol, prompt, system_prompt, history, params, response, finish_reason, "
    "error, prompt_tokens, completion_tokens, cached_tokens, status, queued_at, started_at, first_token_at, finished_at, worker"
)


def setup_site() -> dict:
    """Deployments, users (some with an API token) and the superuser who looks."""
    deployments = [Deployment.objects.create(name=f"bench-{i}", model_source="none", enabled=False).pk for i in range(DEPLOYMENTS)]
    User = get_user_model()
    users = [User.objects.create_user(f"user-{i:03d}", password=uuid.uuid4().hex) for i in range(USERS)]
    tokens = {u.pk: token_create(user=u)[0].pk for u in users[: USERS * 3 // 4]}
    admin = User.objects.create_superuser("bench-admin", "", uuid.uuid4().hex)
    return {"deployments": deployments, "users": [u.pk for u in users], "tokens": tokens, "admin": admin}


def rows(count: int, days: int, site: dict, rng: random.Random):
    """`count` ended requests as COPY text lines: a few busy users, most requests ok, TTFTs log-normal."""
    today = datetime.datetime.now(datetime.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - datetime.timedelta(days=days - 1)
    span = days * 86400 - 1
    weights = [1 / (i + 1) for i in range(len(site["users"]))]  # Zipf: user-000 is the busiest
    users = rng.choices(site["users"], weights, k=count)
    for user in users:
        deployment = rng.choice(site["deployments"])
        queued = first + datetime.timedelta(seconds=rng.uniform(0, span))
        outcome = rng.choices(("ok", "error", "cancelled"), (90, 4, 6))[0]
        prompt, completion = rng.randint(20, 2000), rng.randint(1, 500)
        ttft = rng.lognormvariate(-1.2 + 0.3 * (deployment % 3), 0.6)  # seconds: ~0.3 s, a tail past 1 s
        token = site["tokens"].get(user) if rng.random() < 0.8 else None
        if outcome == "error" and rng.random() < 0.5:
            prompt_tokens, completion, ttft = "\\N", 0, None
        else:
            prompt_tokens = prompt
        started = queued + datetime.timedelta(seconds=0.01)
        first_token = queued + datetime.timedelta(seconds=ttft) if ttft is not None else None
        finished = (first_token or started) + datetime.timedelta(seconds=completion * 0.01)
        yield "\t".join(map(str, (
            uuid.UUID(int=rng.getrandbits(128), version=4), user, token if token else "\\N", deployment, "predict",
            "", "", "[]", "{}", "", "stop", "", prompt_tokens, completion, rng.randint(0, prompt // 2),
            outcome, queued.isoformat(), started.isoformat(), first_token.isoformat() if first_token else "\\N",
            finished.isoformat(), "bench",
        ))) + "\n"


def fill(count: int, days: int, site: dict) -> dict:
    """Replace every request with `count` new ones over `days` days; the rollup rebuilt from them."""
    timings = {}
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE chat_message, chat_requestlog, chat_dailyusage, chat_dailyttft")
        start = time.perf_counter()
        buffer = io.StringIO()
        with cursor.cursor.copy(f"COPY chat_requestlog ({COLUMNS}) FROM STDIN") as copy:
            for n, line in enumerate(rows(count, days, site, random.Random(count + days)), 1):
                buffer.write(line)
                if n % 50_000 == 0:
                    copy.write(buffer.getvalue())
                    buffer = io.StringIO()
            copy.write(buffer.getvalue())
        timings["copy_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        rollup.rebuild()
        timings["rollup_rebuild_s"] = round(time.perf_counter() - start, 1)
        for table in ("chat_requestlog", "chat_dailyusage", "chat_dailyttft"):
            cursor.execute(f"VACUUM ANALYZE {table}")
        cursor.execute("SELECT count(*) FROM chat_dailyusage")
        timings["rollup_rows"] = cursor.fetchone()[0]
    return timings


def views(site: dict) -> list[tuple[str, str, dict]]:
    today = datetime.datetime.now(datetime.UTC).date()
    days = lambda n: (today - datetime.timedelta(days=n - 1)).isoformat()  # noqa: E731
    busiest = get_user_model().objects.get(pk=site["users"][0]).username
    return [
        ("page, last 30 days (the default)", "/admin/usage/", {}),
        ("page, last 31 days, one deployment", "/admin/usage/", {"start": days(31), "deployment": "bench-1"}),
        ("page, last 31 days, the busiest user", "/admin/usage/", {"start": days(31), "user": busiest}),
        ("page, last 365 days (histograms)", "/admin/usage/", {"start": days(365)}),
        ("CSV, last 30 days", "/admin/usage/csv", {}),
    ]


def expected_requests(query: dict, path: str) -> int | None:
    if path.endswith("csv"):
        return None
    today = datetime.datetime.now(datetime.UTC).date()
    start = datetime.date.fromisoformat(query.get("start", (today - datetime.timedelta(days=29)).isoformat()))
    sql, params = f"SELECT count(*) FROM chat_requestlog WHERE {rollup.DAY} BETWEEN %s AND %s", [start, today]
    if "deployment" in query:
        sql, params = sql + " AND deployment_id = (SELECT id FROM chat_deployment WHERE name = %s)", [*params, query["deployment"]]
    if "user" in query:
        sql, params = sql + " AND user_id = (SELECT id FROM auth_user WHERE username = %s)", [*params, query["user"]]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def measure(client: Client, path: str, query: dict) -> dict:
    """Median render time of one view (ms), and its parts: the queries and the charts."""
    client.get(path, query)  # warm-up
    pages = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        response = client.get(path, query)
        pages.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, response.content[:500]
    result = {"ms": round(statistics.median(pages), 1)}
    expected = expected_requests(query, path)
    if expected is not None:
        shown = re.search(r"<th scope=\"row\">Requests</th><td class=\"num\">([\d,]+)</td>", response.content.decode())
        assert int(shown.group(1).replace(",", "")) == expected, (shown.group(1), expected)
        result["requests_in_range"] = expected
        result.update(parts(query))
    return result


def parts(query: dict) -> dict:
    """The same view's queries and charts timed on their own (medians of three runs)."""
    from chat.usage_views import UsageForm

    form = UsageForm(query)
    assert form.is_valid(), form.errors
    queries, charts = [], []
    for _ in range(3):
        start = time.perf_counter()
        report = usage.usage(form.filters())
        middle = time.perf_counter()
        usage_charts.charts(report)
        queries.append((middle - start) * 1000)
        charts.append((time.perf_counter() - middle) * 1000)
    return {"queries_ms": round(statistics.median(queries), 1), "charts_ms": round(statistics.median(charts), 1)}


def run(label: str, count: int, days: int, site: dict, client: Client, only_default: bool = False) -> dict:
    print(f"{label}: filling {count:,} rows over {days} days", flush=True)
    result = {"rows": count, "history_days": days, **fill(count, days, site), "views": {}}
    for name, path, query in views(site)[:1] if only_default else views(site):
        result["views"][name] = measure(client, path, query)
        print(f"  {name}: {result['views'][name]}", flush=True)
    return result


def main():
    call_command("migrate", interactive=False, verbosity=0)
    site = setup_site()
    client = Client(HTTP_HOST="localhost")
    client.force_login(site["admin"], backend="django.contrib.auth.backends.ModelBackend")
    runs = [run(f"{n:,} rows", n, HISTORY_DAYS, site, client) for n in SIZES]
    dense = run(f"{SIZES[-1]:,} rows in {DENSE_DAYS} days", SIZES[-1], DENSE_DAYS, site, client, only_default=True)
    report(runs, dense)


def report(runs: list[dict], dense: dict) -> None:
    small, large = runs[0], runs[-1]
    print()
    print(f"| view | {small['rows']:,} rows (ms) | {large['rows']:,} rows (ms) | ratio | queries / charts at {large['rows']:,} (ms) |")
    print("|---|---|---|---|---|")
    for name, big in large["views"].items():
        little = small["views"][name]
        split = f"{big['queries_ms']} / {big['charts_ms']}" if "queries_ms" in big else ""
        print(f"| {name} | {little['ms']} | {big['ms']} | {big['ms'] / little['ms']:.1f}x | {split} |")
    default = dense["views"]["page, last 30 days (the default)"]
    print(f"| page, last 30 days, all {dense['rows']:,} rows in the last {DENSE_DAYS} days | | {default['ms']} | | "
          f"{default['queries_ms']} / {default['charts_ms']} |")
    print()
    for r in (*runs, dense):
        print(f"{r['rows']:,} rows over {r['history_days']} days: COPY {r['copy_s']} s, rollup rebuilt in "
              f"{r['rollup_rebuild_s']} s ({r['rollup_rows']:,} rollup rows)")
    out = BASE_DIR / "bench" / "results" / "dashboard.json"
    ratio = large["views"]["page, last 30 days (the default)"]["ms"] / small["views"]["page, last 30 days (the default)"]["ms"]
    out.write_text(json.dumps({"runs": runs, "dense": dense, "default_page_ratio": round(ratio, 2)}, indent=2) + "\n")
    print(f"\nthe default page: {ratio:.1f}x the time at {large['rows'] // small['rows']}x the rows; written to {out.relative_to(BASE_DIR)}")


if __name__ == "__main__":
    main()
