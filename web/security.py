"""Secure by default: the Host allow-list, the Origin check and the per-launch token.

- Every request's ``Host`` must name an allowed host, which defeats DNS rebinding.
- Mutating requests (anything but GET, HEAD and OPTIONS) and websocket upgrades with an ``Origin`` must come
  from the page's own origin; a foreign origin and ``Origin: null`` (sandboxed iframes, ``file:`` pages) are
  refused. Scripts send no Origin, so local tools keep working.
- Every response carries ``X-Content-Type-Options: nosniff``, so a user's file is never sniffed into HTML or
  script.
- Listening beyond loopback, every request needs the per-launch token: in the ``X-Atelier-Token`` header,
  ``Authorization: Bearer``, the ``token`` query parameter or the cookie that a first request with the query
  parameter sets, so the browser can carry on without it.

Upstream ComfyUI checks Origin only against loopback Hosts, accepts ``Origin: null`` and has no token
(``comfyui-protocol.md`` §8.4); we do not inherit that.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import web

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_HEADER = "X-Atelier-Token"
TOKEN_COOKIE = "atelier_token"
TOKEN_QUERY = "token"
# On every response: browsers use the Content-Type we send and never guess a runnable type from the bytes.
NOSNIFF_HEADER = "X-Content-Type-Options"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) stays on this machine.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0"), is_loopback("192.168.1.4")
        (True, True, False, False)
    """
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The host part of a ``Host`` header or URL netloc, lower-cased, without port or IPv6 brackets.

    Example:
        >>> host_name("LocalHost:8188"), host_name("[::1]:8188"), host_name("127.0.0.1")
        ('localhost', '::1', '127.0.0.1')
    """
    return (urlsplit(f"//{host_header}").hostname or "").lower()


def security_middleware(allowed_hosts: Iterable[str], token: str | None):
    """The aiohttp middleware enforcing the rules above; ``token`` None means loopback-only, no token."""
    allowed = frozenset(h.lower() for h in allowed_hosts)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if host_name(host) not in allowed:
            return _refuse(f"Host {host!r} is not allowed; use one of {sorted(allowed)} "
                           "(start with --allow-host to add one)")
        from_query = False
        if token is not None:
            given, from_query = _given_token(request)
            if given is None or not hmac.compare_digest(given.encode(), token.encode()):
                return _refuse("this server needs its launch token (printed at start): "
                               f"the {TOKEN_HEADER} header, or ?{TOKEN_QUERY}=... once in the browser")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if request.method not in SAFE_METHODS or upgrade:
            origin = request.headers.get("Origin")
            if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower()):
                return _refuse(f"cross-origin request from {origin!r} refused")
        try:
            response = await handler(request)
        except web.HTTPException as error:  # raised errors are responses too
            error.headers[NOSNIFF_HEADER] = "nosniff"
            raise
        if not response.prepared:
            response.headers[NOSNIFF_HEADER] = "nosniff"
            if from_query:
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
        return response

    return guard


def _given_token(request: web.Request) -> tuple[str | None, bool]:
    """The token a request carries, and whether it came in the query string."""
    header = request.headers.get(TOKEN_HEADER)
    if header:
        return header, False
    authorization = request.headers.get("Authorization", "")
    if authorization.startswith("Bearer "):
        return authorization.removeprefix("Bearer "), False
    if TOKEN_QUERY in request.query:
        return request.query[TOKEN_QUERY], True
    return request.cookies.get(TOKEN_COOKIE), False


def _refuse(message: str) -> web.Response:
    logger.warning("refused: %s", message)
    return web.json_response({"error": {"type": "forbidden", "message": message}}, status=403)
