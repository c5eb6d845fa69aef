# The usage dashboard (README, "Usage dashboard"): the daily rollup tables, filled from the rows
# already stored, and the index its exact percentiles read. Not atomic: the index is built
# CONCURRENTLY, so a large chat_requestlog stays writable meanwhile.

import datetime

import django.db.models.deletion
import django.db.models.functions.datetime
from django.conf import settings
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models, transaction

# chat/rollup.py's rebuild as it was when the tables were made (a migration keeps its own copy).
DAY = "(queued_at AT TIME ZONE 'UTC')::date"
TTFT_MS = "(date_part('epoch', first_token_at - queued_at) * 1000)"
BUCKET = f"greatest(0, floor(8 * ln(greatest(1::float8, {TTFT_MS})) / ln(2::float8)))::int"
ENDED = "('ok', 'error', 'cancelled')"
BACKFILL = [
    f"""INSERT INTO chat_dailyusage
        (day, deployment_id, user_id, token_id, status, requests, prompt_tokens, completion_tokens, cached_tokens)
    SELECT {DAY}, deployment_id, user_id, token_id, status, count(*),
           coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0)
    FROM chat_requestlog WHERE status IN {ENDED} GROUP BY 1, 2, 3, 4, 5""",
    f"""INSERT INTO chat_dailyttft (day, deployment_id, bucket, requests)
    SELECT {DAY}, deployment_id, {BUCKET}, count(*)
    FROM chat_requestlog WHERE status IN {ENDED} AND first_token_at IS NOT NULL GROUP BY 1, 2, 3""",
]


def backfill(apps, schema_editor):
    with transaction.atomic(using=schema_editor.connection.alias), schema_editor.connection.cursor() as cursor:
        cursor.execute("LOCK TABLE chat_dailyusage, chat_dailyttft IN EXCLUSIVE MODE")
        cursor.execute("DELETE FROM chat_dailyusage")
        cursor.execute("DELETE FROM chat_dailyttft")
        for statement in BACKFILL:
            cursor.execute(statement)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ('chat', '0010_requestlog_cached_tokens'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='DailyUsage',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('day', models.DateField()),
                ('status', models.CharField(choices=[('queued', 'queued'), ('running', 'running'), ('ok', 'ok'), ('error', 'error'), ('cancelled', 'cancelled')], max_length=16)),
                ('requests', models.PositiveIntegerField(default=0)),
                ('prompt_tokens', models.PositiveBigIntegerField(default=0)),
                ('completion_tokens', models.PositiveBigIntegerField(default=0)),
                ('cached_tokens', models.PositiveBigIntegerField(default=0)),
                ('deployment', models.ForeignKey(db_constraint=False, db_index=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to='chat.deployment')),
                ('token', models.ForeignKey(db_constraint=False, db_index=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to='chat.apitoken')),
                ('user', models.ForeignKey(db_constraint=False, db_index=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('day', 'deployment', 'user', 'token', 'status'), name='chat_dailyusage_key', nulls_distinct=False)],
            },
        ),
        migrations.CreateModel(
            name='DailyTtft',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('day', models.DateField()),
                ('bucket', models.PositiveSmallIntegerField()),
                ('requests', models.PositiveIntegerField(default=0)),
                ('deployment', models.ForeignKey(db_constraint=False, db_index=False, null=True, on_delete=django.db.models.deletion.DO_NOTHING, related_name='+', to='chat.deployment')),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('day', 'deployment', 'bucket'), name='chat_dailyttft_key', nulls_distinct=False)],
            },
        ),
        AddIndexConcurrently(
            model_name='requestlog',
            index=models.Index(django.db.models.functions.datetime.TruncDate('queued_at', tzinfo=datetime.timezone.utc), models.F('deployment'), condition=models.Q(('first_token_at__isnull', False)), include=('queued_at', 'first_token_at', 'user'), name='chat_requestlog_ttft_day'),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
