from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from chat import usage_views
from chat.api import api
from llmsite.metrics import metrics_view

urlpatterns = [
    # Before the admin's own URLs, whose catch-all would answer these; staff only, as the admin is.
    path("admin/usage/", admin.site.admin_view(usage_views.dashboard), name="usage-dashboard"),
    path("admin/usage/csv", admin.site.admin_view(usage_views.usage_csv), name="usage-csv"),
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),  # Prometheus (README, "Metrics"); not public
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("chat.urls")),
    path("", include("knowledge.urls")),
    path("", api.urls),  # /v1/... (OpenAI-compatible), /api/schema/, /api/docs/
]
