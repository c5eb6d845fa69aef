import datetime

from django.core.management.base import BaseCommand, CommandError

from chat import rollup


class Command(BaseCommand):
    help = (
        "Count the ended requests again into the usage dashboard's daily rollup (chat/rollup.py), "
        "from a UTC day on or from the start. Requests ending meanwhile wait for it, then count."
    )

    def add_arguments(self, parser):
        parser.add_argument("--since", help="first UTC day to rebuild, YYYY-MM-DD (default: all days)")

    def handle(self, *args, since, **options):
        try:
            day = datetime.date.fromisoformat(since) if since else None
        except ValueError as exc:
            raise CommandError(f"--since: {exc}") from exc
        counted = rollup.rebuild(since=day)
        self.stdout.write(f"Counted {counted} ended requests{f' from {day}' if day else ''} into the usage rollup.")
