"""The site's embedding model (all-MiniLM-L6-v2, 384 dimensions), loaded once per worker process.

All embedding runs in workers (DESIGN.md): knowledge-base ingestion, questions for retrieval and
`/v1/embeddings` all call `embed_texts`, so the same text always gets the same vector.
"""

import logging
import threading

from django.conf import settings

log = logging.getLogger(__name__)

_model = None
_lock = threading.Lock()


def model():
    global _model
    with _lock:
        if _model is None:
            from sentence_transformers import SentenceTransformer

            path = settings.EMBEDDING_MODEL_PATH
            log.info("loading the embedding model from %s", path)
            _model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        return _model


def embed_texts(texts: list[str]) -> tuple[list[list[float]], int]:
    """Unit-length vectors for `texts` (cosine = dot product), and the tokens they took."""
    m = model()
    with _lock:
        vectors = m.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=32, show_progress_bar=False)
        tokens = sum(len(ids) for ids in m.tokenizer(texts, truncation=True)["input_ids"])
    return vectors.tolist(), tokens


def embed_vectors(texts: list[str]) -> list[list[float]]:
    """`embed_texts` without the token count: the `embed` that ingestion takes."""
    return embed_texts(texts)[0]
