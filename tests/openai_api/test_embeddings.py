"""/v1/embeddings: the site's embedding model on the worker, float or base64, stored as a request row.

Equality with the vectors a knowledge base stores is checked against `workers.embeddings.embed_texts`,
the one function ingestion uses too (the knowledge-base tables come with that work).
"""

import json

import numpy as np
import pytest
import requests
from django.conf import settings
from openai import NotFoundError

from chat.models import RequestLog

TEXTS = ["a cat sat", "a kitten was sitting", "tax law reform"]


def test_vectors_rank_by_meaning_and_equal_the_worker_function(client, user):
    raw = client.embeddings.with_raw_response.create(model="default", input=TEXTS)  # the client asks for base64
    result = raw.parse()
    vectors = np.array([item.embedding for item in result.data])
    assert vectors.shape == (3, settings.EMBEDDING_DIMENSIONS)
    assert vectors[0] @ vectors[1] > vectors[2] @ vectors[1]
    assert result.model == settings.EMBEDDING_MODEL_NAME and result.usage.prompt_tokens > 0

    from workers.embeddings import embed_texts

    expected, tokens = embed_texts(TEXTS)
    assert np.allclose(vectors, np.array(expected), atol=1e-5)
    assert result.usage.prompt_tokens == tokens

    row = RequestLog.objects.get(user=user)
    assert row.protocol == "openai" and row.status == RequestLog.Status.OK and row.prompt_tokens == tokens
    assert str(row.id) == raw.headers["X-Request-Id"]  # the row, the worker's task and the stream: one id


def test_float_format_and_the_model_own_name(stack, token):
    response = requests.post(
        f"{stack.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {token}"},
        json={"model": settings.EMBEDDING_MODEL_NAME, "input": "a cat sat", "encoding_format": "float"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 1 and len(data[0]["embedding"]) == settings.EMBEDDING_DIMENSIONS
    assert abs(np.linalg.norm(data[0]["embedding"]) - 1) < 1e-4

    # its id names its events too: read again, one `embeddings` event with the same vectors
    again = requests.get(
        f"{stack.url}/api/requests/{response.headers['X-Request-Id']}/events", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    assert again.status_code == 200, again.text
    lines = again.text.splitlines()
    assert "event: embeddings" in lines and lines.count("event: embeddings") == 1, again.text[:300]
    event = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
    assert np.allclose(event["vectors"][0], data[0]["embedding"], atol=1e-6)


def test_chat_deployment_is_not_an_embedding_model(client):
    with pytest.raises(NotFoundError):
        client.embeddings.create(model="SmolLM2", input="a cat sat")


@pytest.mark.parametrize("body, param", [({"input": ""}, "input"), ({"input": []}, "input"), ({"input": "x", "dimensions": 3}, "dimensions")])
def test_bad_input_is_400(stack, token, body, param):
    response = requests.post(
        f"{stack.url}/v1/embeddings", headers={"Authorization": f"Bearer {token}"}, json={"model": "default", **body}, timeout=60
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
