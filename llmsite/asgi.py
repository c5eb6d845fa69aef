"""ASGI entry point: Django for HTTP, Channels for WebSockets (served by Daphne)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the apps loaded)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import re_path  # noqa: E402

from chat.routing import api_websocket_urlpatterns, browser_websocket_urlpatterns  # noqa: E402

# The API socket authenticates by token and must accept clients that send no Origin
# (websocket-client sends none); browser sockets use the session and check the Origin.
browser_sockets = AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(browser_websocket_urlpatterns)))

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([*api_websocket_urlpatterns, re_path(r"", browser_sockets)]),
    }
)
