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
from llmsite.middleware import TOKEN_API_PREFIXES, TokenApiHandler  # noqa: E402

# The API socket authenticates by token and must accept clients that send no Origin
# (websocket-client sends none); browser sockets use the session and check the Origin.
browser_sockets = AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(browser_websocket_urlpatterns)))

token_api_app = TokenApiHandler()


async def http_app(scope, receive, send):
    """The token APIs go to their own handler (a short middleware list), everything else to the site's."""
    app = token_api_app if scope["path"].startswith(TOKEN_API_PREFIXES) else django_asgi_app
    return await app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": URLRouter([*api_websocket_urlpatterns, re_path(r"", browser_sockets)]),
    }
)
