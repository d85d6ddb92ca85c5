"""What wraps every request before the routes see it: the request id, the API key and the JSON access log.

A plain ASGI middleware rather than FastAPI's `BaseHTTPMiddleware`, because the latter buffers nothing but
does run streamed responses through an extra task; here `send` is wrapped directly, so a streamed completion is
logged when its last byte leaves, with its real duration and status.
"""
from __future__ import annotations

import hmac
import json
import re
import sys
import time
import uuid
from datetime import datetime, timezone

from .protocol import ApiError

REQUEST_ID = "x-request-id"
REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII without spaces, as proxies generate them
PROTECTED = "/v1/"  # the API; /health, /ready, /metrics and the docs stay open (probes and scrapers carry no key)


class RequestMiddleware:
    """Gives every HTTP request an id (the client's `X-Request-ID` if it is 1-128 printable characters, a new
    one otherwise refused with 400), echoes it in the response's `X-Request-ID`, checks `Authorization: Bearer
    KEY` on /v1/ when `api_key` is set (401 in OpenAI's shape otherwise), and with `access_log` writes one JSON
    line per request to `stream` once the response is complete."""

    def __init__(self, app, *, api_key: str | None = None, access_log: bool = False, stream=None):
        self.app, self.api_key, self.access_log = app, api_key, access_log
        self.stream = stream if stream is not None else sys.stderr

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get(REQUEST_ID)
        bad_id = given is not None and not REQUEST_ID_RE.match(given)
        rid = given if given is not None and not bad_id else "req-" + uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._log(scope, rid, status["code"], t0)

        error = None
        if bad_id:
            error = ApiError(400, "X-Request-ID must be 1 to 128 printable ASCII characters without spaces",
                             param="X-Request-ID", code="invalid_request_id")
        elif self.api_key is not None and scope["path"].startswith(PROTECTED):
            auth = headers.get("authorization", "")
            token = auth[7:] if auth[:7].lower() == "bearer " else None
            if token is None or not hmac.compare_digest(token.encode(), self.api_key.encode()):
                why = "no API key given" if token is None else "incorrect API key"
                error = ApiError(401, f"{why}: send 'Authorization: Bearer <key>' with the key this server was "
                                      "started with (--api-key or DLMTRT_API_KEY)", code="invalid_api_key",
                                 headers={"WWW-Authenticate": "Bearer"})
        if error is not None:
            return await _answer(error, send_with_id)
        await self.app(scope, receive, send_with_id)

    def _log(self, scope, rid: str, status: int, t0: float) -> None:
        if not self.access_log:
            return
        state = scope.get("state", {})
        client = scope.get("client")
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": rid,
                "method": scope.get("method"), "path": scope.get("path"), "status": status,
                "duration_ms": round(1e3 * (time.perf_counter() - t0), 3),
                "client": f"{client[0]}:{client[1]}" if client else None}
        line.update(state.get("usage", {}))
        print(json.dumps(line), file=self.stream, flush=True)


async def _answer(e: ApiError, send) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
