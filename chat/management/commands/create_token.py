from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from chat.models import Deployment
from chat.tokens import token_create


class Command(BaseCommand):
    help = "Create an API token for a user and print it (as the last word of the output)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="", help="a label for the token")
        parser.add_argument(
            "--deployment", action="append", default=[], help="limit the token to this deployment (repeatable)"
        )

    def handle(self, *args, username, name, deployment, **options):
        try:
            user = get_user_model().objects.get(username=username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"There is no user named '{username}'.") from None
        deployments = []
        for dep_name in deployment:
            dep = Deployment.objects.filter(name=dep_name).first()
            if dep is None:
                raise CommandError(f"There is no deployment named '{dep_name}'.")
            deployments.append(dep)
        _, raw = token_create(user=user, name=name, deployments=deployments, note="command")  # audited: the user, no address
        scope = ", ".join(deployment) if deployment else "every deployment"
        self.stdout.write(f"Created a token for {username} ({scope}). It is shown only once:\n{raw}")
