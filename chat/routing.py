from django.urls import path

from chat import chat_consumer, consumers

# Token-authenticated API sockets: no Origin check (scripts send none).
api_websocket_urlpatterns = [
    path("api/predict/<str:deployment>", consumers.PredictConsumer.as_asgi()),
]

# Session-authenticated browser sockets (the chat pages), behind the Origin check.
browser_websocket_urlpatterns = [
    path("ws/chat/", chat_consumer.ChatConsumer.as_asgi()),
]
