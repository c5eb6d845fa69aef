"""A worker starts each admitted answer on a thread of its own (workers/admission.py): each such
thread must hand its database connection back to the pool when it ends, or the worker's pool
(DB_POOL_MAX connections) runs dry after that many answers and every later answer hangs."""

import json

import requests
from django.conf import settings


def test_a_worker_answers_more_requests_than_its_database_pool_holds(stack, token):
    answers = settings.DATABASES["default"]["OPTIONS"]["pool"]["max_size"] + 5
    for i in range(answers):
        body = {"prompt": f"Say {i}.", "max_new_tokens": 1, "temperature": 0}
        response = requests.post(stack.predict_url(), headers={"Authorization": token}, json=body, timeout=60)
        assert response.status_code == 200, f"answer {i} of {answers}: {response.text}"
        assert "response" in json.loads(response.content)
