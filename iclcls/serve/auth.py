"""Who may call the service, and how much they may send.

``Guard`` is a plain ASGI middleware, so it runs before any body is read or parsed:
a protected path without ``Authorization: Bearer <key>`` gets 401, with a wrong key 403
(compared in constant time), and a body larger than ``max_body_bytes`` 413. The page,
its static files, the OpenAPI docs and ``/healthz`` hold no data and stay open, so a
browser can load the page and then send the key with its API calls.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from starlette.exceptions import HTTPException

PUBLIC_PATHS = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


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
    """ASGI middleware: bearer auth on protected paths, then a cap on the body size."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.api_key and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            auth = headers.get(b"authorization")
            status = check_bearer(auth.decode("latin-1") if auth else None, self.api_key)
            if status is not None:
                extra = [(b"www-authenticate", b'Bearer realm="iclcls"')] if status == 401 else []
                return await _send_error(send, status, _MESSAGES[status], extra)
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
