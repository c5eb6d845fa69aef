import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from chat.chat_formats import MODEL_TYPES
from chat.models import Deployment
from chat.selectors import default_engine


class Command(BaseCommand):
    help = "Create or update the default deployment and make sure an admin can log in (used by `make run`)."

    def add_arguments(self, parser):
        parser.add_argument("--model", default="", help="model source of the default deployment")
        parser.add_argument("--model-type", default="", choices=["", *MODEL_TYPES], help="chat format of the default deployment")
        parser.add_argument("--trust-remote-code", action="store_true", help="run the modelling code shipped with the model")
        parser.add_argument("--precision", default="", choices=["", "fp32", "bf16", "fp16"])
        parser.add_argument("--engine", default="", choices=["", *Deployment.Engine.values])
        parser.add_argument("--no-admin", action="store_true", help="do not create the admin user")

    def handle(self, *args, model, model_type, precision, engine, trust_remote_code, no_admin, **options):
        source = model or settings.DEFAULT_MODEL_SOURCE
        given = engine
        deployment, created = Deployment.objects.get_or_create(
            name="default", defaults={"model_source": source, "engine": engine or default_engine(source)}
        )
        model_changed = not created and deployment.model_source != source
        if not engine and model_changed:
            engine = default_engine(source)  # a new model gets the engine that fits it
        changed = []
        # A newly named model never inherits the earlier model's family or trust in its remote code.
        new_model = bool(model) and model != deployment.model_source
        model_type = model_type or ("auto" if new_model else "")
        trust = True if trust_remote_code else (False if new_model else None)
        fields = (
            ("model_source", source), ("model_type", model_type), ("precision", precision), ("engine", engine),
            ("trust_remote_code", trust),
        )
        for field, value in fields:
            if value is not None and value != "" and getattr(deployment, field) != value:
                setattr(deployment, field, value)
                changed.append(field)
        if changed:
            deployment.tokenizer_files = {}
            deployment.model_context_length = None
            deployment.status = Deployment.Status.UNKNOWN
            deployment.save()
        self.stdout.write(f"Deployment 'default': {deployment.model_source} ({'created' if created else 'kept'})")
        self.stdout.write(f"Deployment 'default' runs the {deployment.engine} engine: {engine_reason(given, created, model_changed)}")

        if no_admin:
            return
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        password_file = settings.DATA_DIR / "admin-password"
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", "", password)
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        self.stdout.write(f"Created the superuser 'admin'; its password is in {password_file}")


def engine_reason(given: str, created: bool, model_changed: bool) -> str:
    """Why the default deployment runs the engine it runs (`make run` prints it)."""
    if given:
        return "given now (ENGINE= / --engine); it stays stored with the deployment for later runs"
    if created or model_changed:
        return "the default for this model on this machine (llama.cpp for a GGUF file where it is installed)"
    return (
        "stored with the deployment (chosen in the admin, or by an earlier ENGINE=); "
        "`make run ENGINE=llamacpp|transformers|vllm` changes it"
    )
