import os
import sys
from pathlib import Path

from django.core.management.base import BaseCommand

from chat.chat_formats import MODEL_TYPES
from chat.models import Deployment


class Command(BaseCommand):
    help = (
        "Start the whole site exactly as `make run` does (database, Redis, worker, web), with this model "
        "as the default deployment; Ctrl-C stops everything."
    )
    requires_system_checks = []  # the launcher checks and migrates once its servers are up

    def add_arguments(self, parser):
        parser.add_argument("--model-path", required=True, help="hub id, local folder with config.json, or .gguf file")
        parser.add_argument("--model-type", default="", choices=["", *MODEL_TYPES], help="chat format and stop tokens (default: auto)")
        parser.add_argument("--precision", default="", choices=["", *Deployment.Precision.values])
        parser.add_argument("--port", type=int, default=None, help="default 8000 (or $PORT)")
        parser.add_argument("--host", default=None, help="default 127.0.0.1 (or $HOST)")
        parser.add_argument(
            "--trust-remote-code", action="store_true", help="run the modelling code shipped with the weights (ChatGLM, Baichuan)"
        )

    def handle(self, *args, model_path, model_type, precision, port, host, trust_remote_code, **options):
        # A local path is made absolute: the worker runs from the project folder, not from here.
        model = str(Path(model_path).expanduser().resolve()) if Path(model_path).expanduser().exists() else model_path
        argv = [sys.executable, "-m", "llmsite.launcher", "run", "--model", model]
        argv += ["--model-type", model_type] if model_type else []
        argv += ["--precision", precision] if precision else []
        argv += ["--port", str(port)] if port else []
        argv += ["--host", host] if host else []
        argv += ["--trust-remote-code"] if trust_remote_code else []
        sys.stdout.flush()
        # The launcher owns the process from here (its servers, children, signals), as under `make run`.
        os.chdir(Path(__file__).resolve().parents[3])
        os.execv(sys.executable, argv)
