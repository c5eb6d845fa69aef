"""Retrieval for `langchain: true` requests, on the worker: embed the question, search the
knowledge base, publish the sources, and put the chunks into the prompt (as many as fit)."""

from collections.abc import Callable

from chat import events
from llmsite import contract

# Tokens kept free for the answer when chunks are dropped to fit the context.
ANSWER_ROOM_TOKENS = 256


def _embed_question(question: str) -> list[float]:
    from workers.embeddings import embed_texts

    return embed_texts([question])[0][0]


def ground(*, request_id: str, knowledge_base_id: int, messages: list[dict], fits: Callable[[list[dict]], bool]) -> list[dict]:
    """The messages with the retrieved chunks in the last user turn; a `sources` event goes out first."""
    from knowledge.services import grounded_prompt, retrieve

    question = messages[-1]["content"]
    hits = retrieve(knowledge_base_id=knowledge_base_id, question=question, embed_question=_embed_question)

    def with_context(kept):
        return [*messages[:-1], {**messages[-1], "content": grounded_prompt(question, kept)}]

    while hits and not fits(with_context(hits)):
        hits = hits[:-1]  # the lowest-ranked chunk goes first
    events.publish(request_id, contract.Sources([hit.source() for hit in hits]))
    return with_context(hits)
