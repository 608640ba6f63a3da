"""Who may call the service, and how much they may send.

``Guard`` is a plain ASGI middleware, so it runs before any body is read or parsed:
on a loopback-bound server a ``Host`` header that is not localhost, 127.0.0.1 or [::1]
gets 421 (a web page on another site that rebinds its DNS name to 127.0.0.1 cannot talk
to the service); a protected path without ``Authorization: Bearer <key>`` gets 401, with
a wrong key 403 (compared in constant time), and a body larger than ``max_body_bytes``
413. Two keys: the classify key (``--api-key-env``) for classification and metrics, the
admin key (``--admin-key-env``) for additions and the class list (and everything else);
without an admin key the classify key does both. The page, its static files, the OpenAPI
docs and ``/healthz`` hold no data and stay open, so a browser can load the page and then
send the key with its API calls.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from starlette.exceptions import HTTPException

PUBLIC_PATHS = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
ADMIN_PATHS = frozenset({"/v1/classes"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname could resolve anywhere


def bind_refusal(host: str, api_key: str | None) -> str | None:
    """Why the service must not listen on ``host``, or None when it may."""
    if api_key or is_loopback(host):
        return None
    return (
        f"refusing to listen on {host!r} without an API key: anyone who can reach it could read and "
        "change the classifier; pass --api-key-env NAME (the key in $NAME) or bind 127.0.0.1"
    )


def check_bearer(header: str | None, key: str) -> int | None:
    """None if ``header`` carries the key; else the status to answer (401 missing, 403 wrong)."""
    if not header:
        return 401
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return 401
    return None if hmac.compare_digest(token.strip().encode("utf-8"), key.encode("utf-8")) else 403


_MESSAGES = {
    401: "missing credentials: send 'Authorization: Bearer <key>'",
    403: "wrong API key",
}
_ADMIN_403 = "wrong key: adding and listing classes take the admin key (the server's --admin-key-env)"


def host_allowed(host_header: str | None, port: int) -> bool:
    """True when a loopback server's ``Host`` names this machine: localhost, 127.0.0.1 or [::1],
    with no port or this server's port (``port`` 0: any)."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    for name in LOOPBACK_NAMES:
        if host == name:
            return True
        if host.startswith(name + ":"):
            rest = host[len(name) + 1 :]
            return rest.isdigit() and (port == 0 or int(rest) == port)
    return False


async def _send_error(send: Any, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": {"status": status, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised while the app reads a chunked body past the limit; FastAPI passes HTTPExceptions on."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the {limit}-byte limit (--max-body-bytes)")


class Guard:
    """ASGI middleware: Host check (loopback servers), bearer auth on protected paths, then a cap
    on the body size."""

    def __init__(
        self,
        app: Any,
        *,
        api_key: str | None,
        max_body_bytes: int,
        admin_key: str | None = None,
        loopback_port: int | None = None,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.admin_key = admin_key or api_key
        self.max_body_bytes = max_body_bytes
        self.loopback_port = loopback_port

    def _auth_status(self, path: str, header: str | None) -> tuple[int, str] | None:
        """None when the request may go on; else (status, message)."""
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return None
        admin_only = path in ADMIN_PATHS or path not in ("/v1/classify", "/metrics")
        if admin_only:
            keys = [self.admin_key] if self.admin_key else []
        else:  # classification: the classify key, or the admin key (it may do everything)
            keys = [k for k in dict.fromkeys([self.api_key, self.admin_key]) if k] if self.api_key else []
        if not keys:
            return None
        statuses = [check_bearer(header, k) for k in keys]
        if None in statuses:
            return None
        status = min(s for s in statuses if s is not None)
        if status == 403 and admin_only and self.admin_key != self.api_key and check_bearer(header, self.api_key or "") is None:
            return 403, _ADMIN_403
        return status, _MESSAGES[status]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.loopback_port is not None:
            host = headers.get(b"host")
            host_text = host.decode("latin-1") if host else None
            if not host_allowed(host_text, self.loopback_port):
                return await _send_error(send, 421, f"Host {host_text!r} is not this server: a server bound to a loopback "
                                         "address answers only to localhost, 127.0.0.1 or [::1] (DNS rebinding protection)")
        auth = headers.get(b"authorization")
        refused = self._auth_status(path, auth.decode("latin-1") if auth else None)
        if refused is not None:
            status, message = refused
            extra = [(b"www-authenticate", b'Bearer realm="iclcls"')] if status == 401 else []
            return await _send_error(send, status, message, extra)
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                return await _send_error(send, 400, "bad Content-Length header")
            if too_big:
                return await _send_error(send, 413, f"request body of {int(declared)} bytes is over the {limit}-byte limit (--max-body-bytes)")
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:  # read outside FastAPI's handlers (e.g. by a middleware)
            if not started:
                await _send_error(send, 413, e.detail)
