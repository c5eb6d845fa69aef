"""`/api/health` says per deployment whether a worker is alive and really generates."""

import uuid

import requests

from chat.models import Deployment
from chat.tokens import token_create


def test_health_reports_a_deployment_that_generates(stack, user):
    _, raw = token_create(user=user, deployments=[Deployment.objects.get(name="default")])
    response = requests.get(f"{stack.url}/api/health", headers={"Authorization": raw}, timeout=120)
    assert response.status_code == 200, response.text
    (report,) = response.json()["deployments"]
    assert report["deployment"] == "default" and report["worker"] and report["generates"]


def test_health_is_503_for_a_deployment_no_worker_serves(stack, user):
    orphan = Deployment.objects.create(name=f"orphan-{uuid.uuid4().hex[:6]}", model_source="x/y", queue=f"none-{uuid.uuid4().hex[:6]}")
    _, raw = token_create(user=user, deployments=[orphan])
    response = requests.get(f"{stack.url}/api/health", headers={"Authorization": raw}, timeout=120)
    assert response.status_code == 503
    (report,) = response.json()["deployments"]
    assert report == {**report, "deployment": orphan.name, "worker": False, "generates": False}
    assert orphan.queue in report["detail"]


def test_health_needs_a_token(stack):
    assert requests.get(f"{stack.url}/api/health", timeout=30).status_code == 401
