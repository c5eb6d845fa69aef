import datetime
import hashlib
import secrets
import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.db.models.functions import TruncDate
from django.utils import timezone

from chat.chat_formats import MODEL_TYPE_CHOICES


class Deployment(models.Model):
    """A model served under a name: `/api/predict/<name>`, on the Celery queue `queue`."""

    class Engine(models.TextChoices):
        TRANSFORMERS = "transformers", "transformers (CPU or GPU)"
        VLLM = "vllm", "vLLM (GPU)"
        LLAMACPP = "llamacpp", "llama.cpp (GGUF files, CPU)"

    class Precision(models.TextChoices):
        FP32 = "fp32", "fp32"
        BF16 = "bf16", "bf16"
        FP16 = "fp16", "fp16"

    class Status(models.TextChoices):
        UNKNOWN = "unknown", "no worker has loaded it yet"
        LOADING = "loading", "loading"
        READY = "ready", "ready"
        FAILED = "failed", "failed"

    name = models.CharField(
        max_length=64,
        unique=True,
        validators=[RegexValidator(r"^[A-Za-z0-9_.-]+$", "Letters, digits, '_', '.' and '-' only.")],
    )
    model_source = models.CharField(
        max_length=500,
        help_text="Hub id (Qwen/Qwen2.5-0.5B-Instruct), local folder, .gguf file, or "
        "pkg:<python package>/<file.gguf> for a model file shipped in a package.",
    )
    model_type = models.CharField(
        max_length=32,
        default="auto",
        choices=MODEL_TYPE_CHOICES,
        help_text="Model family: its chat format and stop tokens; 'auto' uses the tokenizer's own chat template.",
    )
    trust_remote_code = models.BooleanField(
        default=False,
        help_text="Run the Python modelling code that ships with the weights (ChatGLM, Baichuan). "
        "Only for models you trust: that code runs on the worker.",
    )
    chat_template = models.TextField(blank=True, help_text="Jinja chat template that overrides the model's own.")
    engine = models.CharField(max_length=32, choices=Engine.choices, default=Engine.TRANSFORMERS)
    precision = models.CharField(max_length=8, choices=Precision.choices, default=Precision.FP32)
    context_length = models.PositiveIntegerField(
        null=True, blank=True, help_text="Tokens of prompt plus answer; blank takes the model's own."
    )
    queue = models.CharField(max_length=64, blank=True, help_text="Celery queue; blank means the deployment's name.")
    enabled = models.BooleanField(default=True)
    max_batch_size = models.PositiveIntegerField(
        default=32, validators=[MinValueValidator(1)], help_text="Requests one worker generates for at once (continuous batching)."
    )
    max_concurrent_generations = models.PositiveIntegerField(
        default=64,
        validators=[MinValueValidator(1)],
        help_text="Generations in flight at once over all workers; more get 429 at once instead of waiting in a queue.",
    )
    max_waiting_per_user = models.PositiveIntegerField(
        default=16,
        validators=[MinValueValidator(1)],
        help_text="Requests one user may have waiting for their turn (beyond those running); more get 429 at once.",
    )
    default_knowledge_base = models.ForeignKey(
        "knowledge.KnowledgeBase",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="Used by requests with langchain: true that name no knowledge_base.",
    )

    default_max_new_tokens = models.PositiveIntegerField(default=2048, validators=[MinValueValidator(1)])
    default_temperature = models.FloatField(default=0.95, validators=[MinValueValidator(0), MaxValueValidator(2)])
    default_top_k = models.PositiveIntegerField(default=30)
    default_top_p = models.FloatField(default=0.8, validators=[MinValueValidator(0.0001), MaxValueValidator(1)])
    default_do_sample = models.BooleanField(default=True)

    # Written by the worker that loads the model.
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.UNKNOWN, editable=False)
    status_detail = models.TextField(blank=True, editable=False)
    status_updated_at = models.DateTimeField(null=True, blank=True, editable=False)
    model_context_length = models.PositiveIntegerField(null=True, blank=True, editable=False)
    # The tokenizer's files (name -> text) so the web tier counts prompt tokens without the model.
    tokenizer_files = models.JSONField(default=dict, blank=True, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def save(self, *args, **kwargs):
        if not self.queue:
            self.queue = self.name
        super().save(*args, **kwargs)

    @property
    def effective_context_length(self) -> int | None:
        return self.context_length or self.model_context_length


def hash_token(raw: str) -> str:
    # Tokens are 256-bit random strings, so a plain digest is enough (no password stretching).
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


class ApiToken(models.Model):
    """A user's API token; only its digest is stored. No deployments listed means all of them."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, editable=False, help_text="The token's first characters, to tell them apart.")
    digest = models.CharField(max_length=64, unique=True, editable=False)
    deployments = models.ManyToManyField(Deployment, blank=True, help_text="Empty: every deployment.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Most requests in any 60 seconds; blank: no limit."
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Most prompt plus answer tokens in any 60 seconds; blank: no limit."
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.prefix}… ({self.user})"

    @classmethod
    def new_raw_token(cls) -> str:
        return "llm-" + secrets.token_urlsafe(32)

    def set_raw(self, raw: str) -> None:
        self.prefix = raw[:10]
        self.digest = hash_token(raw)

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def revoke(self) -> None:
        self.revoked_at = timezone.now()
        self.save(update_fields=["revoked_at"])


class RequestLog(models.Model):
    """The durable record of one generation request, whatever protocol it came by."""

    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        OK = "ok", "ok"
        ERROR = "error", "error"
        CANCELLED = "cancelled", "cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    token = models.ForeignKey(ApiToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="requests")
    deployment = models.ForeignKey(Deployment, null=True, on_delete=models.SET_NULL, related_name="requests")
    protocol = models.CharField(max_length=16)
    prompt = models.TextField(blank=True)
    system_prompt = models.TextField(blank=True)
    history = models.JSONField(default=list, blank=True)
    params = models.JSONField(default=dict, blank=True)
    response = models.TextField(blank=True)
    finish_reason = models.CharField(max_length=16, blank=True)
    error = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    cached_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="prompt tokens whose KV rows the engine had cached (not computed again)"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    queued_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    worker_run = models.CharField(
        max_length=32, blank=True, help_text="the run id of the worker process that took it (its heartbeat names it: workers/orphans.py)"
    )

    class Meta:
        ordering = ["-queued_at"]
        indexes = [
            models.Index(fields=["deployment", "-queued_at"]),
            models.Index(fields=["user", "-queued_at"]),
            # The usage dashboard's exact time-to-first-token percentiles (chat/usage.py): the rows of
            # a range of UTC days, in (day, deployment) order, read from the index alone.
            models.Index(
                TruncDate("queued_at", tzinfo=datetime.UTC),
                "deployment",
                name="chat_requestlog_ttft_day",
                include=["queued_at", "first_token_at", "user"],
                condition=Q(first_token_at__isnull=False),
            ),
        ]

    def __str__(self):
        return str(self.id)


class DailyUsage(models.Model):
    """The rollup the usage dashboard reads: ended requests counted per UTC day (of `queued_at`),
    deployment, user, API token and outcome. chat/lifecycle.py adds each request as it ends;
    `manage.py rebuild_usage` rebuilds it from the rows (chat/rollup.py).

    Its keys are plain ids, with no foreign-key constraints and no indexes of their own (the key's
    unique index, day first, serves every read): a deleted user or deployment keeps its history
    here (the requests' rows lose the link; a rebuild then counts them under none).
    """

    day = models.DateField()
    deployment = models.ForeignKey(Deployment, null=True, on_delete=models.DO_NOTHING, db_constraint=False, db_index=False, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.DO_NOTHING, db_constraint=False, db_index=False, related_name="+")
    token = models.ForeignKey(ApiToken, null=True, on_delete=models.DO_NOTHING, db_constraint=False, db_index=False, related_name="+")
    status = models.CharField(max_length=16, choices=RequestLog.Status.choices)
    requests = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cached_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["day", "deployment", "user", "token", "status"], name="chat_dailyusage_key", nulls_distinct=False
            )
        ]
        # A user's token budget (chat/quotas.py): their rows of this month, without the other users'.
        indexes = [models.Index(fields=["user", "day"], name="chat_dailyusage_user_day")]


class Quota(models.Model):
    """A token budget (prompt plus answer tokens) per UTC calendar day and month, for one user or
    for the members of one group (chat/quotas.py). A blank limit falls through (user, then groups,
    then the QUOTA_TOKENS_PER_DAY / QUOTA_TOKENS_PER_MONTH settings); 0 means no limit."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="quota"
    )
    group = models.OneToOneField("auth.Group", null=True, blank=True, on_delete=models.CASCADE, related_name="quota")
    tokens_per_day = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Tokens per UTC day; 0: no limit; blank: the group's or the site's."
    )
    tokens_per_month = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Tokens per UTC calendar month; 0: no limit; blank: the group's or the site's."
    )

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(user__isnull=False, group__isnull=True) | Q(user__isnull=True, group__isnull=False),
                name="chat_quota_user_or_group",
                violation_error_message="A quota is for one user or for one group.",
            )
        ]

    def __str__(self):
        return f"quota of {self.user or self.group}"


