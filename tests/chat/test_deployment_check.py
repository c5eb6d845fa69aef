"""The admin's deployment check: a real one-token request, answered or reported as unanswered."""

import asyncio
import uuid

from chat import probes
from chat.models import Deployment, RequestLog


def test_check_reports_a_deployment_whose_queue_no_worker_serves(stack, user):
    lonely = Deployment.objects.create(
        name=f"lonely-{uuid.uuid4().hex[:6]}", model_source="nowhere", queue=f"nobody-{uuid.uuid4().hex[:6]}"
    )
    answered, text = asyncio.run(probes.deployment_check(deployment=lonely, user=user, timeout=2))
    assert not answered
    assert text.startswith(f"Deployment '{lonely.name}': No model worker is serving this deployment")
    assert f"queue '{lonely.queue}'" in text
    assert not RequestLog.objects.filter(deployment=lonely).exists()  # refused before anything was queued


def test_check_reports_that_the_default_deployment_answered(stack, user):
    default = Deployment.objects.get(name="default")
    answered, text = asyncio.run(probes.deployment_check(deployment=default, user=user, timeout=300))
    assert answered, text
    assert text.startswith("Deployment 'default': the worker answered (request ")
