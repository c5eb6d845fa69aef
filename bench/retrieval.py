"""Retrieval benchmark: quality on the shipped corpus, latency at 10k and 100k chunks.

Run it against its own fresh database (the launcher starts PostgreSQL+pgvector and Redis):

    LLMSITE_DATA_DIR=var/bench .venv/bin/python -m llmsite.launcher services --fresh -- \
        .venv/bin/python bench/retrieval.py

1. Quality: ingests bench/data/corpus.jsonl (240 generated documents) through the site's own
   ingestion (parse, split, embed with all-MiniLM-L6-v2, store), then asks the 480 questions of
   bench/data/questions.jsonl, each answered by exactly one chunk, and prints recall@5 and MRR (over
   the top 20) for vector-only, full-text-only and hybrid (reciprocal rank fusion) search.
2. Latency: adds synthetic chunks (random unit vectors, random words) to reach 10k and then 100k
   chunks in one knowledge base and prints p50/p99 query latency of HNSW against exact search,
   HNSW's recall@10 against exact, and hybrid search.
"""

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

import django  # noqa: E402

django.setup()

import numpy as np  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402

from knowledge import selectors, services  # noqa: E402
from knowledge.models import Chunk, Document, KnowledgeBase  # noqa: E402
from workers.embeddings import embed_texts, embed_vectors  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
MODES = ("vector", "text", "hybrid")
DEPTH = 20  # MRR is computed over this many results
QUERIES = 200  # latency queries per measurement
SIZES = (10_000, 100_000)
VOCABULARY = (DATA / "corpus.jsonl").read_text().replace('"', " ").replace("\\n", " ").split()


def say(text: str = "") -> None:
    print(text, flush=True)


def owner():
    User = get_user_model()
    return User.objects.filter(username="bench").first() or User.objects.create_user("bench")


def fresh_kb(name: str, **fields) -> KnowledgeBase:
    KnowledgeBase.objects.filter(name=name).delete()
    return KnowledgeBase.objects.create(name=name, owner=owner(), **fields)


