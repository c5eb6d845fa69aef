#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
    from django.conf import settings
    from django.core.management import execute_from_command_line

    if settings.NOT_CONFIGURED and sys.argv[1:2] not in (["makemigrations"], ["check"], ["help"], ["serve"], []):
        print(f"note: {settings.NOT_CONFIGURED}", file=sys.stderr)
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
