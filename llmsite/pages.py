"""What every page of the site shares: login required, served with the content security policy."""

from functools import wraps

from django.contrib.auth.decorators import login_required

# Defence in depth beside the Markdown sanitiser: only the site's own scripts ever run.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def site_page(view):
    """A logged-in page of the site, served with the content security policy."""

    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        response = view(request, *args, **kwargs)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response

    return wrapper
