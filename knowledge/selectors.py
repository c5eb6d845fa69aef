"""Reads: which knowledge bases a user may use, and hybrid chunk search (pgvector + full text).

Search runs where the question is embedded, on the worker (DESIGN.md); the SQL lives here.
"""

from dataclasses import dataclass

from django.db import connection, transaction
from django.db.models import Q

from knowledge.models import TEXT_SEARCH_CONFIG, Chunk, KnowledgeBase

# Reciprocal rank fusion's constant (Cormack et al. 2009): a document's fused score is the sum of
# 1 / (RRF_K + rank) over the rankings it appears in.
RRF_K = 60
# Each ranking contributes this many candidates per chunk wanted (at least CANDIDATES_MIN).
CANDIDATES_PER_K = 5
CANDIDATES_MIN = 20
# HNSW's candidate list: above the default 40 so filtering by knowledge base keeps enough rows.
HNSW_EF_SEARCH = 100


def document_json(document) -> dict:
    """A document as the API and the knowledge page show it (the page writes it as text, never HTML)."""
    return {
        "id": document.pk,
        "knowledge_base": document.knowledge_base.name,
        "name": document.name,
        "type": document.file_type,
        "size": document.size,
        "sha256": document.sha256,
        "status": document.status,
        "error": document.error,
        "chunks_done": document.chunks_done,
        "chunks_total": document.chunks_total,
        "created_at": document.created_at.isoformat(),
        "updated_at": document.updated_at.isoformat(),
    }


def knowledge_bases_for(user):
    """Superusers may use every knowledge base; others their own and those shared with them."""
    if user.is_superuser:
        return KnowledgeBase.objects.all()
    return KnowledgeBase.objects.filter(Q(owner=user) | Q(shared_with=user)).distinct()


def may_use(user, knowledge_base: KnowledgeBase) -> bool:
    return knowledge_bases_for(user).filter(pk=knowledge_base.pk).exists()


def may_change(user, knowledge_base: KnowledgeBase) -> bool:
    return user.is_superuser or knowledge_base.owner_id == user.pk


def _vector_literal(vector) -> str:
    return "[" + ",".join(f"{float(x):.7g}" for x in vector) + "]"


def vector_ranking(*, knowledge_base_id: int, vector, limit: int, exact: bool = False) -> list[tuple[int, float]]:
    """(chunk id, cosine distance) nearest first: HNSW, or an exact scan when `exact`."""
    # Chunks exist only as a document's complete set (stored in one transaction when it becomes
    # ready, deleted when it fails), so no join with the document is needed: the planner may use
    # the HNSW index, or the knowledge-base index and an exact sort for a small knowledge base.
    sql = "SELECT id, embedding <=> %s::vector AS distance FROM knowledge_chunk WHERE knowledge_base_id = %s ORDER BY distance LIMIT %s"
    with transaction.atomic(), connection.cursor() as cursor:
        if exact:
            cursor.execute("SET LOCAL enable_indexscan = off")
        else:
            # Filtering by knowledge base after an index scan could return too few rows: let
            # pgvector keep scanning until the limit is met, in exact distance order.
            cursor.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            cursor.execute(f"SET LOCAL hnsw.ef_search = {max(HNSW_EF_SEARCH, limit)}")
        cursor.execute(sql, [_vector_literal(vector), knowledge_base_id, limit])
        return [(row[0], float(row[1])) for row in cursor.fetchall()]


def text_ranking(*, knowledge_base_id: int, question: str, limit: int) -> list[tuple[int, float]]:
    """(chunk id, ts_rank_cd) best first. The question's words are OR-ed: a chunk need not hold all."""
    sql = (
        "WITH q AS (SELECT replace(plainto_tsquery(%s::regconfig, %s)::text, ' & ', ' | ') AS text) "
        "SELECT c.id, ts_rank_cd(c.search_vector, to_tsquery(%s::regconfig, q.text)) AS rank "
        "FROM q, knowledge_chunk c "
        "WHERE q.text <> '' AND c.knowledge_base_id = %s AND c.search_vector @@ to_tsquery(%s::regconfig, q.text) "
        "ORDER BY rank DESC, c.id LIMIT %s"
    )
    question = question.replace("\x00", " ")  # PostgreSQL text refuses NUL; it separates words here
    params = [TEXT_SEARCH_CONFIG, question, TEXT_SEARCH_CONFIG, knowledge_base_id, TEXT_SEARCH_CONFIG, limit]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [(row[0], float(row[1])) for row in cursor.fetchall()]


def fuse(rankings: list[list[int]], k: int) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of ranked id lists: the best `k` (id, fused score), best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]


@dataclass
class Hit:
    chunk: Chunk
    score: float

    def source(self, excerpt_chars: int = 400) -> dict:
        """The hit as PROTOCOL.md's source object."""
        text = self.chunk.text if len(self.chunk.text) <= excerpt_chars else self.chunk.text[: excerpt_chars - 1] + "…"
        return {"document": self.chunk.document.name, "chunk": self.chunk.index, "score": round(self.score, 6), "text": text}


def search_chunks(*, knowledge_base_id: int, question: str, vector, k: int, mode: str = "hybrid") -> list[Hit]:
    """The top `k` chunks for a question: "hybrid" (RRF of both), "vector" or "text" alone."""
    limit = max(CANDIDATES_MIN, CANDIDATES_PER_K * k)
    rankings = []
    if mode in ("hybrid", "vector"):
        rankings.append([cid for cid, _ in vector_ranking(knowledge_base_id=knowledge_base_id, vector=vector, limit=limit)])
    if mode in ("hybrid", "text"):
        rankings.append([cid for cid, _ in text_ranking(knowledge_base_id=knowledge_base_id, question=question, limit=limit)])
    best = fuse(rankings, k)
    chunks = Chunk.objects.select_related("document").defer("embedding", "search_vector").in_bulk([cid for cid, _ in best])
    return [Hit(chunks[cid], score) for cid, score in best if cid in chunks]
