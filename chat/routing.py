from django.urls import path

from chat import consumers

# Token-authenticated API sockets: no Origin check (scripts send none).
api_websocket_urlpatterns = [
    path("api/predict/<str:deployment>", consumers.PredictConsumer.as_asgi()),
]

# Session-authenticated browser sockets (the chat pages) come with the chat-site issue.
browser_websocket_urlpatterns = []
