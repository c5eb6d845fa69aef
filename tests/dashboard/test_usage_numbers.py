"""The dashboard's numbers (chat/usage.py) for the seeded history: totals, the per-day and
per-deployment sums, the busiest users and tokens, and the time to the first token, exact over
up to 31 days and from the daily histograms beyond."""

import datetime
import math

import pytest

from chat.usage import Filters, bucket_middle_ms, usage
from tests.dashboard.conftest import D1, D2, D3


def report(seed, start=D1, end=D3, deployment=None, user=None):
    return usage(Filters(
        start, end, seed.deployments[deployment].pk if deployment else None, seed.users[user].pk if user else None
    ))


def sums(counts):
    return counts.requests, counts.ok, counts.error, counts.cancelled, counts.tokens


def test_totals_count_every_ended_request_once(seed):
    totals = report(seed).totals
    assert (totals.requests, totals.ok, totals.error, totals.cancelled) == (10, 7, 1, 2)
    assert (totals.prompt_tokens, totals.completion_tokens, totals.cached_tokens, totals.tokens) == (165, 136, 5, 301)


def test_tokens_and_outcomes_per_day_and_deployment(seed):
    r = report(seed)
    a, b = seed.deployments["a"].pk, seed.deployments["b"].pk
    assert {k: sums(v) for k, v in r.by_day_deployment.items()} == {
        (D1, a): (4, 3, 1, 0, 110),
        (D1, b): (1, 1, 0, 0, 150),
        (D2, a): (2, 1, 0, 1, 7),
        (D2, b): (1, 0, 0, 1, 0),
        (D3, b): (2, 2, 0, 0, 34),
    }
    assert [(name, sums(counts)) for name, counts, _ in r.by_deployment()] == [
        (seed.deployments["a"].name, (6, 4, 1, 1, 117)),
        (seed.deployments["b"].name, (4, 3, 0, 1, 184)),
    ]
    assert {day: c.tokens for day, c in r.by_day().items()} == {D1: 260, D2: 7, D3: 34}


def test_busiest_users_and_api_tokens(seed):
    r = report(seed)
    assert [(r.user_names[u], c.requests, c.tokens) for u, c in r.busiest_users()] == [
        (seed.users["carol"].username, 3, 184), (seed.users["alice"].username, 4, 107), (seed.users["bob"].username, 3, 10),
    ]
    tokens = [(t, c.requests, c.tokens) for t, c in r.busiest_tokens()]
    assert tokens == [(seed.tokens["alice"].pk, 4, 107), (seed.tokens["bob"].pk, 3, 10)]  # carol's chat page has no token
    assert seed.tokens["alice"].prefix in r.token_names[seed.tokens["alice"].pk]


def test_time_to_first_token_is_exact_per_deployment_per_day(seed):
    r = report(seed)
    assert r.filters.exact
    a, b = seed.deployments["a"].pk, seed.deployments["b"].pk
    # percentile_cont: linear between the two requests around the rank
    assert {k: (t.requests, t.p50_ms, t.p99_ms) for k, t in r.ttft.items()} == {
        (D1, a): (3, 200.0, 298.0),
        (D1, b): (1, 1000.0, 1000.0),
        (D2, a): (2, 450.0, 499.0),
        (D3, b): (2, 3000.0, 3980.0),
    }
    assert {d: (t.requests, t.p50_ms, t.p99_ms) for d, t in r.ttft_by_deployment.items()} == {
        a: (5, 300.0, 496.0), b: (3, 2000.0, 3960.0),
    }


def test_filters_by_deployment_user_and_days(seed):
    by_user = report(seed, user="alice")
    assert sums(by_user.totals) == (4, 3, 0, 1, 107)
    assert by_user.ttft_by_deployment[seed.deployments["a"].pk].p50_ms == 300.0  # 100, 200, 400, 500
    by_deployment = report(seed, deployment="b")
    assert sums(by_deployment.totals) == (4, 3, 0, 1, 184)
    assert set(by_deployment.ttft_by_deployment) == {seed.deployments["b"].pk}
    assert sums(report(seed, start=D2, end=D2).totals) == (3, 1, 0, 2, 7)
    assert sums(report(seed, start=D2, end=D3, deployment="b", user="carol").totals) == (2, 2, 0, 0, 34)
    assert report(seed, start=D3 + datetime.timedelta(days=1), end=D3 + datetime.timedelta(days=5)).totals.requests == 0


def nearest_rank(values, p):
    return sorted(values)[math.ceil(p * len(values)) - 1]


def test_over_31_days_percentiles_come_from_the_histograms_within_their_width(seed):
    r = report(seed, start=D3 - datetime.timedelta(days=40))
    assert not r.filters.exact
    a, b = seed.deployments["a"].pk, seed.deployments["b"].pk
    exact = {(D1, a): [100, 200, 300], (D1, b): [1000], (D2, a): [400, 500], (D3, b): [2000, 4000]}
    whole = {a: [100, 200, 300, 400, 500], b: [1000, 2000, 4000]}
    for got, expected in ((r.ttft, exact), (r.ttft_by_deployment, whole)):
        assert set(got) == set(expected)
        for key, values in expected.items():
            assert got[key].requests == len(values)
            for p, value in ((0.5, got[key].p50_ms), (0.99, got[key].p99_ms)):
                assert value == pytest.approx(nearest_rank(values, p), rel=0.045)
    assert sums(r.totals) == (10, 7, 1, 2, 301)  # the counts do not change with the method


def test_one_users_percentiles_stay_exact_over_long_ranges(seed):
    r = report(seed, start=D3 - datetime.timedelta(days=300), user="carol")
    assert r.filters.exact
    assert r.ttft_by_deployment[seed.deployments["b"].pk].p50_ms == 2000.0


def test_bucket_middles_double_every_eight_buckets():
    assert bucket_middle_ms(80) == pytest.approx(2 * bucket_middle_ms(72), rel=1e-3)
    assert bucket_middle_ms(53) == pytest.approx(100, rel=0.045)  # 100 ms lies in bucket 53 (test_rollup)