def quality() -> dict:
    kb = fresh_kb("bench-corpus", chunk_size=250, chunk_overlap=0, retrieval_k=5)
    documents = [json.loads(line) for line in (DATA / "corpus.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines()]
    started = time.monotonic()
    for doc in documents:
        document, _ = services.document_create(knowledge_base=kb, name=doc["name"], data=doc["text"].encode())
        done = services.document_ingest(document_id=document.pk, embed=embed_vectors)
        assert done.status == Document.Status.READY, done.error
    chunks = list(Chunk.objects.filter(knowledge_base=kb).select_related("document").only("id", "text", "document__name"))
    say(f"corpus: {len(documents)} documents, {len(chunks)} chunks, ingested in {time.monotonic() - started:.0f}s")

    relevant = {}
    for n, q in enumerate(questions):
        ids = [c.id for c in chunks if c.document.name == q["document"] and q["answer"] in c.text]
        assert len(ids) == 1, f"question {n} is answered by {len(ids)} chunks"
        relevant[n] = ids[0]
    vectors, _ = embed_texts([q["question"] for q in questions])

    results = {}
    for mode in MODES:
        hits_at_5, reciprocal = 0, 0.0
        for n, q in enumerate(questions):
            hits = selectors.search_chunks(knowledge_base_id=kb.pk, question=q["question"], vector=vectors[n], k=DEPTH, mode=mode)
            ranked = [h.chunk.id for h in hits]
            if relevant[n] in ranked:
                rank = ranked.index(relevant[n]) + 1
                hits_at_5 += rank <= 5
                reciprocal += 1 / rank
        results[mode] = (hits_at_5 / len(questions), reciprocal / len(questions))
    say(f"\nRetrieval quality on the shipped corpus ({len(questions)} questions, {len(chunks)} chunks)\n")
    say("| search | recall@5 | MRR@20 |")
    say("|---|---|---|")
    for mode in MODES:
        say(f"| {mode} | {results[mode][0]:.3f} | {results[mode][1]:.3f} |")
    best_single = max(results["vector"][0], results["text"][0])
    verdict = "PASS" if results["hybrid"][0] >= best_single - 0.02 else "FAIL"
    say(f"\nhybrid recall@5 {results['hybrid'][0]:.3f} vs best single {best_single:.3f} - 0.02: {verdict}")
    return results


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def add_synthetic(kb: KnowledgeBase, document: Document, start: int, stop: int, rng) -> None:
    words = random.Random(start)
    batch = 2000
    for first in range(start, stop, batch):
        vectors = unit_vectors(rng, min(batch, stop - first))
        Chunk.objects.bulk_create(
            [
                Chunk(document=document, knowledge_base=kb, index=first + i, text=" ".join(words.choices(VOCABULARY, k=40)), embedding=v)
                for i, v in enumerate(vectors)
            ]
        )


HNSW = next(i for i in Chunk._meta.indexes if i.name == "knowledge_chunk_embedding_hnsw")


def drop_hnsw() -> None:
    """Bulk loads go faster without the HNSW index, which is then built once (pgvector's advice)."""
    with connection.schema_editor() as editor:
        editor.remove_index(Chunk, HNSW)


def build_hnsw() -> float:
    """Build the site's HNSW index (the model's own definition); returns the seconds it took."""
    started = time.monotonic()
    with connection.schema_editor() as editor:
        editor.execute("SET maintenance_work_mem = '1GB'")
        editor.add_index(Chunk, HNSW)
    return time.monotonic() - started


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{statistics.median(ms):.1f} | {p99:.1f}"


def planner_choice(kb_id: int, vector) -> str:
    """Which plan PostgreSQL picks on its own for the site's vector query."""
    with connection.cursor() as cursor:
        cursor.execute(
            "EXPLAIN SELECT id FROM knowledge_chunk WHERE knowledge_base_id = %s ORDER BY embedding <=> %s::vector LIMIT 20",
            [kb_id, selectors._vector_literal(vector)],
        )
        lines = [row[0] for row in cursor.fetchall()]
    return "the HNSW index" if any("knowledge_chunk_embedding_hnsw" in line for line in lines) else "an exact scan and sort"


def hnsw_ranking(kb_id: int, vector, limit: int):
    """The vector query with the HNSW index forced, whatever the planner would choose."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("SET LOCAL enable_bitmapscan = off")
        return selectors.vector_ranking(knowledge_base_id=kb_id, vector=vector, limit=limit)


def latency() -> None:
    kb = fresh_kb("bench-synthetic")
    document = Document.objects.create(
        knowledge_base=kb, name="synthetic.txt", file_type="txt", size=0, sha256="0" * 64, content=b"", status=Document.Status.READY
    )
    rng = np.random.default_rng(7)
    queries = unit_vectors(rng, QUERIES)
    question_words = random.Random(3)
    questions = [" ".join(question_words.choices(VOCABULARY, k=8)) for _ in range(QUERIES)]
    rows, have = [], 0
    for size in SIZES:
        drop_hnsw()
        started = time.monotonic()
        add_synthetic(kb, document, have, size, rng)
        have = size
        loaded = time.monotonic() - started
        built = build_hnsw()
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE knowledge_chunk")
        say(f"\n{size} synthetic chunks: loaded in {loaded:.0f}s, HNSW index built in {built:.0f}s")
        say(f"the planner, left alone, answers the site's vector query with {planner_choice(kb.pk, queries[0])}")
        timings = {"hnsw": [], "exact": [], "hybrid": []}
        overlap = []
        for n in range(QUERIES):
            t = time.perf_counter()
            approx = hnsw_ranking(kb.pk, queries[n], 10)
            timings["hnsw"].append(time.perf_counter() - t)
            t = time.perf_counter()
            exact = selectors.vector_ranking(knowledge_base_id=kb.pk, vector=queries[n], limit=10, exact=True)
            timings["exact"].append(time.perf_counter() - t)
            t = time.perf_counter()
            selectors.search_chunks(knowledge_base_id=kb.pk, question=questions[n], vector=queries[n], k=5)
            timings["hybrid"].append(time.perf_counter() - t)
            overlap.append(len({i for i, _ in approx} & {i for i, _ in exact}) / 10)
        rows.append((size, timings, statistics.mean(overlap)))
    say(f"\nQuery latency, {QUERIES} queries each (ms; one knowledge base; random 384-d unit vectors)\n")
    say("| chunks | HNSW p50 | HNSW p99 | exact p50 | exact p99 | hybrid p50 | hybrid p99 | HNSW recall@10 vs exact |")
    say("|---|---|---|---|---|---|---|---|")
    for size, timings, recall in rows:
        say(
            f"| {size:,} | {percentiles(timings['hnsw'])} | {percentiles(timings['exact'])} | "
            f"{percentiles(timings['hybrid'])} | {recall:.3f} |"
        )


def main() -> None:
    call_command("migrate", interactive=False, verbosity=0)
    say(f"PostgreSQL: {connection.cursor().connection.info.server_version}, CPU cores: {os.cpu_count()}")
    quality()
    latency()


if __name__ == "__main__":
    main()
