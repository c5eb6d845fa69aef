"""Knowledge bases, their documents and the chunks retrieval searches (pgvector + full text)."""

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVector, SearchVectorField
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from pgvector.django import HnswIndex, VectorField

# The text-search configuration of chunks and questions: stemming and stop words of English.
TEXT_SEARCH_CONFIG = "english"


class KnowledgeBase(models.Model):
    """A named set of documents; answers with `langchain: true` are drawn from one of these."""

    name = models.CharField(
        max_length=64,
        unique=True,
        validators=[RegexValidator(r"^[A-Za-z0-9_.-]+$", "Letters, digits, '_', '.' and '-' only.")],
    )
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="knowledge_bases")
    shared_with = models.ManyToManyField(
        settings.AUTH_USER_MODEL, blank=True, related_name="shared_knowledge_bases", help_text="Users who may also use it."
    )
    description = models.TextField(blank=True)
    embedding_model = models.CharField(max_length=200, default="all-MiniLM-L6-v2", editable=False)
    chunk_size = models.PositiveIntegerField(default=800, validators=[MinValueValidator(100)], help_text="Characters per chunk.")
    chunk_overlap = models.PositiveIntegerField(default=100, help_text="Characters shared by neighbouring chunks.")
    retrieval_k = models.PositiveIntegerField(default=4, validators=[MinValueValidator(1)], help_text="Chunks given to the model.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Document(models.Model):
    """One uploaded file; its bytes are kept so ingestion can run (or run again) on any worker."""

    class Status(models.TextChoices):
        QUEUED = "queued", "queued"
        PARSING = "parsing", "parsing"
        EMBEDDING = "embedding", "embedding"
        READY = "ready", "ready"
        FAILED = "failed", "failed"

    knowledge_base = models.ForeignKey(KnowledgeBase, on_delete=models.CASCADE, related_name="documents")
    name = models.CharField(max_length=255, help_text="The uploaded file's name, with its extension.")
    file_type = models.CharField(max_length=8)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    content = models.BinaryField(editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    error = models.TextField(blank=True)
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_done = models.PositiveIntegerField(default=0)
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["knowledge_base", "name"]
        constraints = [
            # The same bytes in one knowledge base are one document: a re-upload never duplicates chunks.
            models.UniqueConstraint(fields=["knowledge_base", "sha256"], name="knowledge_document_unique_content"),
        ]

    def __str__(self):
        return self.name


class Chunk(models.Model):
    """A piece of a document with its embedding (HNSW, cosine) and its full-text vector (GIN)."""

    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    knowledge_base = models.ForeignKey(KnowledgeBase, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    text = models.TextField()
    heading = models.CharField(max_length=500, blank=True, help_text="The section heading, where known.")
    page = models.PositiveIntegerField(null=True, blank=True, help_text="The PDF page, where known.")
    embedding = VectorField(dimensions=settings.EMBEDDING_DIMENSIONS)
    search_vector = models.GeneratedField(
        expression=SearchVector("heading", "text", config=TEXT_SEARCH_CONFIG),
        output_field=SearchVectorField(),
        db_persist=True,
    )

    class Meta:
        ordering = ["document", "index"]
        constraints = [models.UniqueConstraint(fields=["document", "index"], name="knowledge_chunk_unique_index")]
        indexes = [
            HnswIndex(
                name="knowledge_chunk_embedding_hnsw",
                fields=["embedding"],
                m=16,
                ef_construction=64,
                opclasses=["vector_cosine_ops"],
            ),
            GinIndex(fields=["search_vector"], name="knowledge_chunk_search_gin"),
        ]

    def __str__(self):
        return f"{self.document} #{self.index}"
