"""Answers to the HTTP requests the front (``http_front.py``) reads: routing, CORS, the static
client, the routes that predate the front (``http_routes.Routes``), and section 8's user API.

Every API handler authenticates the bearer token (the handshake's 401 rules), takes a token
from the user's rate-limit bucket (the one their sockets use), and calls the service layer;
nothing here touches the store or the hub's connections directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import protocol as p
from auth import AuthError, Identity, Verifier
from http_front import (
    Answer,
    DuplicateHeader,
    FrontConnection,
    HttpRequest,
    from_websockets,
    json_answer,
    to_websockets,
)
from http_routes import HERE, STATIC, WS_PATH, Routes
from hub import Hub
from service import INBOX_DEFAULT, INBOX_MAX, Service, store_error_reply
from store import StoreError

ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key"
EXPOSE_HEADERS = "Retry-After, ETag"
_ID = r"([1-9][0-9]{0,18})"

Handler = Callable[["Call"], Awaitable[Answer]]


@dataclass
class Call:
    """One authenticated API request."""

    request: HttpRequest
    query: dict[str, list[str]]
    params: tuple[int, ...]
    identity: Identity
    name: str  # the caller's display name


def _retry_after(milliseconds: int | None) -> list[tuple[str, str]]:
    """A Retry-After header (whole seconds, at least 1) for a retry hint, if there is one."""
    if milliseconds is None:
        return []
    return [("Retry-After", str(max(1, math.ceil(milliseconds / 1000))))]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


def is_websocket(method: str, target: str, headers: list[tuple[str, str]]) -> bool:
    """The requests websockets answers: a GET on the WebSocket path, or any upgrade."""
    if method != "GET":
        return False
    if urlsplit(target).path == WS_PATH:
        return True
    return any(k == "upgrade" and v.strip().lower() == "websocket" for k, v in headers)


class HttpApi:
    def __init__(
        self,
        routes: Routes,
        service: Service,
        hub: Hub,
        verifier: Callable[[], Verifier],
        profile: Callable[[Identity], Awaitable[tuple[str, str | None]]],
        cors_origins: Callable[[], tuple[str, ...]],
        limits: p.Limits,
    ) -> None:
        self.routes = routes
        self.service = service
        self.hub = hub
        self.verifier = verifier
        self.profile = profile
        self.cors_origins = cors_origins
        self.limits = limits
        self.static: dict[str, tuple[bytes, str, str]] = {}
        # (pattern, methods, handler); HEAD is allowed wherever GET is.
        self.api: list[tuple[re.Pattern[str], tuple[str, ...], Handler]] = [
            (re.compile(r"/api/messages/conversations"), ("GET",), self.list_conversations),
            (re.compile(rf"/api/messages/{_ID}/messages"), ("GET",), self.messages),
            (re.compile(r"/api/messages/send"), ("POST",), self.send),
            (re.compile(rf"/api/messages/{_ID}/read"), ("POST",), self.read),
            (re.compile(rf"/api/creator/conversations/{_ID}/read"), ("POST",), self.read),
        ]

    # -- CORS and Origin -------------------------------------------------------------------

    def origin_allowed(self, origin: str) -> bool:
        allowed = self.cors_origins()
        return "*" in allowed or origin in allowed

    def cors(self, request: HttpRequest) -> list[tuple[str, str]]:
        try:
            origin = request.header("origin")
        except DuplicateHeader:
            return []
        if origin is None or not self.origin_allowed(origin):
            return []
        return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                ("Access-Control-Expose-Headers", EXPOSE_HEADERS)]

    def websocket_refusal(self, headers: list[tuple[str, str]]) -> Answer | None:
        """403 ``origin_not_allowed`` for a handshake from an origin not listed (when the list
        is not empty); 400 for two Authorization headers; None to go on."""
        if len([v for k, v in headers if k == "authorization"]) > 1:
            return json_answer(400, {"error": "invalid_request",
                                     "message": "More than one Authorization header"})
        origins = [v for k, v in headers if k == "origin"]
        if self.cors_origins() and origins and not all(map(self.origin_allowed, origins)):
            return json_answer(403, {"error": "origin_not_allowed",
                                     "message": "This origin may not connect"})
        return None

    # -- the responder ---------------------------------------------------------------------

    async def respond(self, conn: FrontConnection, request: HttpRequest) -> Answer:
        answer = await self._route(conn, request)
        answer.headers.extend(self.cors(request))
        return answer

    def _allowed(self, path: str) -> tuple[tuple[str, ...], Handler | None, tuple[int, ...]]:
        """Methods allowed on ``path`` (empty when unknown), the API handler, its ids."""
        for pattern, methods, handler in self.api:
            match = pattern.fullmatch(path)
            if match is not None:
                return methods, handler, tuple(int(g) for g in match.groups())
        if path in STATIC or path in ("/api/health", "/metrics"):
            return ("GET",), None, ()
        if path == WS_PATH:
            return ("GET",), None, ()
        if self.routes.demo() is not None and path in ("/", "/demo/users", "/demo/token"):
            return ("GET",), None, ()
        return (), None, ()

    async def _route(self, conn: FrontConnection, request: HttpRequest) -> Answer:
        url = urlsplit(request.target)
        path = url.path
        methods, handler, params = self._allowed(path)
        if not methods:
            return error(404, "not_found", "Not found")
        allow = ", ".join([*methods, *(("HEAD",) if "GET" in methods else ()), "OPTIONS"])
        method = request.method
        if method == "OPTIONS":
            return self.preflight(request, allow)
        if method not in methods and not (method == "HEAD" and "GET" in methods):
            return error(405, "method_not_allowed", f"{method} is not allowed here",
                         [("Allow", allow)])
        if handler is not None:
            try:
                return await self.call(handler, request, parse_qs(url.query), params)
            except ApiError as exc:
                return error(exc.status, exc.code, exc.message, exc.headers)
        if path in STATIC:
            return self.static_file(request, path)
        # health, metrics, the demo routes: answered by the routes of before the front.
        response = await self.routes.process_request(conn, to_websockets(request))
        if response is None:  # only the WebSocket path, which is not routed here
            return error(426, "upgrade_required", "This path takes a WebSocket handshake",
                         [("Upgrade", "websocket")])
        return from_websockets(response)

    def preflight(self, request: HttpRequest, allow: str) -> Answer:
        """CORS preflight: allowed origins get the methods and headers; others get none."""
        headers = [("Allow", allow)]
        # respond() adds the origin headers to every answer; only the preflight's own go here
        # (two Access-Control-Allow-Origin headers make browsers refuse the preflight).
        if self.cors(request):
            headers += [("Access-Control-Allow-Methods", allow),
                        ("Access-Control-Allow-Headers", ALLOW_HEADERS),
                        ("Access-Control-Max-Age", "600")]
        return Answer(204, headers)

    def static_file(self, request: HttpRequest, path: str) -> Answer:
        """The JS client: cacheable, revalidated by ETag (304 when unchanged)."""
        known = self.static.get(path)
        if known is None:
            relative, content_type = STATIC[path]
            try:
                body = (HERE / relative).read_bytes()
            except OSError:
                return error(404, "not_found", "Not found")
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            known = self.static[path] = (body, content_type, etag)
        body, content_type, etag = known
        headers = [("Content-Type", content_type), ("ETag", etag),
                   ("Cache-Control", "public, no-cache"), ("X-Content-Type-Options", "nosniff")]
        tags = ",".join(request.all("if-none-match"))
        if etag in [t.strip().removeprefix("W/") for t in tags.split(",")] or tags == "*":
            return Answer(304, headers)
        return Answer(200, headers, body)

    # -- the API ---------------------------------------------------------------------------

    async def call(self, handler: Handler, request: HttpRequest, query: dict[str, list[str]],
                   params: tuple[int, ...]) -> Answer:
        try:
            header = request.header("authorization")
        except DuplicateHeader:
            raise ApiError(400, "invalid_request", "More than one Authorization header") from None
        token = None
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        try:
            identity = self.verifier().verify(token)
        except AuthError as exc:
            raise ApiError(401, exc.code, exc.message,
                           [("WWW-Authenticate", "Bearer")]) from None
        wait = self.hub.bucket(identity.user_id).take()
        if wait > 0:
            raise ApiError(429, p.RATE_LIMITED, "Too many requests; slow down",
                           [("Retry-After", str(max(1, math.ceil(wait))))])
        name, _ = await self.profile(identity)
        try:
            return await handler(Call(request, query, params, identity, name))
        except p.ProtocolError as exc:
            status = {p.FORBIDDEN: 403, p.RATE_LIMITED: 429, p.UNAVAILABLE: 503,
                      p.INTERNAL: 500}.get(exc.code, 400)
            raise ApiError(status, exc.code, exc.message, _retry_after(exc.retry_after_ms)
                           ) from None
        except StoreError as exc:
            code, message, retry_after_ms = store_error_reply(exc)
            if code == p.INTERNAL:
                raise  # logged with its traceback by the front, answered 500
            raise ApiError(503, code, message, _retry_after(retry_after_ms)) from None

    async def list_conversations(self, call: Call) -> Answer:
        limit = _int_query(call.query, "limit", INBOX_DEFAULT, 1, INBOX_MAX)
        before = None
        if "before" in call.query:
            try:
                before = p.decode_cursor(call.query["before"][0])
            except ValueError:
                raise ApiError(400, p.INVALID_MESSAGE, "before is not a cursor this server gave"
                               ) from None
        rows, cursor = await self.service.conversation_list(call.identity.user_id, before, limit)
        return json_answer(200, {
            "success": True,
            "conversations": [p.conversation_entry(r) for r in rows],
            "nextCursor": p.encode_cursor(cursor) if cursor is not None else None,
        })

    async def messages(self, call: Call) -> Answer:
        page = self.service.config.history.page_size
        limit = _int_query(call.query, "limit", page, 1, page)
        before = _int_query(call.query, "before", None, 1, p.MAX_ID)
        rows, details, more = await self.service.history_details(
            call.params[0], call.identity.user_id, before, limit
        )
        return json_answer(200, {
            "success": True,
            "messages": [p.detailed_history_entry(r, details.get(r.id)) for r in rows],
            "hasMore": more,
        })

    async def send(self, call: Call) -> Answer:
        body = _json_body(call.request)
        frame = {**body, "type": "send_message"}
        if "receiverId" in body and "recipientId" not in body:
            frame["recipientId"] = body["receiverId"]
        try:
            key = call.request.header("idempotency-key")
        except DuplicateHeader:
            raise ApiError(400, p.INVALID_MESSAGE, "More than one Idempotency-Key") from None
        if key is not None and "requestId" not in body:
            frame["requestId"] = key
        # The socket's parser checks the fields, so both doors accept exactly the same sends.
        command = p.parse(json.dumps(frame), self.limits)
        assert isinstance(command, p.SendMessage)
        sent = await self.service.send_message(
            call.identity.user_id, call.name, command.conversation_id, command.recipient_id,
            command.content, message_type=command.message_type,
            attachments=[a.to_wire() for a in command.attachments],
            pitch_id=command.pitch_id, subject=command.subject,
            request_id=command.request_id, origin=None,
        )
        fields = sent.fields
        message = {
            "id": fields["messageId"], **fields, "sentAt": fields["timestamp"],
            "isRead": False, "delivered": sent.delivered,
        }
        if command.request_id is not None:
            message["requestId"] = command.request_id
        return json_answer(201, {"success": True, "message": message})

    async def read(self, call: Call) -> Answer:
        body = _json_body(call.request, optional=True)
        up_to = body.get("upToMessageId")
        if up_to is not None and (type(up_to) is not int or not 0 < up_to <= p.MAX_ID):
            raise ApiError(400, p.INVALID_MESSAGE, "upToMessageId must be a message id")
        count = await self.service.mark_conversation_read(
            call.identity.user_id, call.name, call.params[0], up_to
        )
        return json_answer(200, {"success": True, "read": count})


def error(status: int, code: str, message: str,
          headers: list[tuple[str, str]] | None = None) -> Answer:
    return json_answer(status, {"error": code, "message": message}, headers)


def _json_body(request: HttpRequest, *, optional: bool = False) -> dict[str, Any]:
    if not request.body.strip():
        if optional:
            return {}
        raise ApiError(400, p.INVALID_JSON, "The request body must be a JSON object")
    try:
        value = json.loads(request.body)
    except (ValueError, RecursionError):
        raise ApiError(400, p.INVALID_JSON, "The request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, p.INVALID_JSON, "The request body must be a JSON object")
    return value


def _int_query(query: dict[str, list[str]], name: str, default: Any, low: int, high: int) -> Any:
    values = query.get(name)
    if not values:
        return default
    text = values[0]
    if not text.isdigit() or len(text) > 19 or not low <= int(text):
        raise ApiError(400, p.INVALID_MESSAGE, f"{name} must be an integer of at least {low}")
    return min(int(text), high)
