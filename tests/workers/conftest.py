import sys

import pytest

from chat.models import Deployment
from tests.workers import fake_vllm


@pytest.fixture
def fake_vllm_engine(monkeypatch, django_db_setup, django_db_blocker):
    """The vllm engine adapter over the stand-in of vLLM (tests/workers/fake_vllm.py)."""
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    fake_vllm.calls.clear()
    from workers.engines.vllm_engine import VLLMEngine

    with django_db_blocker.unblock():
        deployment = Deployment.objects.get(name="default")
    deployment.engine, deployment.precision, deployment.max_batch_size = "vllm", "bf16", 8
    return VLLMEngine(deployment)
