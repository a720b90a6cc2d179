"""Answers to the HTTP requests the front (``http_front.py``) reads: routing, CORS, the static
client, the routes that predate the front (``http_routes.Routes``), and section 8's user API.

Every API handler authenticates the bearer token (the handshake's 401 rules), takes a token
from the user's rate-limit bucket (the one their sockets use), and calls the service layer;
nothing here touches the store or the hub's connections directly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import demo
import protocol as p
from auth import AuthError, Identity, Verifier
from config import ApiConfig
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
from rows import ConversationRow, MessageRow, PitchRow, UserRow
from service import INBOX_DEFAULT, INBOX_MAX, Service, store_error_reply
from store import ConstraintViolation, StoreError

ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key"
EXPOSE_HEADERS = "Retry-After, ETag"
_ID = r"([1-9][0-9]{0,18})"

Handler = Callable[["Call"], Awaitable[Answer]]
# A backend API handler: the request and the ids in its path.
BackendHandler = Callable[[HttpRequest, tuple[int, ...]], Awaitable[Answer]]
# Longest profile field and idempotencyKey of the backend's API, in characters.
MAX_PROFILE_CHARS = 200
MAX_IDEMPOTENCY_KEY_CHARS = 128
VISIBILITIES = ("public", "private")


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


def _api_error(exc: p.ProtocolError | StoreError) -> ApiError:
    """The HTTP answer for an error the service or the store raised, for every route. A store
    error other than ``unavailable`` is raised again: logged with its traceback, answered 500."""
    if isinstance(exc, StoreError):
        code, message, retry_after_ms = store_error_reply(exc)
        if code == p.INTERNAL:
            raise exc
        return ApiError(503, code, message, _retry_after(retry_after_ms))
    status = {p.FORBIDDEN: 403, p.RATE_LIMITED: 429, p.UNAVAILABLE: 503,
              p.INTERNAL: 500}.get(exc.code, 400)
    return ApiError(status, exc.code, exc.message, _retry_after(exc.retry_after_ms),
                    detail=exc.detail)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[str, str]] | None = None, *,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []
        self.detail = detail


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
        backend: ApiConfig | None = None,
        forget_profile: Callable[[UserRow], None] | None = None,
    ) -> None:
        self.routes = routes
        self.service = service
        self.hub = hub
        self.verifier = verifier
        self.profile = profile
        self.cors_origins = cors_origins
        self.limits = limits
        self.backend = backend if backend is not None else ApiConfig()
        self.forget_profile = forget_profile
        self.static: dict[str, tuple[bytes, str, str]] = {}
        # (pattern, methods, handler); HEAD is allowed wherever GET is.
        self.api: list[tuple[re.Pattern[str], tuple[str, ...], Handler]] = [
            (re.compile(r"/api/messages/conversations"), ("GET",), self.list_conversations),
            (re.compile(rf"/api/messages/{_ID}/messages"), ("GET",), self.messages),
            (re.compile(r"/api/messages/send"), ("POST",), self.send),
            (re.compile(rf"/api/messages/{_ID}/read"), ("POST",), self.read),
            (re.compile(rf"/api/creator/conversations/{_ID}/read"), ("POST",), self.read),
            # The same, by the paths a later Pitchey Messages page (messaging.service) uses.
            (re.compile(rf"/api/messages/conversations/{_ID}/messages"), ("GET",),
             self.messages),
            (re.compile(r"/api/messages"), ("POST",), self.send),
            (re.compile(rf"/api/messages/conversations/{_ID}/read"), ("POST",), self.read),
            (re.compile(r"/api/notifications"), ("GET",), self.notifications),
            (re.compile(r"/api/notifications/read"), ("POST",), self.notifications_read),
            (re.compile(rf"/api/pitches/{_ID}/activity"), ("GET",), self.pitch_activity),
        ]
        # The backend's API (PROTOCOL.md 11): only when api.key is set; its own key.
        self.backend_api: list[tuple[re.Pattern[str], tuple[str, ...], BackendHandler]] = [
            (re.compile(r"/api/publish"), ("POST",), self.publish),
            (re.compile(rf"/api/users/{_ID}"), ("PUT",), self.put_user),
            (re.compile(r"/api/users"), ("POST",), self.post_users),
            (re.compile(r"/api/conversations"), ("POST",), self.post_conversation),
            (re.compile(rf"/api/conversations/{_ID}/participants"), ("POST",),
             self.participants),
            (re.compile(rf"/api/pitches/{_ID}"), ("PUT",), self.put_pitch),
        ]

    # -- CORS and Origin -------------------------------------------------------------------

    def origin_allowed(self, origin: str) -> bool:
        allowed = self.cors_origins()
        return "*" in allowed or origin in allowed

    def cors(self, request: HttpRequest) -> list[tuple[str, str]]:
        return self.cors_for(request.headers)

    def cors_for(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The CORS headers of an answer to a request with these (lower-case) headers: none
        unless it has one Origin and that origin is allowed. Also for the errors the front
        writes itself (413, 431), so that a browser shows them rather than a CORS failure."""
        origins = [v for k, v in headers if k == "origin"]
        if len(origins) != 1 or not self.origin_allowed(origins[0]):
            return []
        return [("Access-Control-Allow-Origin", origins[0]), ("Vary", "Origin"),
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
        # With a listener of its own (api.port), the backend's API is not on this one.
        answer = await self._route(conn, request, backend_here=not self.backend.port)
        answer.headers.extend(self.cors(request))
        return answer

    async def respond_backend(self, conn: FrontConnection, request: HttpRequest) -> Answer:
        """The backend API's own listener (``api.port``): its routes and ``/api/health``
        only (no CORS: a server calls it, not a page)."""
        path = urlsplit(request.target).path
        if path != "/api/health" and self._backend_route(path) is None:
            return error(404, "not_found", "Not found")
        return await self._route(conn, request, backend_here=True)

    def _backend_route(
        self, path: str
    ) -> tuple[tuple[str, ...], BackendHandler, tuple[int, ...]] | None:
        """The backend API's route for ``path``; None when unknown or the API is off (no
        ``api.key``: then those paths are unknown, 404)."""
        if not self.backend.key:
            return None
        for pattern, methods, handler in self.backend_api:
            match = pattern.fullmatch(path)
            if match is not None:
                return methods, handler, tuple(int(g) for g in match.groups())
        return None

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
        if self.routes.demo() is not None and path == "/demo/sign-nda":
            return ("POST",), None, ()
        return (), None, ()

    async def _route(self, conn: FrontConnection, request: HttpRequest,
                     backend_here: bool = True) -> Answer:
        url = urlsplit(request.target)
        path = url.path
        backend = self._backend_route(path) if backend_here else None
        methods, handler, params = self._allowed(path) if backend is None else (
            backend[0], None, backend[2])
        if not methods:
            return error(404, "not_found", "Not found")
        allow = ", ".join([*methods, *(("HEAD",) if "GET" in methods else ()), "OPTIONS"])
        method = request.method
        if method == "OPTIONS":
            return self.preflight(request, allow)
        if method not in methods and not (method == "HEAD" and "GET" in methods):
            return error(405, "method_not_allowed", f"{method} is not allowed here",
                         [("Allow", allow)])
        if backend is not None:
            try:
                return await self.backend_call(backend[1], request, params)
            except ApiError as exc:
                return error(exc.status, exc.code, exc.message, exc.headers, exc.detail)
        if handler is not None:
            try:
                return await self.call(handler, request, parse_qs(url.query), params)
            except ApiError as exc:
                return error(exc.status, exc.code, exc.message, exc.headers, exc.detail)
        if path in STATIC:
            return self.static_file(request, path)
        if path == "/demo/sign-nda":
            return await self.demo_sign_nda(request)
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
        bucket = self.hub.bucket(identity.user_id)
        if self.hub.shared:
            wait = await self.hub.backplane.take(identity.user_id, 1.0, bucket)
        else:
            wait = bucket.take()
        if wait > 0:
            raise ApiError(429, p.RATE_LIMITED, "Too many requests; slow down",
                           [("Retry-After", str(max(1, math.ceil(wait))))])
        # The handshake's rule (PROTOCOL.md 13): on an existing Pitchey database a token of a
        # user the app does not have is refused.
        try:
            accepted = await self.service.store.accepts_user(identity.user_id)
        except StoreError as exc:
            raise _api_error(exc) from None
        if not accepted:
            raise ApiError(401, "unknown_user", "Unknown user", [("WWW-Authenticate", "Bearer")])
        name, _ = await self.profile(identity)
        try:
            return await handler(Call(request, query, params, identity, name))
        except (p.ProtocolError, StoreError) as exc:
            raise _api_error(exc) from None

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
        if body.get("recipientId") is None and "receiverId" in body:
            frame["recipientId"] = body["receiverId"]
        try:
            key = call.request.header("idempotency-key")
        except DuplicateHeader:
            raise ApiError(400, p.INVALID_MESSAGE, "More than one Idempotency-Key") from None
        if key is not None and body.get("requestId") is None:
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

    # -- notifications and pitch activity (user routes) ------------------------------------

    async def notifications(self, call: Call) -> Answer:
        page = self.service.config.notifications.page_size
        limit = _int_query(call.query, "limit", page, 1, page)
        before = _int_query(call.query, "before", None, 1, p.MAX_ID)
        unread = (call.query.get("unread") or ["0"])[0]
        if unread not in ("0", "1", "true", "false"):
            raise ApiError(400, p.INVALID_MESSAGE, "unread must be 1 or 0")
        rows, count, more = await self.service.notifications(
            call.identity.user_id, before, limit, unread in ("1", "true")
        )
        return json_answer(200, {
            "success": True,
            "notifications": [p.notification_entry(r) for r in rows],
            "unreadCount": count,
            "hasMore": more,
        })

    async def notifications_read(self, call: Call) -> Answer:
        body = _json_body(call.request)
        ids = p.notification_ids(body.get("notificationIds"), body.get("all"), self.limits)
        changed, unread = await self.service.mark_notifications_read(call.identity.user_id, ids)
        return json_answer(200, {"success": True, "notificationIds": changed,
                                 "unreadCount": unread})

    async def pitch_activity(self, call: Call) -> Answer:
        page = self.service.config.history.page_size
        limit = _int_query(call.query, "limit", page, 1, page)
        before = _int_query(call.query, "before", None, 1, p.MAX_ID)
        fields = await self.service.pitch_activity(call.identity.user_id, call.params[0],
                                                   before, limit)
        return json_answer(200, {"success": True, **fields})

    async def demo_sign_nda(self, request: HttpRequest) -> Answer:
        """Demo mode only, loopback hosts only (the Host and Origin check of every demo
        route): publish nda_signed to the demo creator through the backend's publish path, so
        a person sees it arrive in the creator's tab."""
        if not self.routes.demo_caller(to_websockets(request)):
            return error(403, "host_not_allowed", "Demo routes answer loopback hosts only")
        answer = await self.service.publish([demo.NDA_TO], None, None, "nda_signed",
                                            dict(demo.NDA_EVENT), True, None)
        return json_answer(200, answer)

    # -- the backend's API (PROTOCOL.md 11) ------------------------------------------------

    async def backend_call(self, handler: BackendHandler, request: HttpRequest,
                           params: tuple[int, ...]) -> Answer:
        """Check the API key (constant time; a user JWT never passes), then call."""
        try:
            header = request.header("authorization")
        except DuplicateHeader:
            raise ApiError(400, "invalid_request", "More than one Authorization header") from None
        scheme, _, value = (header or "").partition(" ")
        given = value.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, self.backend.key.encode()):
            raise ApiError(401, "invalid_api_key", "This route needs the backend's API key",
                           [("WWW-Authenticate", "Bearer")])
        try:
            return await handler(request, params)
        except (p.ProtocolError, StoreError) as exc:
            raise _api_error(exc) from None

    async def publish(self, request: HttpRequest, _: tuple[int, ...]) -> Answer:
        body = _json_body(request)
        targets = [name for name in ("users", "pitchId", "conversationId") if name in body]
        if len(targets) != 1:
            raise ApiError(400, p.INVALID_MESSAGE,
                           "give exactly one of users, pitchId, conversationId")
        users = None
        pitch_id = conversation_id = None
        if "users" in body:
            users = _ids(body["users"], "users", self.backend.max_publish_users, required=True)
        elif "pitchId" in body:
            pitch_id = _id(body["pitchId"], "pitchId")
        else:
            conversation_id = _id(body["conversationId"], "conversationId")
        event = body.get("event")
        if not isinstance(event, dict):
            raise ApiError(400, p.INVALID_MESSAGE, "event must be an object with a type")
        kind = event.get("type")
        if not isinstance(kind, str) or p.EVENT_TYPE.fullmatch(kind) is None:
            raise ApiError(400, p.INVALID_MESSAGE,
                           "event.type must match ^[a-z][a-z0-9_]{0,63}$")
        if kind in p.SERVER_FRAME_TYPES:
            raise ApiError(400, p.INVALID_MESSAGE,
                           f"event.type {kind!r} is one of the daemon's own frame types")
        fields = {k: v for k, v in event.items() if k != "type"}
        reserved = sorted(set(fields) & p.NOTIFICATION_FIELDS)
        if reserved:
            raise ApiError(400, p.INVALID_MESSAGE,
                           f"event fields {', '.join(reserved)} are set by the daemon")
        if len(p.dumps(fields).encode()) > self.backend.max_event_bytes:
            raise ApiError(413, "too_large",
                           f"event is over {self.backend.max_event_bytes} bytes")
        durable = body.get("durable", users is not None)
        if not isinstance(durable, bool):
            raise ApiError(400, p.INVALID_MESSAGE, "durable must be true or false")
        if durable and users is None:
            raise ApiError(400, p.INVALID_MESSAGE,
                           "durable events go to users (notifications); a pitch's or a"
                           " conversation's live connections get non-durable ones")
        key = body.get("idempotencyKey")
        if key is not None and (not isinstance(key, str) or not key
                                or len(key) > MAX_IDEMPOTENCY_KEY_CHARS):
            raise ApiError(400, p.INVALID_MESSAGE,
                           f"idempotencyKey must be a string of 1-{MAX_IDEMPOTENCY_KEY_CHARS}"
                           " characters")
        _refuse_nul("idempotencyKey", key)
        answer = await self.service.publish(users, pitch_id, conversation_id, kind, fields,
                                            durable, key)
        return json_answer(200, answer)

    def _profile(self, item: Any, user_id: int) -> tuple[str | None, str | None]:
        if not isinstance(item, dict):
            raise ApiError(400, p.INVALID_MESSAGE, "a profile must be an object")
        values: list[str | None] = []
        for field in ("username", "name", "userType"):
            value = item.get(field)
            if value is not None and (not isinstance(value, str) or not value.strip()
                                      or len(value) > MAX_PROFILE_CHARS):
                raise ApiError(400, p.INVALID_MESSAGE,
                               f"{field} must be a non-empty string of at most"
                               f" {MAX_PROFILE_CHARS} characters")
            _refuse_nul(field, value)
            values.append(value)
        username, name, user_type = values
        return username or name, user_type

    async def _save_profiles(
        self, profiles: list[tuple[int, str | None, str | None]]
    ) -> dict[int, UserRow]:
        """Store the profiles (a field left out keeps its value); return them as stored,
        and tell the daemon (online users are shown by them at once)."""
        for user_id, username, user_type in profiles:
            await self.service.store.save_profile(user_id, username, user_type)
        stored: dict[int, UserRow] = {}
        try:
            stored = await self.service.store.users([user_id for user_id, _, _ in profiles])
        finally:
            # Even when that read fails, no daemon keeps showing the old profile: one it
            # could not read back is forgotten (read again at the user's next handshake).
            if self.forget_profile is not None:
                for user_id, _, _ in profiles:
                    self.forget_profile(stored.get(user_id) or UserRow(user_id, None, None, None))
        return stored

    async def put_user(self, request: HttpRequest, params: tuple[int, ...]) -> Answer:
        body = _json_body(request)
        username, user_type = self._profile(body, params[0])
        row = (await self._save_profiles([(params[0], username, user_type)])).get(params[0])
        return json_answer(200, {"success": True, "user": {
            "id": params[0], "username": row.username if row else username,
            "userType": row.user_type if row else user_type}})

    async def post_users(self, request: HttpRequest, _: tuple[int, ...]) -> Answer:
        raw = _json_value(request)
        items = raw.get("users") if isinstance(raw, dict) else raw
        if not isinstance(items, list) or not items:
            raise ApiError(400, p.INVALID_MESSAGE,
                           "the body is a list of profiles, or {users: [...]}")
        if len(items) > self.backend.max_publish_users:
            raise ApiError(400, p.INVALID_MESSAGE,
                           f"at most {self.backend.max_publish_users} users at once")
        profiles = []
        for item in items:
            user_id = _id(item.get("id") if isinstance(item, dict) else None, "id")
            profiles.append((user_id, *self._profile(item, user_id)))
        await self._save_profiles(profiles)
        return json_answer(200, {"success": True, "saved": len(profiles)})

    async def post_conversation(self, request: HttpRequest, _: tuple[int, ...]) -> Answer:
        body = _json_body(request)
        wanted = _id(body["id"], "id") if body.get("id") is not None else None
        created_by = _id(body.get("createdBy"), "createdBy")
        participants = _ids(body.get("participantIds"), "participantIds",
                            self.limits.max_participants, required=True)
        title = body.get("title")
        if title is not None and (not isinstance(title, str)
                                  or len(title) > self.limits.max_title_chars):
            raise ApiError(400, p.INVALID_MESSAGE,
                           f"title must be a string of at most {self.limits.max_title_chars}"
                           " characters")
        _refuse_nul("title", title)
        pitch_id = _id(body["pitchId"], "pitchId") if body.get("pitchId") is not None else None
        members = frozenset([created_by, *participants])
        if wanted is not None:
            existing = await self.service.conversations.get(wanted)
            if existing is not None:
                if (existing.members, existing.title, existing.created_by,
                        existing.pitch_id) != (members, title, created_by, pitch_id):
                    raise ApiError(409, "conflict",
                                   f"conversation {wanted} exists with other values")
                rows, _more = await self.service.history(existing.id, created_by, None, None)
                return json_answer(201, _created(existing, rows))
        try:
            created = await self.service.create_conversation(
                created_by, participants, title, None, pitch_id, by_backend=True,
                conversation_id=wanted,
            )
        except ConstraintViolation:
            raise ApiError(409, "conflict", f"conversation {wanted} exists") from None
        return json_answer(201, _created(created.conversation, []))

    async def participants(self, request: HttpRequest, params: tuple[int, ...]) -> Answer:
        body = _json_body(request)
        cap = self.limits.max_participants
        add = _ids(body.get("add"), "add", cap, required=False)
        remove = _ids(body.get("remove"), "remove", cap, required=False)
        if not add and not remove:
            raise ApiError(400, p.INVALID_MESSAGE, "add or remove at least one user")
        row = await self.service.change_participants(params[0], add, remove)
        if row is None:
            raise ApiError(404, "not_found", f"no conversation {params[0]}")
        return json_answer(200, {"success": True, "conversation": _conversation(row)})

    async def put_pitch(self, request: HttpRequest, params: tuple[int, ...]) -> Answer:
        body = _json_body(request)
        owner = _id(body.get("ownerId"), "ownerId")
        title = body.get("title")
        if (not isinstance(title, str) or not title.strip()
                or len(title) > self.limits.max_title_chars):
            raise ApiError(400, p.INVALID_MESSAGE,
                           f"title must be a non-empty string of at most"
                           f" {self.limits.max_title_chars} characters")
        _refuse_nul("title", title)
        visibility = body.get("visibility")
        if visibility not in VISIBILITIES:
            raise ApiError(400, p.INVALID_MESSAGE, "visibility must be public or private")
        allowed = _ids(body.get("allowedUserIds"), "allowedUserIds",
                       self.backend.max_allowed_users, required=False)
        row = PitchRow(params[0], owner, title, str(visibility), frozenset(allowed))
        try:
            await self.service.put_pitch(row)
        except ConstraintViolation as exc:  # an existing Pitchey database without this pitch
            raise ApiError(409, "conflict", str(exc)) from None
        return json_answer(200, {"success": True, "pitch": {
            "id": row.id, "ownerId": owner, "title": title, "visibility": visibility,
            "allowedUserIds": sorted(row.allowed)}})


