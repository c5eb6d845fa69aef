"""Middleware without thread hops, the token APIs' own short middleware list, and the site's
refusal of NUL characters in paths and query strings (NulRefusalMiddleware).

Django runs a classic middleware's process_request/process_response hooks in a thread when the
request is async (the predict and /v1 views are): one thread hop per hook, each on the way to a
first token. The hooks of SecurityMiddleware and CommonMiddleware only read the request and set
headers, so for the token APIs they run inline on the event loop. (The site's own list keeps
Django's classes, which `manage.py check --deploy` looks for by name.)
"""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpResponseBadRequest, JsonResponse
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware

from llmsite.errors import InvalidRequest


class _Inline:
    """For a MiddlewareMixin whose hooks never block: call them on the event loop."""

    async def __acall__(self, request):
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class InlineSecurityMiddleware(_Inline, SecurityMiddleware):
    pass


class InlineCommonMiddleware(_Inline, CommonMiddleware):
    pass


# The prefixes of the APIs that authenticate by token: no session, login, CSRF or messages
# (/metrics: by METRICS_TOKEN or the caller's network).
TOKEN_API_PREFIXES = ("/api/predict/", "/v1/", "/metrics")


class TokenApiHandler(ASGIHandler):
    """Django's ASGI handler with settings.TOKEN_API_MIDDLEWARE instead of the site's list: the
    browser's middleware (sessions, CSRF, messages, login throttling) means nothing to a request
    that carries an API token, and each of its hooks would cost a thread hop."""

    def load_middleware(self, is_async=False):
        site = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.TOKEN_API_MIDDLEWARE  # read once, here, at start-up
        try:
            super().load_middleware(is_async=is_async)
        finally:
            settings.MIDDLEWARE = site


class NulRefusalMiddleware:
    """A path or query string that holds a NUL character (%00) is refused with 400 naming it:
    PostgreSQL text refuses NUL, so an admin list filtered on such a value, or the admin's page of
    a stored response whose id held one, failed with 500. No path or query parameter of the site
    means anything with one. Sync and async alike; it only reads."""

    sync_capable = async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self._acall(request)
        return self._refusal(request) or self.get_response(request)

    async def _acall(self, request):
        return self._refusal(request) or await self.get_response(request)

    @staticmethod
    def _refusal(request):
        named = ["path"] if "\x00" in request.path else []
        named += [name for name, values in request.GET.lists() if "\x00" in name or any("\x00" in v for v in values)]
        if not named:
            return None
        name = named[0].replace("\x00", "\ufffd")
        error = InvalidRequest(f"{name}: must not contain NUL characters.", param=name)
        if request.path.startswith("/api/"):
            return JsonResponse(error.body(), status=error.status)
        return HttpResponseBadRequest(error.message, content_type="text/plain; charset=utf-8")
