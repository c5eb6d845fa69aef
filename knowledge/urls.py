from django.urls import path

from knowledge import views

app_name = "knowledge"

urlpatterns = [
    path("api/knowledge/<str:knowledge_base>/documents", views.documents, name="documents"),
    path("api/knowledge/<str:knowledge_base>/documents/<int:document_id>", views.document, name="document"),
]
