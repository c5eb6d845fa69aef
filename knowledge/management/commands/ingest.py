"""`manage.py ingest <kb> <file>...`: store files in a knowledge base (created if missing) and
return when they are ready, with a progress bar per file.

By default the files are ingested where uploads through the API are: each is stored and queued
(task workers.ingest_document on EMBEDDING_QUEUE), and the command follows its status and chunk
counts until it is ready or failed. With no live worker on that queue it says so and stores nothing.

`--in-process` parses, embeds and stores here instead, for a machine with no worker; the embedding
model then loads in this process. knowledge/ imports nothing from workers/ (DESIGN.md), so the
command takes the embedding function from llmsite.in_process_embedding, the one module outside
workers/ that reaches for it (llmsite/ composes the site's parts); the web tier never calls it.
"""

import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from audit import services as audit
from llmsite import in_process_embedding, workers_alive
from llmsite.errors import ApiError
from knowledge import services
from knowledge.models import Document

POLL_SECONDS = 0.5
FINISHED = (Document.Status.READY, Document.Status.FAILED)


def no_worker(queue: str) -> str:
    return (
        f"No worker consumes the queue '{queue}', so nothing would ingest the files: start one "
        f"(`make run`, or `celery -A workers worker -Q {queue}`), or pass --in-process to ingest here."
    )


