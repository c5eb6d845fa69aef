"""/metrics is not public: callers from METRICS_ALLOWED_NETWORKS (loopback by default) or with
`Authorization: Bearer <METRICS_TOKEN>` get it; anyone else gets 403. The same rule guards a
worker's own endpoint."""

import secrets

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from llmsite.embedded import _free_port
from llmsite.metrics import allowed
from tests.conftest import start_web

NOT_LOOPBACK = "192.0.2.0/24"  # TEST-NET-1: no caller here comes from it


def assert_parses(response) -> None:
    assert response.status_code == 200, response.text
    assert list(text_string_to_metric_families(response.text))


def assert_refused(url: str, **headers) -> None:
    response = requests.get(url, headers=headers, timeout=30)
    assert response.status_code == 403
    assert "METRICS_TOKEN" in response.text and "llmsite:" not in response.text  # says why, shows nothing


def test_with_loopback_not_allowed_metrics_need_the_token(stack):
    secret = secrets.token_urlsafe(24)
    web, url = start_web(env={"METRICS_ALLOWED_NETWORKS": NOT_LOOPBACK, "METRICS_TOKEN": secret})
    try:
        assert_refused(f"{url}/metrics")
        assert_refused(f"{url}/metrics", Authorization="Bearer wrong-" + secret)
        assert_refused(f"{url}/metrics", Authorization=secret)  # the scheme is part of it
        assert_parses(requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {secret}"}, timeout=30))
    finally:
        web.stop()
    assert_parses(requests.get(f"{stack.url}/metrics", timeout=30))  # loopback, by default


def test_a_workers_endpoint_keeps_the_same_rule(settings):
    from workers import metrics as worker_metrics

    settings.METRICS_ALLOWED_NETWORKS, settings.METRICS_TOKEN = [NOT_LOOPBACK], secrets.token_urlsafe(24)
    server = worker_metrics.serve(host="127.0.0.1", port=_free_port())
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        assert_refused(url)
        assert_refused(url, Authorization="Bearer nope")
        response = requests.get(url, headers={"Authorization": f"Bearer {settings.METRICS_TOKEN}"}, timeout=30)
        assert_parses(response)
        assert "llmsite:num_requests_running" in response.text
        assert requests.get(url.replace("/metrics", "/other"), timeout=30).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "address, networks, expected",
    [
        ("127.0.0.1", ["127.0.0.0/8", "::1/128"], True),
        ("::1", ["127.0.0.0/8", "::1/128"], True),
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),  # a dual-stack socket's IPv4 caller
        ("10.1.2.3", ["127.0.0.0/8", "::1/128"], False),
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("not an address", ["0.0.0.0/0"], False),
        (None, ["0.0.0.0/0"], False),
    ],
)
def test_the_networks_rule(settings, address, networks, expected):
    settings.METRICS_ALLOWED_NETWORKS, settings.METRICS_TOKEN = networks, ""
    assert allowed(remote_addr=address, authorization="Bearer anything") is expected
