"""The arrows of the house (DESIGN.md), read from every module's imports with `ast`, and the
size limits: no module outside tests, bench and migrations over 400 lines, no function over 60.
Imports inside functions count too: a lazy import is still an arrow."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ("llmsite", "chat", "knowledge", "workers", "audit")
WEB_TIER = ("llmsite", "chat", "knowledge", "audit")
HEAVY = {"torch", "llama_cpp", "vllm", "sentence_transformers"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules():
    for app in APPS:
        for path in sorted((ROOT / app).rglob("*.py")):
            if "migrations" not in path.parts:
                yield app, path


def imported(tree: ast.AST):
    """(line, module, names) for every absolute import in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [alias.name for alias in node.names]


def broken_arrows(app: str, source: str) -> list[str]:
    """What `source`, a module of `app`, imports against the rules."""
    broken = []
    for line, module, names in imported(ast.parse(source)):
        root = module.split(".")[0]
        if app in ("chat", "knowledge") and root == "workers":
            broken.append(f"{line}: {app}/ imports {module} (tasks go by name through llmsite.producer)")
        if app == "knowledge" and root == "chat":
            broken.append(f"{line}: knowledge/ imports {module} (what both need lives in llmsite/)")
        if app == "audit" and root in ("chat", "knowledge", "workers"):
            broken.append(f"{line}: audit/ imports {module} (the apps call audit, not the other way)")
        if app in WEB_TIER and root in HEAVY:
            broken.append(f"{line}: the web tier imports {module}")
        if app in WEB_TIER and root == "transformers":
            models = [n for n in names if "Tokenizer" not in n] if module == "transformers" else [module]
            if models or not names:
                broken.append(f"{line}: the web tier imports transformers' {', '.join(models) or module}")
    return broken


def test_the_arrows_hold_in_every_module():
    broken = [f"{path.relative_to(ROOT)}:{b}" for app, path in modules() for b in broken_arrows(app, path.read_text())]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize(
    "app, source",
    [
        ("chat", "def f():\n    from workers.celery import app\n"),
        ("knowledge", "import workers.embeddings\n"),
        ("knowledge", "from chat.errors import ApiError\n"),
        ("llmsite", "import torch\n"),
        ("chat", "from transformers import AutoModelForCausalLM\n"),
        ("knowledge", "from sentence_transformers import SentenceTransformer\n"),
        ("chat", "import vllm\n"),
        ("audit", "from chat.models import ApiToken\n"),
        ("audit", "def f():\n    from knowledge import services\n"),
    ],
)
def test_the_check_finds_a_broken_arrow(app, source):
    assert broken_arrows(app, source)


def test_the_check_lets_the_allowed_arrows_pass():
    assert not broken_arrows("chat", "from transformers import PreTrainedTokenizerFast\nfrom knowledge import selectors\n")
    assert not broken_arrows("workers", "import torch\nfrom chat import events\nfrom knowledge import services\n")
    assert not broken_arrows("knowledge", "from audit import services\n")
    assert not broken_arrows("chat", "from audit.admin_mixins import AuditedAdmin\n")


def test_no_module_is_over_the_size_limits():
    over = []
    for _, path in modules():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            over.append(f"{path.relative_to(ROOT)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    over.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not over, "\n".join(over)


def test_the_contract_imports_without_django_or_celery():
    """bench/gpu_check.py imports it on a machine with only torch and transformers."""
    code = (
        "import sys; import llmsite.contract as c; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('django', 'celery', 'pydantic', 'redis')]; "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
