"""The usage dashboard in a real browser (chromium through Playwright, against Daphne): an admin
follows the link from the admin's index, picks the seeded days, reads the totals and the charts'
numbers, and downloads the CSV; nothing is loaded from anywhere but the site."""

import csv
from pathlib import Path

from playwright.sync_api import expect

from tests.site.conftest import log_in, make_user


def cells(page, selector):
    return {row.locator("th").first.inner_text(): row.locator("td").all_inner_texts() for row in page.locator(selector).all()}


def test_admin_reads_the_seeded_totals_charts_and_csv(seed, page, web):
    admin, password = make_user(is_staff=True, is_superuser=True)
    log_in(page, admin, password, next_path="/admin/")
    page.get_by_role("link", name="Usage dashboard").click()
    expect(page.get_by_role("heading", name="Usage", exact=True)).to_be_visible()

    page.get_by_label("From (UTC day)").fill("2025-01-06")
    page.get_by_label("To (UTC day)").fill("2025-01-08")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#usage-range")).to_contain_text("2025-01-06 to 2025-01-08")

    totals = {name: values[0] for name, values in cells(page, "#usage-totals tr").items()}
    assert totals == {"Requests": "10", "ok": "7", "error": "1", "cancelled": "2", "Prompt tokens": "165",
                      "Cached prompt tokens": "5", "Completion tokens": "136", "Tokens": "301"}
    deployments = cells(page, "#usage-deployments tbody tr")
    assert deployments[seed.deployments["a"].name] == ["6", "4", "1", "1", "117", "300.0", "496.0"]
    assert deployments[seed.deployments["b"].name] == ["4", "3", "0", "1", "184", "2,000.0", "3,960.0"]

    charts = page.locator(".usage-svg svg")
    expect(charts).to_have_count(6)
    for chart in charts.all():
        assert chart.bounding_box()["width"] > 300  # drawn, not an empty box
    assert page.locator("#chart-tokens-by-deployment tfoot td").all_inner_texts() == ["117", "184"]
    assert page.locator("#chart-requests-by-outcome tfoot td").all_inner_texts() == ["7", "1", "2"]
    assert page.locator("#chart-time-to-first-token svg").get_attribute("aria-label").startswith("Time to the first token")

    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    rows = list(csv.DictReader(Path(download.value.path()).read_text().splitlines()))
    assert len(rows) == 5 and sum(int(r["tokens"]) for r in rows) == 301
    assert {r["ttft_p99_ms"] for r in rows if r["day"] == "2025-01-08"} == {"3980.0"}

    assert page.loaded and all(url.startswith(web) for url in page.loaded), page.loaded
    assert not page.script_errors
    assert not [m for m in page.console_errors if "Content Security Policy" in m]
