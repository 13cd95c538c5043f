"""Who may drive the explorer: requests from this machine's own page, or from a program, never from another site.

The app has no authentication, so a web page on another site that the user opens must not be able to make
the server compute (``POST /api/trace`` runs the model) or read through it.  A browser labels what it sends:

- ``Host``: the name the browser connected to.  On a local server only a loopback address or ``localhost``
  is accepted (400 otherwise): a foreign name resolving to 127.0.0.1 is DNS rebinding.
- ``Origin``: the site of the page that made the request (sent on every POST and cross-origin fetch).  Only
  this server's own origin is accepted (403 otherwise): ``http://`` + the ``Host`` the request came to,
  whatever loopback address or name that is (``127.0.0.2:P``, ``localhost:P``, ``[::1]:P``, or a tunnel's
  port), so the page works on any loopback address it is bound to and is refused everywhere else.
- ``Sec-Fetch-Site`` (fetch metadata): ``cross-site`` / ``same-site`` (another port of localhost is the same
  site) is refused (403), except a top-level navigation to a page (a link to the explorer): the API,
  figures and scripts are only for the explorer's own page.
- ``Content-Type``: a request with a body must be ``application/json`` (415 otherwise).  ``text/plain``,
  forms and multipart are the types a foreign page can send without the browser asking the server first.

Programs (curl, scripts, the tests) send no ``Origin`` or fetch metadata and are served as before.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # no body; OPTIONS (a CORS preflight) gets no CORS grant either


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, IPv6 with or without brackets) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _site(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or ``http://`` + Host value; None when it does not parse."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username is not None:
        return None
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, parts.hostname, port if port is not None else (default or 0)


class RequestGuard:
    """ASGI middleware refusing DNS rebinding (400), foreign origins and cross-site fetches (403) and bodies
    that are not JSON (415), answered by ``error(request, status, message)``.

    ``allowed_hosts``: Host names accepted besides every loopback address and ``localhost``; ``("*",)``
    accepts any Host (a server bound to a non-loopback address: reachable by name from the network)."""

    def __init__(self, app: ASGIApp, error: Callable[[Request, int, str], Response],
                 allowed_hosts: Sequence[str] = ()) -> None:
        self.app, self.error = app, error
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            refusal = self.refusal(request)
            if refusal is not None:
                await self.error(request, *refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> tuple[int, str] | None:
        """(status, one-line reason) for a request to refuse, or None."""
        headers = request.headers
        host = headers.get("host", "")
        own = _site(f"http://{host}")
        if own is None:
            return 400, f"Host header {host[:80]!r} is not a host name"
        if not (self.any_host or is_loopback(own[1]) or own[1].lower() in self.hosts):
            return 400, (f"Host {host[:80]!r} is not this machine: a local server answers only its loopback "
                         "addresses and localhost (DNS-rebinding guard)")
        origin = headers.get("origin")
        if origin is not None and _site(origin) != own:
            return 403, (f"cross-origin request from {origin[:80]!r} refused: only pages of this server "
                         f"(http://{host[:80]}) may use it")
        fetch_site = headers.get("sec-fetch-site", "")
        navigation = (request.method in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"
                      and not request.url.path.startswith("/api/"))
        if fetch_site in ("cross-site", "same-site") and not navigation:
            return 403, f"{fetch_site} request refused: only pages of this server may use it"
        if request.method not in SAFE_METHODS:
            media = headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return 415, (f"Content-Type {media[:60] or 'missing'!r}: send the body as application/json")
        return None
