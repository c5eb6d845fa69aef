import django.core.validators
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0007_deployment_llamacpp_engine'),
    ]

    operations = [
        migrations.AddField(
            model_name='deployment',
            name='max_concurrent_generations',
            field=models.PositiveIntegerField(default=64, help_text='Generations in flight at once over all workers; more get 429 at once instead of waiting in a queue.', validators=[django.core.validators.MinValueValidator(1)]),
        ),
    ]
