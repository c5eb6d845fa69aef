"""Reading /metrics as Prometheus does: the body parsed by prometheus_client's own parser."""

import time
import uuid

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from chat.models import Deployment, RequestLog

DEADLINE = 120  # a bound on polling, not a speed check


def scrape(url: str, **headers) -> list:
    """Every sample of a /metrics body (it must parse)."""
    response = requests.get(url, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]


def value(samples: list, name: str, **labels) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_until(condition, what: str, deadline: float = DEADLINE):
    end = time.monotonic() + deadline
    while not (result := condition()):
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(0.1)
    return result


def wait_rows_ended(deployment) -> None:
    """Until no request row of `deployment` is queued or running (its worker stored every end)."""
    wait_until(
        lambda: not RequestLog.objects.filter(deployment=deployment, status__in=["queued", "running"]).exists(),
        f"the requests of {deployment.name} ended",
    )


def copy_of_default(prefix: str, **fields) -> Deployment:
    """A deployment of the default model on the suite's worker's queue, named for one test only,
    so the suite's other requests never touch its series."""
    deployment = Deployment.objects.get(name="default")
    deployment.pk, deployment.name, deployment.queue = None, f"{prefix}-{uuid.uuid4().hex[:8]}", "default"
    for name, value_ in fields.items():
        setattr(deployment, name, value_)
    deployment.save()
    return deployment


@pytest.fixture
def deployment(stack):
    """Shares the default's loaded model (the same engine)."""
    return copy_of_default("metrics")
