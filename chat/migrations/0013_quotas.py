# Per-user token budgets per UTC day and month (issue 22 part 4): chat.Quota, and an index for a user's rollup rows.

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('auth', '0012_alter_user_first_name_max_length'),
        ('chat', '0012_stored_response'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='Quota',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('tokens_per_day', models.PositiveBigIntegerField(blank=True, help_text="Tokens per UTC day; 0: no limit; blank: the group's or the site's.", null=True)),
                ('tokens_per_month', models.PositiveBigIntegerField(blank=True, help_text="Tokens per UTC calendar month; 0: no limit; blank: the group's or the site's.", null=True)),
            ],
        ),
        migrations.AddIndex(
            model_name='dailyusage',
            index=models.Index(fields=['user', 'day'], name='chat_dailyusage_user_day'),
        ),
        migrations.AddField(
            model_name='quota',
            name='group',
            field=models.OneToOneField(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='quota', to='auth.group'),
        ),
        migrations.AddField(
            model_name='quota',
            name='user',
            field=models.OneToOneField(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='quota', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddConstraint(
            model_name='quota',
            constraint=models.CheckConstraint(condition=models.Q(models.Q(('group__isnull', True), ('user__isnull', False)), models.Q(('group__isnull', False), ('user__isnull', True)), _connector='OR'), name='chat_quota_user_or_group', violation_error_message='A quota is for one user or for one group.'),
        ),
    ]
