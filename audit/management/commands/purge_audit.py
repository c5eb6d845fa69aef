from django.conf import settings
from django.core.management.base import BaseCommand

from audit import services


class Command(BaseCommand):
    help = "Delete audit entries older than AUDIT_LOG_DAYS (or --days); the site also does it once an hour."

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, default=None, help=f"keep this many days (default AUDIT_LOG_DAYS, now {settings.AUDIT_LOG_DAYS})")

    def handle(self, *args, days, **options):
        kept = settings.AUDIT_LOG_DAYS if days is None else days
        if kept <= 0:
            self.stdout.write("Nothing deleted: entries are kept for ever (days is 0 or less).")
            return
        deleted = services.purge(days=kept)
        self.stdout.write(f"Deleted {deleted} audit entries older than {kept} days.")
