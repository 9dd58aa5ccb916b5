"""``X-Request-ID``: taken from the caller (if valid) or made, echoed, kept in a contextvar."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.observability.context import (
    REQUEST_ID_HEADER,
    http_scope_var,
    new_request_id,
    request_id_var,
    valid_request_id,
)

_HEADER = REQUEST_ID_HEADER.lower().encode("latin-1")


class RequestIdMiddleware:
    """Pure ASGI (no per-request task or body buffering, unlike BaseHTTPMiddleware).

    The id comes from the request's ``X-Request-ID`` when that is at most 128 characters of
    ``[A-Za-z0-9._-]``; otherwise (missing or invalid) a new one is made. It is returned in the
    response's ``X-Request-ID``, and set in ``request_id_var`` for the log lines of the request
    and for the messages it sends to the workers (``service.queue``).

    The contextvars are reset when the request ends normally; when an exception escapes, they
    stay set for the outer error handler's log line (each request runs in its own task, whose
    context ends with it).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == _HEADER:
                request_id = valid_request_id(value.decode("latin-1"))
                break
        if request_id is None:
            request_id = new_request_id()
        header = (_HEADER, request_id.encode("ascii"))

        async def send_with_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        request_token = request_id_var.set(request_id)
        scope_token = http_scope_var.set(scope)
        await self.app(scope, receive, send_with_request_id)
        http_scope_var.reset(scope_token)
        request_id_var.reset(request_token)