class Command(BaseCommand):
    help = "Ingest files into a knowledge base (created if missing) on a worker, or here with --in-process; returns when they are ready."

    def add_arguments(self, parser):
        parser.add_argument("knowledge_base")
        parser.add_argument("files", nargs="+")
        parser.add_argument("--owner", default="", help="owner of a new knowledge base (default: the first superuser)")
        parser.add_argument(
            "--in-process", action="store_true", help="parse, embed and store here, loading the embedding model (no worker needed)"
        )
        parser.add_argument(
            "--timeout", type=float, default=3600.0, help="seconds to wait for a worker to make the files ready (default 3600)"
        )

    def handle(self, *args, knowledge_base, files, owner, in_process, timeout, **options):
        queue = settings.EMBEDDING_QUEUE
        if not in_process and not workers_alive.queue_has_worker(queue):
            raise CommandError(no_worker(queue))
        try:
            kb, created = services.knowledge_base_get_or_create(name=knowledge_base, owner=self._owner(owner))
        except ValidationError as exc:
            raise CommandError(f"Bad knowledge base name '{knowledge_base}': {' '.join(exc.messages)}") from None
        self.stdout.write(f"Knowledge base '{kb.name}' ({'created' if created else 'exists'}, owner {kb.owner})")
        if in_process:
            embed = in_process_embedding.embedder()
            ok = [self._ingest_here(kb, Path(path), embed) for path in files]
        else:
            ok = self._ingest_on_worker(kb, [Path(path) for path in files], timeout)
        failed = [path for path, good in zip(files, ok) if not good]
        if failed:
            raise CommandError(f"{len(failed)} of {len(files)} file(s) failed: {', '.join(failed)}")

    def _owner(self, username: str):
        User = get_user_model()
        if username:
            user = User.objects.filter(username=username).first()
            if user is None:
                raise CommandError(f"There is no user named '{username}'.")
            return user
        user = User.objects.filter(is_superuser=True).order_by("pk").first()
        if user is None:
            raise CommandError("There is no superuser to own the knowledge base: pass --owner <username>.")
        return user

    # --- both ways ------------------------------------------------------------------------------

    def _store(self, store, kb, path: Path) -> Document | None:
        """The file stored by `store` (a service); None, with the reason on stderr, when it cannot be."""
        try:
            data = path.read_bytes()
            document, created = store(knowledge_base=kb, name=path.name, data=data)
        except OSError as exc:
            self.stderr.write(f"{path}: cannot read the file: {exc.strerror or exc}")
            return None
        except (ApiError, ValidationError) as exc:
            self.stderr.write(f"{path}: {getattr(exc, 'message', exc)}")
            return None
        # No request: the entry names the knowledge base's owner, and no address.
        note = f"command; knowledge base {kb.name}" + ("" if created else f"; already stored as {document.name}")
        audit.record(action=audit.Action.DOCUMENT_UPLOADED, user=kb.owner, obj=document, note=note)
        if document.status == Document.Status.READY:
            self.stdout.write(f"{path}: already ingested as document {document.pk} ({document.chunks_total} chunks)")
        return document

    def _bar(self, path: Path, total: int | None = None) -> tqdm:
        return tqdm(total=total, desc=path.name, unit="chunk", file=self.stdout._out)

    def _outcome(self, path: Path, document: Document) -> bool:
        if document.status != Document.Status.READY:
            self.stderr.write(f"{path}: failed: {document.error}")
            return False
        self.stdout.write(f"{path}: ready, document {document.pk}, {document.chunks_total} chunks")
        return True

    # --- on a worker (the default) --------------------------------------------------------------

    def _ingest_on_worker(self, kb, paths: list[Path], timeout: float) -> list[bool]:
        """Store and queue every file first (workers may take several at once), then follow each."""
        stored = [(path, self._store(services.document_upload, kb, path)) for path in paths]
        deadline = time.monotonic() + timeout
        self._worker_missing_since = None
        results = []
        for path, document in stored:
            if document is None:
                results.append(False)
            elif document.status == Document.Status.READY:
                results.append(True)  # already ingested (said so when stored)
            else:
                results.append(self._follow(path, document, deadline, timeout))
        return results

    def _follow(self, path: Path, document: Document, deadline: float, timeout: float) -> bool:
        """Poll the document's status and chunk counts, with a bar, until it is ready or failed."""
        with self._bar(path, document.chunks_total or None) as bar:
            while document.status not in FINISHED:
                stopped = self._why_stop(document, deadline, timeout)
                if stopped:
                    bar.close()
                    self.stderr.write(f"{path}: {stopped}")
                    return False
                time.sleep(POLL_SECONDS)
                document = Document.objects.defer("content").filter(pk=document.pk).first()
                if document is None:
                    bar.close()
                    self.stderr.write(f"{path}: the document was deleted while it was being ingested")
                    return False
                if document.chunks_total and bar.total != document.chunks_total:
                    bar.total = document.chunks_total
                bar.set_postfix_str(document.status, refresh=False)
                bar.update(document.chunks_done - bar.n)
        return self._outcome(path, document)

    def _why_stop(self, document: Document, deadline: float, timeout: float) -> str | None:
        """Why to stop waiting (the time is up, or no worker is left on the queue), else None."""
        progress = f"{document.status}, {document.chunks_done} of {document.chunks_total or '?'} chunks"
        if time.monotonic() > deadline:
            return f"not ready after {timeout:g} s ({progress}); the worker carries on with it (--timeout to wait longer)"
        queue = settings.EMBEDDING_QUEUE
        if workers_alive.queue_has_worker(queue):
            self._worker_missing_since = None
            return None
        # A key gone means no beat for a whole TTL already; allow one more for a worker restarting.
        self._worker_missing_since = self._worker_missing_since or time.monotonic()
        if time.monotonic() - self._worker_missing_since < settings.WORKER_HEARTBEAT_TTL:
            return None
        return (
            f"no worker consumes the queue '{queue}' any more ({progress}); a worker started later "
            "ingests it, or run the command again with --in-process"
        )

    # --- here (--in-process) --------------------------------------------------------------------

    def _ingest_here(self, kb, path: Path, embed) -> bool:
        document = self._store(services.document_create, kb, path)
        if document is None:
            return False
        if document.status == Document.Status.READY:
            return True
        with self._bar(path) as bar:

            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)

            document = services.document_ingest(document_id=document.pk, embed=embed, progress=progress)
        return self._outcome(path, document)