def error(status: int, code: str, message: str,
          headers: list[tuple[str, str]] | None = None, detail: str | None = None) -> Answer:
    body = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return json_answer(status, body, headers)


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


def _json_value(request: HttpRequest) -> Any:
    try:
        return json.loads(request.body)
    except (ValueError, RecursionError):
        raise ApiError(400, p.INVALID_JSON, "The request body is not valid JSON") from None


def _id(value: Any, name: str) -> int:
    if type(value) is not int or not 0 < value <= p.MAX_ID:
        raise ApiError(400, p.INVALID_MESSAGE, f"{name} must be a positive integer id")
    return value


def _ids(value: Any, name: str, cap: int, *, required: bool) -> list[int]:
    """A list of positive ids (de-duplicated, in order), at most ``cap``."""
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise ApiError(400, p.INVALID_MESSAGE, f"{name} must be a non-empty list of ids")
    if len(value) > cap:
        raise ApiError(400, p.INVALID_MESSAGE, f"{name}: at most {cap} ids")
    return list(dict.fromkeys(_id(v, name) for v in value))


def _refuse_nul(field: str, value: str | None) -> None:
    """400 for stored text holding U+0000 (as protocol.NO_NUL refuses it in frames)."""
    if value is not None and p.NUL in value:
        raise ApiError(400, p.INVALID_MESSAGE, f"{field} {p.NO_NUL}")


def _created(row: ConversationRow, rows: list[MessageRow]) -> dict[str, Any]:
    """POST /api/conversations' answer: the conversation with the fields of
    conversation_joined (PROTOCOL.md 4.4: its newest messages, none when new, and a
    timestamp), both under ``conversation`` and at the top level."""
    conversation = {**_conversation(row), "messages": [p.history_entry(r) for r in rows],
                    "timestamp": p.now_iso()}
    return {"success": True, **conversation, "conversation": conversation}


def _conversation(row: ConversationRow) -> dict[str, Any]:
    """A conversation as the backend's API answers it (conversation_created's fields)."""
    return {"id": row.id, "conversationId": row.id, "title": row.title,
            "isGroup": row.is_group, "participantIds": sorted(row.members),
            "createdBy": row.created_by, "pitchId": row.pitch_id}
