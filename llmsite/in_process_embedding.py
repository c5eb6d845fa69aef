"""The embedding model run in the calling process, for `manage.py ingest --in-process` on a machine
with no worker: the one place outside workers/ that reaches for it.

knowledge/ imports nothing from workers/ (DESIGN.md), so the command asks here; llmsite/ composes
the site's parts and may. The web tier never calls this: its embedding runs on workers.
"""

from collections.abc import Callable


def embedder() -> Callable[[list[str]], list[list[float]]]:
    """The workers' own embedding function (the same model, so the same vectors), loaded on first use."""
    from workers.embeddings import embed_vectors

    return embed_vectors
