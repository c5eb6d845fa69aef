import django.core.serializers.json
import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='AuditEntry',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('time', models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                ('username', models.CharField(blank=True, help_text='The user\'s name then (for a failed login: the name tried).', max_length=150)),
                ('address', models.GenericIPAddressField(blank=True, help_text="The client's address; empty for a command.", null=True)),
                ('action', models.CharField(choices=[('login', 'login'), ('login_failed', 'login failed'), ('logout', 'logout'), ('token_created', 'API token created'), ('token_revoked', 'API token revoked'), ('admin_added', 'added in the admin'), ('admin_changed', 'changed in the admin'), ('admin_deleted', 'deleted in the admin'), ('document_uploaded', 'document uploaded'), ('document_deleted', 'document deleted')], db_index=True, max_length=32)),
                ('object_type', models.CharField(blank=True, help_text='app.model of what the action touched.', max_length=100)),
                ('object_id', models.CharField(blank=True, max_length=64)),
                ('object_text', models.CharField(blank=True, max_length=200)),
                ('changes', models.JSONField(blank=True, default=dict, encoder=django.core.serializers.json.DjangoJSONEncoder, help_text='field: [old, new]; secrets show as "changed".')),
                ('note', models.CharField(blank=True, max_length=200)),
                ('user', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'verbose_name_plural': 'audit entries',
                'ordering': ['-time', '-pk'],
            },
        ),
    ]