class DailyTtft(models.Model):
    """Per-day histograms of the time to the first token, per deployment: the dashboard's
    percentiles for ranges over 31 days. Bucket b holds times in [2^(b/8), 2^((b+1)/8)) ms
    (bucket 0 everything under 2^(1/8) ms), so a percentile read from it is within 4.5%."""

    day = models.DateField()
    deployment = models.ForeignKey(Deployment, null=True, on_delete=models.DO_NOTHING, db_constraint=False, db_index=False, related_name="+")
    bucket = models.PositiveSmallIntegerField()
    requests = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["day", "deployment", "bucket"], name="chat_dailyttft_key", nulls_distinct=False)
        ]


class Conversation(models.Model):
    """A user's chat in the browser; keeps the settings it was last sent with."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200)
    deployment = models.ForeignKey(Deployment, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    knowledge_base = models.ForeignKey(
        "knowledge.KnowledgeBase", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="The knowledge base the last question was answered from (langchain retrieval).",
    )
    system_prompt = models.TextField(blank=True)
    # Sampling settings as sent from the chat page (temperature, top_p, top_k, max_new_tokens).
    params = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["user", "-updated_at"])]

    def __str__(self):
        return self.title


class Message(models.Model):
    """One turn of a conversation; an answer is stored as it ends (ok, cancelled or error)."""

    class Role(models.TextChoices):
        USER = "user", "user"
        ASSISTANT = "assistant", "assistant"

    class Status(models.TextChoices):
        STREAMING = "streaming", "streaming"
        OK = "ok", "ok"
        CANCELLED = "cancelled", "cancelled"
        ERROR = "error", "error"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OK)
    error = models.TextField(blank=True)
    request = models.ForeignKey(RequestLog, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # An answer's knowledge-base sources: [{"document", "chunk", "score", "text"}], shown under it.
    sources = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["conversation", "id"]

    def __str__(self):
        return f"{self.role}: {self.content[:40]}"


class StoredResponse(models.Model):
    """A Responses API answer (`/v1/responses`), kept per user so `previous_response_id` can
    continue it from any web process, after restarts too; `store: false` keeps none."""

    id = models.CharField(primary_key=True, max_length=64)  # "resp_<hex>"
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    model = models.CharField(max_length=64)  # the deployment's name as the request gave it
    status = models.CharField(max_length=16)  # "completed", "incomplete" or "failed"
    instructions = models.TextField(blank=True)  # this request's own (not carried to the next one)
    history = models.JSONField(default=list, blank=True)  # chat messages of the chain before this input
    input = models.JSONField(default=list, blank=True)  # this request's input as chat messages
    output = models.JSONField(default=list, blank=True)  # the Responses output items
    usage = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    params = models.JSONField(default=dict, blank=True)  # temperature, top_p, tools, text... as asked
    previous_response_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["user", "-created_at"])]

    def __str__(self):
        return self.id
