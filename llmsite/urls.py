from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from chat.api import api
from llmsite.metrics import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),  # Prometheus (README, "Metrics"); not public
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", include("chat.urls")),
    path("", include("knowledge.urls")),
    path("", api.urls),  # /v1/... (OpenAI-compatible), /api/schema/, /api/docs/
]
