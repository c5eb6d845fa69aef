"""The admin's usage page and its CSV through Django's test client: the seeded numbers, the
filters, charts that carry no script, and who may see them."""

import csv
import io
from html.parser import HTMLParser

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from tests.dashboard.conftest import D1, D2, D3


class Tables(HTMLParser):
    """The text of each table's cells, by the id of the table or of the section around it."""

    def __init__(self, html: str):
        super().__init__()
        self.tables, self.ids, self.cell = {}, [], None
        self.scripts, self.svgs = 0, 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("section", "table"):
            self.ids.append(attrs.get("id") or (self.ids[-1] if self.ids else None))
        if tag == "table":
            self.tables[self.ids[-1]] = []
        elif tag == "tr":
            self.tables[self.ids[-1]].append([])
        elif tag in ("td", "th"):
            self.cell = []
        self.scripts += tag == "script"
        self.svgs += tag == "svg" and "pygal-chart" in attrs.get("class", "")

    def handle_endtag(self, tag):
        if tag in ("section", "table"):
            self.ids.pop()
        elif tag in ("td", "th") and self.cell is not None:
            self.tables[self.ids[-1]][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def number(text: str):
    text = text.replace(",", "")
    return float(text) if "." in text else int(text)


def page(client, **query):
    response = client.get("/admin/usage/", query)
    assert response.status_code == 200, response.content[:2000]
    return response, Tables(response.content.decode())


def test_page_shows_the_seeded_totals_per_deployment_and_per_day(staff_client, seed):
    response, parsed = page(staff_client, start=D1, end=D3)
    totals = {row[0]: number(row[1]) for row in parsed.tables["usage-totals"]}
    assert totals == {"Requests": 10, "ok": 7, "error": 1, "cancelled": 2, "Prompt tokens": 165,
                      "Cached prompt tokens": 5, "Completion tokens": 136, "Tokens": 301}
    deployments = {row[0]: [number(c) for c in row[1:]] for row in parsed.tables["usage-deployments"][1:]}
    assert deployments == {
        seed.deployments["a"].name: [6, 4, 1, 1, 117, 300.0, 496.0],
        seed.deployments["b"].name: [4, 3, 0, 1, 184, 2000.0, 3960.0],
    }
    daily = parsed.tables["usage-daily"]
    assert daily[0][0] == "Day (UTC)" and len(daily) == 6
    assert daily[1] == ["2025-01-06", seed.deployments["a"].name, "4", "3", "1", "0", "45", "65", "5", "110", "200.0", "298.0"]
    assert "exact, PostgreSQL's percentile_cont" in response.content.decode()


def test_every_chart_is_an_svg_without_script_beside_its_numbers(staff_client, seed):
    response, parsed = page(staff_client, start=D1, end=D3)
    html = response.content.decode()
    assert parsed.svgs == 6 and html.count('role="img"') == 6
    assert "<script" not in html.split('id="chart-tokens-by-deployment"')[1]  # the admin's own scripts come before
    assert "kozea.github.io" not in html and "pygal.config" not in html
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    by_deployment = parsed.tables["chart-tokens-by-deployment"]
    assert by_deployment[0] == ["Day (UTC)", seed.deployments["a"].name, seed.deployments["b"].name]
    assert by_deployment[1:] == [["2025-01-06", "110", "150"], ["2025-01-07", "7", "0"], ["2025-01-08", "0", "34"], ["Total", "117", "184"]]
    by_user = parsed.tables["chart-tokens-by-user"]
    assert by_user[-1] == ["Total", "184", "107", "10"]  # carol, alice, bob: the busiest first
    assert parsed.tables["chart-requests-by-outcome"][-1] == ["Total", "7", "1", "2"]
    ttft = parsed.tables["chart-time-to-first-token"]
    assert ttft[0][1:] == [f"{seed.deployments[d].name} {p}" for d in "ab" for p in ("p50", "p99")]
    assert ttft[1][1:] == ["200.0", "298.0", "1,000.0", "1,000.0"]
    assert ttft[-1] == ["Whole range", "300.0", "496.0", "2,000.0", "3,960.0"]
    users = parsed.tables["chart-busiest-users"]
    assert [row[0] for row in users[1:]] == [seed.users[u].username for u in ("carol", "alice", "bob")]
    tokens = parsed.tables["chart-busiest-tokens"]
    assert [row[1:] for row in tokens[1:]] == [["4", "44", "63", "107"], ["3", "5", "5", "10"]]
    assert tokens[1][0].startswith(seed.tokens["alice"].prefix)


def read_csv(response):
    assert response["Content-Type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.content.decode())))


def test_csv_holds_the_pages_table(staff_client, seed):
    response = staff_client.get("/admin/usage/csv", {"start": D1, "end": D3})
    assert 'filename="usage-2025-01-06-2025-01-08.csv"' in response["Content-Disposition"]
    rows = read_csv(response)
    assert [(r["day"], r["deployment"], r["requests"], r["tokens"], r["ttft_p50_ms"], r["ttft_p99_ms"]) for r in rows] == [
        ("2025-01-06", seed.deployments["a"].name, "4", "110", "200.0", "298.0"),
        ("2025-01-06", seed.deployments["b"].name, "1", "150", "1000.0", "1000.0"),
        ("2025-01-07", seed.deployments["a"].name, "2", "7", "450.0", "499.0"),
        ("2025-01-07", seed.deployments["b"].name, "1", "0", "", ""),
        ("2025-01-08", seed.deployments["b"].name, "2", "34", "3000.0", "3980.0"),
    ]
    assert sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in rows) == 301
    assert [r["cancelled"] for r in rows] == ["0", "0", "1", "1", "0"]


def test_filters_apply_to_the_page_and_the_csv_alike(staff_client, seed):
    query = {"start": D2, "end": D3, "deployment": seed.deployments["b"].name, "user": seed.users["carol"].username}
    _, parsed = page(staff_client, **query)
    assert number(dict(parsed.tables["usage-totals"])["Tokens"]) == 34
    rows = read_csv(staff_client.get("/admin/usage/csv", query))
    assert [(r["day"], r["requests"], r["tokens"], r["ttft_p50_ms"]) for r in rows] == [("2025-01-08", "2", "34", "3000.0")]
    _, parsed = page(staff_client, start=D1, end=D3, user=seed.users["alice"].username)
    assert {row[0]: row[1] for row in parsed.tables["usage-totals"]}["Requests"] == "4"


@pytest.mark.parametrize("query, message", [
    ({"start": D3, "end": D1}, "The range ends before it starts."),
    ({"start": "2024-01-01", "end": "2025-06-01"}, "Choose at most 366 days."),
    ({"user": "nobody-has-this-name"}, "No user has that name."),
    ({"deployment": "no-such-deployment"}, "Select a valid choice."),
])
def test_bad_filters_are_refused_with_the_reason(staff_client, query, message):
    response = staff_client.get("/admin/usage/", query)
    assert response.status_code == 400 and message in response.content.decode()
    assert staff_client.get("/admin/usage/csv", query).status_code == 400


def test_only_staff_who_may_view_requests_see_it(client, seed):
    User = get_user_model()
    for path in ("/admin/usage/", "/admin/usage/csv"):
        response = client.get(path)  # nobody logged in
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    member = User.objects.create_user("member-" + seed.users["alice"].username, password="x")
    client.force_login(member, backend="django.contrib.auth.backends.ModelBackend")
    for path in ("/admin/usage/", "/admin/usage/csv"):
        response = client.get(path, {"start": D1, "end": D3})
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
        assert b"Tokens" not in response.content
    member.is_staff = True
    member.save()
    assert client.get("/admin/usage/").status_code == 403  # staff, but not allowed to view requests
    member.user_permissions.add(Permission.objects.get(codename="view_requestlog"))
    assert client.get("/admin/usage/", {"start": D1, "end": D3}).status_code == 200


def test_admin_index_links_to_the_dashboard(staff_client):
    response = staff_client.get("/admin/")
    assert b'href="/admin/usage/"' in response.content and b"Usage dashboard" in response.content
