from django.urls import path

from knowledge import pages, views

app_name = "knowledge"

urlpatterns = [
    path("api/knowledge/<str:knowledge_base>/documents", views.documents, name="documents"),
    path("api/knowledge/<str:knowledge_base>/documents/<int:document_id>", views.document, name="document"),
    path("knowledge/", pages.knowledge_list, name="list"),
    path("knowledge/<str:name>/", pages.knowledge_page, name="page"),
    path("knowledge/<str:name>/documents.json", pages.documents_json, name="documents-json"),
    path("knowledge/<str:name>/upload", pages.upload, name="upload"),
    path("knowledge/<str:name>/documents/<int:document_id>/delete", pages.document_delete, name="document-delete"),
]
