"""Embedding runs on the worker (queue EMBEDDING_QUEUE) and comes back over the request's stream."""

import asyncio

import numpy as np

from chat.embeddings import embed


def test_worker_embeds_texts_with_the_site_model(stack):
    vectors, tokens = asyncio.run(embed(["a cat sat", "a kitten was sitting", "tax law reform"]))
    v = np.array(vectors)
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2]
    assert tokens > 0
