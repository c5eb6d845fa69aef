import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0013_quotas"),
    ]

    operations = [
        migrations.AddField(
            model_name="deployment",
            name="max_waiting_per_user",
            field=models.PositiveIntegerField(
                default=16,
                help_text="Requests one user may have waiting for their turn (beyond those running); more get 429 at once.",
                validators=[django.core.validators.MinValueValidator(1)],
            ),
        ),
    ]
