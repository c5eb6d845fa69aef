from django.urls import path

from chat import pages, resume, views

app_name = "chat"

urlpatterns = [
    path("", pages.home, name="home"),
    path("c/<uuid:conversation_id>/", pages.conversation, name="conversation"),
    path("c/<uuid:conversation_id>/rename", pages.conversation_rename, name="conversation-rename"),
    path("c/<uuid:conversation_id>/delete", pages.conversation_delete, name="conversation-delete"),
    path("conversations/", pages.conversation_list, name="conversations"),
    path("healthz", views.health, name="health"),
    path("api/health", views.deployments_health, name="deployments-health"),
    path("api/predict/<str:deployment>", views.predict, name="predict"),
    path("api/requests/<str:request_id>/events", resume.request_events, name="request-events"),
]
