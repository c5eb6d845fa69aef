from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from chat.errors import ApiError
from knowledge import services
from knowledge.models import Document


class Command(BaseCommand):
    help = "Ingest files into a knowledge base (created if missing), here and now, with a progress bar."

    def add_arguments(self, parser):
        parser.add_argument("knowledge_base")
        parser.add_argument("files", nargs="+")
        parser.add_argument("--owner", default="", help="owner of a new knowledge base (default: the first superuser)")

    def handle(self, *args, knowledge_base, files, owner, **options):
        try:
            kb, created = services.knowledge_base_get_or_create(name=knowledge_base, owner=self._owner(owner))
        except ValidationError as exc:
            raise CommandError(f"Bad knowledge base name '{knowledge_base}': {' '.join(exc.messages)}") from None
        self.stdout.write(f"Knowledge base '{kb.name}' ({'created' if created else 'exists'}, owner {kb.owner})")
        failed = [path for path in files if not self._ingest(kb, Path(path))]
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

    def _ingest(self, kb, path: Path) -> bool:
        try:
            data = path.read_bytes()
            document, created = services.document_create(knowledge_base=kb, name=path.name, data=data)
        except OSError as exc:
            self.stderr.write(f"{path}: cannot read the file: {exc.strerror or exc}")
            return False
        except (ApiError, ValidationError) as exc:
            self.stderr.write(f"{path}: {getattr(exc, 'message', exc)}")
            return False
        if document.status == Document.Status.READY:
            self.stdout.write(f"{path}: already ingested as document {document.pk} ({document.chunks_total} chunks)")
            return True
        with tqdm(total=None, desc=path.name, unit="chunk", file=self.stdout._out) as bar:

            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)

            document = services.document_ingest(document_id=document.pk, progress=progress)
        if document.status != Document.Status.READY:
            self.stderr.write(f"{path}: failed: {document.error}")
            return False
        self.stdout.write(f"{path}: ready, document {document.pk}, {document.chunks_total} chunks")
        return True
