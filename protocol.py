"""Wire protocol: parse client frames into typed commands, encode server frames. No I/O.

``parse(text, limits)`` returns one of the command dataclasses below or raises
:class:`ProtocolError`, whose ``code`` is the wire error code (``invalid_json``,
``invalid_message``, ``unknown_type``, ...). Encoding is a pure function of its inputs.

JSON goes through orjson when it is installed (``requirements.txt`` pins it) and through the
standard library otherwise; ``loads`` and ``dumps`` below give the same results either way. Per
frame, orjson parses and encodes in about a tenth of the time (docs/benchmarks.md).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, TypeGuard

from rows import (
    CommentRow,
    ConversationRow,
    ConversationSummary,
    MessageDetail,
    MessageRow,
    NotificationRow,
    PitchRow,
    PitchStats,
)

try:
    import orjson
except ImportError:  # optional: the standard library gives the same results, slower
    orjson = None  # type: ignore[assignment]

# Error codes (PROTOCOL.md section 6).
INVALID_JSON: Final = "invalid_json"
INVALID_MESSAGE: Final = "invalid_message"
UNKNOWN_TYPE: Final = "unknown_type"
FORBIDDEN: Final = "forbidden"
RATE_LIMITED: Final = "rate_limited"
UNAVAILABLE: Final = "unavailable"
INTERNAL: Final = "internal"

# Close codes (PROTOCOL.md section 7).
CLOSE_NORMAL: Final = 1000
CLOSE_BINARY: Final = 1003
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_RESTART: Final = 1012
CLOSE_SLOW: Final = 1013
CLOSE_TOKEN_EXPIRED: Final = 4001


class Disconnect(NamedTuple):
    """One way the server ends a connection: the close code tells the client what to do."""

    code: int
    reason: str


BINARY_FRAME: Final = Disconnect(CLOSE_BINARY, "binary frames are not accepted")
FLOODING: Final = Disconnect(CLOSE_POLICY, "flooding")
NOT_AUTHENTICATED: Final = Disconnect(CLOSE_POLICY, "not authenticated")
SERVER_RESTART: Final = Disconnect(CLOSE_RESTART, "server restart")
SLOW_CONSUMER: Final = Disconnect(CLOSE_SLOW, "slow consumer: reconnect and sync")
TOO_BIG: Final = Disconnect(CLOSE_TOO_BIG, "frame too big")
TOO_MANY_CONNECTIONS: Final = Disconnect(CLOSE_SLOW, "too many connections; try again later")
TOKEN_EXPIRED: Final = Disconnect(CLOSE_TOKEN_EXPIRED, "token expired")

# SQLite integers are signed 64-bit; larger ids can never match a row.
MAX_ID: Final = 2**63 - 1

SEND_MESSAGE_MISSING: Final = "Missing required fields for message"
# Text that is stored must not hold U+0000: PostgreSQL's text and jsonb cannot, so no engine
# takes it (the same frame gets the same answer everywhere).
NUL: Final = "\x00"
NO_NUL: Final = "must not contain NUL (U+0000) characters"

# Longest messageType, in characters.
MAX_MESSAGE_TYPE_CHARS: Final = 32


class ProtocolError(Exception):
    """A frame the server answers with ``error {code, message, requestId?, retryAfterMs?}``."""

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        *,
        retry_after_ms: int | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_ms = retry_after_ms
        # What exactly is wrong, when ``message`` is a fixed text (send_message's).
        self.detail = detail
        # The pitch of the refused pitch frame (PROTOCOL.md 9: every pitch frame names it).
        self.pitch_id: int | None = None


def send_message_error(reason: str, request_id: str | None = None) -> ProtocolError:
    """A send_message that is not valid: ``invalid_message`` with the message PROTOCOL.md 6
    fixes for it, whatever the field, and the reason as ``detail``."""
    return ProtocolError(INVALID_MESSAGE, SEND_MESSAGE_MISSING, request_id,
                         detail=None if reason == SEND_MESSAGE_MISSING else reason)


def std_loads(text: str) -> Any:
    return json.loads(text)


def std_dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# 19 digits in a row: maybe an integer orjson cannot hold (beyond -2**63..2**64-1), which it
# would read as a float. Every integer of 18 digits or fewer fits.
_LONG_DIGITS: Final = re.compile(r"[0-9]{19}")


def fast_loads(text: str) -> Any:
    """orjson, deferring to ``json`` on anything orjson refuses (NaN, unpaired surrogate
    escapes, numbers too large for a double) or would read differently: an integer beyond
    64 bits, which orjson turns into a float and ``json`` keeps an exact ``int``. So both
    codecs accept and refuse the same frames, with the same values."""
    if _LONG_DIGITS.search(text) is not None:
        return json.loads(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def fast_dumps(value: Any) -> str:
    """orjson's compact UTF-8 form is the same text as ``std_dumps``; a value orjson cannot
    encode (an unpaired surrogate from a token claim, say) goes through ``json`` instead."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return std_dumps(value)


loads = std_loads if orjson is None else fast_loads
dumps = std_dumps if orjson is None else fast_dumps


@dataclass(frozen=True)
class Limits:
    """The input limits the parser enforces (taken from the ``limits`` config section)."""

    max_content_chars: int = 10000
    max_attachments: int = 10
    max_attachment_field_chars: int = 2048
    max_request_id_chars: int = 128
    max_participants: int = 1000
    max_title_chars: int = 200
    max_notification_ids: int = 1000  # notifications.max_per_user: more ids can never match


@dataclass(frozen=True)
class Attachment:
    type: str
    url: str
    filename: str
    size: int
    mime_type: str | None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "url": self.url,
            "filename": self.filename,
            "size": self.size,
        }
        if self.mime_type is not None:
            out["mimeType"] = self.mime_type
        return out


@dataclass(frozen=True, kw_only=True)
class Frame:
    """Every command carries the frame's requestId (if any), so any reply can echo it."""

    request_id: str | None = None


@dataclass(frozen=True)
class Ping(Frame):
    pass


@dataclass(frozen=True)
class SendMessage(Frame):
    conversation_id: int | None
    recipient_id: int | None
    content: str
    attachments: tuple[Attachment, ...]
    message_type: str
    pitch_id: int | None
    subject: str | None


@dataclass(frozen=True)
class Typing(Frame):
    conversation_id: int
    is_typing: bool


@dataclass(frozen=True)
class MarkRead(Frame):
    message_id: int


@dataclass(frozen=True)
class JoinConversation(Frame):
    conversation_id: int


@dataclass(frozen=True)
class GetOnlineUsers(Frame):
    pass


@dataclass(frozen=True)
class CreateConversation(Frame):
    participant_ids: tuple[int, ...]
    title: str | None
    pitch_id: int | None


@dataclass(frozen=True)
class GetMessages(Frame):
    conversation_id: int
    before_message_id: int | None
    limit: int | None


@dataclass(frozen=True)
class Sync(Frame):
    since_message_id: int


@dataclass(frozen=True)
class RefreshToken(Frame):
    token: str


@dataclass(frozen=True)
class GetConversations(Frame):
    limit: int | None
    before: tuple[str, int] | None  # the decoded cursor


@dataclass(frozen=True)
class PitchView(Frame):
    pitch_id: int


@dataclass(frozen=True)
class PitchLeave(Frame):
    pitch_id: int


@dataclass(frozen=True)
class PitchLike(Frame):
    pitch_id: int
    liked: bool  # pitch_like (True) or pitch_unlike (False)


@dataclass(frozen=True)
class PitchComment(Frame):
    pitch_id: int
    comment: str


@dataclass(frozen=True)
class PitchTyping(Frame):
    pitch_id: int
    is_typing: bool


@dataclass(frozen=True)
class GetPitchActivity(Frame):
    pitch_id: int
    before_comment_id: int | None
    limit: int | None


# The frames about one pitch: an error answering one names the pitch too.
PITCH_FRAMES = (PitchView, PitchLeave, PitchLike, PitchComment, PitchTyping, GetPitchActivity)


@dataclass(frozen=True)
class GetNotifications(Frame):
    before_id: int | None
    limit: int | None
    unread_only: bool


@dataclass(frozen=True)
class MarkNotificationsRead(Frame):
    notification_ids: tuple[int, ...] | None  # None: all of them


Command = (
    Ping
    | SendMessage
    | Typing
    | MarkRead
    | JoinConversation
    | GetOnlineUsers
    | CreateConversation
    | GetMessages
    | Sync
    | RefreshToken
    | GetConversations
    | PitchView
    | PitchLeave
    | PitchLike
    | PitchComment
    | PitchTyping
    | GetPitchActivity
    | GetNotifications
    | MarkNotificationsRead
)


_WIRE_TYPES: Final[dict[type, str]] = {
    Ping: "ping",
    SendMessage: "send_message",
    MarkRead: "mark_read",
    JoinConversation: "join_conversation",
    GetOnlineUsers: "get_online_users",
    CreateConversation: "create_conversation",
    GetMessages: "get_messages",
    Sync: "sync",
    RefreshToken: "refresh_token",
    GetConversations: "get_conversations",
    PitchView: "pitch_view",
    PitchLeave: "pitch_leave",
    PitchComment: "pitch_comment",
    PitchTyping: "typing",
    GetPitchActivity: "get_pitch_activity",
    GetNotifications: "get_notifications",
    MarkNotificationsRead: "mark_notifications_read",
}


def wire_type(command: Command) -> str:
    """The ``type`` the command arrived with (metrics label frames by it)."""
    if isinstance(command, Typing):
        return "typing_start" if command.is_typing else "typing_stop"
    if isinstance(command, PitchLike):
        return "pitch_like" if command.liked else "pitch_unlike"
    return _WIRE_TYPES[type(command)]


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class _Fields:
    """Typed access to one frame's fields; every failure is ``invalid_message``."""

    def __init__(self, frame: dict[str, Any], request_id: str | None, missing: str) -> None:
        self.frame = frame
        self.request_id = request_id
        self.missing = missing
        # A pitch frame's pitchId once read (pitch parsers read it first): their later
        # failures name the pitch, as every pitch frame does (PROTOCOL.md 9).
        self.pitch_id: int | None = None

    def fail(self, message: str) -> ProtocolError:
        if self.missing == SEND_MESSAGE_MISSING:
            return send_message_error(message, self.request_id)
        error = ProtocolError(INVALID_MESSAGE, message, self.request_id)
        error.pitch_id = self.pitch_id
        return error

    def id(self, name: str, *, required: bool = True) -> int | None:
        value = self.frame.get(name)
        if value is None:
            if required:
                raise self.fail(self.missing if self.missing else f"{name} is required")
            return None
        if not _is_int(value):
            raise self.fail(f"{name} must be an integer")
        if not 1 <= value <= MAX_ID:
            raise self.fail(f"{name} must be a positive integer")
        return int(value)

    def required_id(self, name: str) -> int:
        value = self.id(name)
        assert value is not None  # id(required=True) never returns None
        if name == "pitchId":
            self.pitch_id = value
        return value

    def text(self, name: str, max_chars: int, *, required: bool = False) -> str | None:
        value = self.frame.get(name)
        if value is None:
            if required:
                raise self.fail(self.missing if self.missing else f"{name} is required")
            return None
        if not isinstance(value, str):
            raise self.fail(f"{name} must be a string")
        if len(value) > max_chars:
            raise self.fail(f"{name} is longer than {max_chars} characters")
        if NUL in value:
            raise self.fail(f"{name} {NO_NUL}")
        return value


# Frame types whose requestId makes a repeat answer as the first (stored with what it made):
# a requestId that is not a string of at most max_request_id_chars is refused there.
_KEYED_BY_REQUEST_ID = frozenset({"send_message", "create_conversation", "pitch_comment"})


def _request_id(frame: dict[str, Any], limits: Limits) -> str | None:
    value = frame.get("requestId")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError(INVALID_MESSAGE, "requestId must be a non-empty string")
    if len(value) > limits.max_request_id_chars:
        raise ProtocolError(
            INVALID_MESSAGE, f"requestId is longer than {limits.max_request_id_chars} characters"
        )
    if NUL in value:
        raise ProtocolError(INVALID_MESSAGE, f"requestId {NO_NUL}")
    return value


def _attachments(f: _Fields, limits: Limits) -> tuple[Attachment, ...]:
    raw = f.frame.get("attachments")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise f.fail("attachments must be a list")
    if len(raw) > limits.max_attachments:
        raise f.fail(f"at most {limits.max_attachments} attachments")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise f.fail("each attachment must be an object")
        a = _Fields(item, f.request_id, "")
        cap = limits.max_attachment_field_chars
        kind = a.text("type", cap, required=True)
        url = a.text("url", cap, required=True)
        filename = a.text("filename", cap, required=True)
        mime = a.text("mimeType", cap)
        size = item.get("size")
        if not _is_int(size) or not 0 <= size <= MAX_ID:
            raise f.fail("attachment size must be a non-negative integer")
        assert kind is not None and url is not None and filename is not None
        out.append(Attachment(kind, url, filename, int(size), mime))
    return tuple(out)


def _send_message(f: _Fields, limits: Limits) -> SendMessage:
    # The hot path: a field that is absent or already valid costs one dict lookup and one
    # comparison; anything else goes to the _Fields check that words the error.
    frame = f.frame
    conversation_id = frame.get("conversationId")
    if conversation_id is not None and (type(conversation_id) is not int
                                        or not 0 < conversation_id <= MAX_ID):
        f.id("conversationId")
    recipient_id = frame.get("recipientId")
    if recipient_id is not None and (type(recipient_id) is not int
                                     or not 0 < recipient_id <= MAX_ID):
        f.id("recipientId")
    if conversation_id is None and recipient_id is None:
        raise f.fail(SEND_MESSAGE_MISSING)
    content = frame.get("content")
    if type(content) is not str or not content.strip():
        raise f.fail(SEND_MESSAGE_MISSING)
    if len(content) > limits.max_content_chars:
        raise f.fail(f"content is longer than {limits.max_content_chars} characters")
    if NUL in content:
        raise f.fail(f"content {NO_NUL}")
    message_type = "text"
    if "messageType" in frame:
        message_type = f.text("messageType", MAX_MESSAGE_TYPE_CHARS) or "text"
    return SendMessage(
        conversation_id=conversation_id,
        recipient_id=None if conversation_id is not None else recipient_id,
        content=content,
        request_id=f.request_id,
        attachments=_attachments(f, limits) if "attachments" in frame else (),
        message_type=message_type,
        pitch_id=f.id("pitchId", required=False) if "pitchId" in frame else None,
        subject=f.text("subject", limits.max_title_chars) if "subject" in frame else None,
    )


def _create_conversation(f: _Fields, limits: Limits) -> CreateConversation:
    raw = f.frame.get("participantIds")
    if not isinstance(raw, list) or not raw:
        raise f.fail("participantIds must be a non-empty list of user ids")
    ids: dict[int, None] = {}  # ordered and de-duplicated in linear time
    for value in raw:
        if not _is_int(value) or not 1 <= value <= MAX_ID:
            raise f.fail("participantIds must hold positive integer user ids")
        ids[int(value)] = None
        if len(ids) > limits.max_participants:
            raise f.fail(f"at most {limits.max_participants} participants")
    return CreateConversation(
        participant_ids=tuple(ids),
        title=f.text("title", limits.max_title_chars),
        request_id=f.request_id,
        pitch_id=f.id("pitchId", required=False),
    )


def _get_messages(f: _Fields) -> GetMessages:
    limit = f.frame.get("limit")
    if limit is not None:
        if not _is_int(limit):
            raise f.fail("limit must be an integer")
        if limit < 1:
            raise f.fail("limit must be at least 1")
        if limit > MAX_ID:
            raise f.fail(f"limit must be at most {MAX_ID}")
    return GetMessages(
        request_id=f.request_id,
        conversation_id=f.required_id("conversationId"),
        before_message_id=f.id("beforeMessageId", required=False),
        limit=limit,
    )


def _sync(f: _Fields) -> Sync:
    value = f.frame.get("sinceMessageId")
    if not _is_int(value) or not 0 <= value <= MAX_ID:
        raise f.fail("sinceMessageId must be a non-negative integer")
    return Sync(int(value), request_id=f.request_id)


def _refresh(f: _Fields) -> RefreshToken:
    token = f.text("token", 8192, required=True)
    assert token is not None
    return RefreshToken(token, request_id=f.request_id)


def _get_conversations(f: _Fields) -> GetConversations:
    limit = f.frame.get("limit")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise f.fail("limit must be a positive integer")
    raw = f.frame.get("before")
    before = None
    if raw is not None:
        if not isinstance(raw, str):
            raise f.fail("before must be a cursor string")
        try:
            before = decode_cursor(raw)
        except ValueError:
            raise f.fail("before is not a cursor this server gave") from None
    return GetConversations(limit, before, request_id=f.request_id)


def _optional_limit(f: _Fields) -> int | None:
    limit = f.frame.get("limit")
    if limit is None:
        return None
    if not _is_int(limit) or not 1 <= limit <= MAX_ID:
        raise f.fail("limit must be a positive integer")
    return int(limit)


def comment_text(value: Any, limits: Limits) -> str:
    """A pitch comment follows the rules of a message's content (PROTOCOL.md 4.1, 6):
    a string with something besides white space, at most ``max_content_chars``."""
    if type(value) is not str or not value.strip():
        raise ProtocolError(INVALID_MESSAGE, "comment must be a non-empty string")
    if len(value) > limits.max_content_chars:
        raise ProtocolError(
            INVALID_MESSAGE, f"comment is longer than {limits.max_content_chars} characters"
        )
    if NUL in value:
        raise ProtocolError(INVALID_MESSAGE, f"comment {NO_NUL}")
    return value


def _pitch_comment(f: _Fields, limits: Limits) -> PitchComment:
    pitch_id = f.required_id("pitchId")
    try:
        comment = comment_text(f.frame.get("comment"), limits)
    except ProtocolError as exc:
        raise f.fail(exc.message) from None
    return PitchComment(pitch_id, comment, request_id=f.request_id)


def _pitch_typing(f: _Fields) -> PitchTyping:
    pitch_id = f.required_id("pitchId")
    is_typing = f.frame.get("isTyping")
    if not isinstance(is_typing, bool):
        raise f.fail("isTyping must be true or false")
    return PitchTyping(pitch_id, is_typing, request_id=f.request_id)


def _get_notifications(f: _Fields) -> GetNotifications:
    unread = f.frame.get("unreadOnly", False)
    if unread is None:
        unread = False
    if not isinstance(unread, bool):
        raise f.fail("unreadOnly must be true or false")
    return GetNotifications(f.id("beforeId", required=False), _optional_limit(f), unread,
                            request_id=f.request_id)


def notification_ids(raw: Any, every: Any, limits: Limits) -> tuple[int, ...] | None:
    """``{notificationIds: [...]}`` or ``{all: true}`` (socket and HTTP alike); None = all.
    Raises ProtocolError (invalid_message) for anything else."""
    if every is not None and raw is not None:
        raise ProtocolError(INVALID_MESSAGE, "give notificationIds or all, not both")
    if every is not None:
        if every is not True:
            raise ProtocolError(INVALID_MESSAGE, "all must be true")
        return None
    if not isinstance(raw, list) or not raw:
        raise ProtocolError(INVALID_MESSAGE,
                            "notificationIds must be a non-empty list of ids, or all: true")
    if len(raw) > limits.max_notification_ids:
        raise ProtocolError(INVALID_MESSAGE,
                            f"at most {limits.max_notification_ids} notificationIds")
    ids: dict[int, None] = {}
    for value in raw:
        if not _is_int(value) or not 1 <= value <= MAX_ID:
            raise ProtocolError(INVALID_MESSAGE, "notificationIds must hold positive integers")
        ids[int(value)] = None
    return tuple(ids)


def _mark_notifications_read(f: _Fields, limits: Limits) -> MarkNotificationsRead:
    try:
        ids = notification_ids(f.frame.get("notificationIds"), f.frame.get("all"), limits)
    except ProtocolError as exc:
        raise f.fail(exc.message) from None
    return MarkNotificationsRead(ids, request_id=f.request_id)


def _has_lone_surrogate(value: Any) -> bool:
    """True if any string (key or value) in a decoded JSON value cannot be encoded as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse(text: str, limits: Limits) -> Command:
    """Parse one text frame. Raises ProtocolError with the wire code for any bad input."""
    try:
        frame = loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(INVALID_JSON, "frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError(INVALID_JSON, "frame must be a JSON object")
    # A \uD800-style escape decodes to a lone surrogate, which can be neither stored nor sent
    # back as UTF-8. Only frames with escapes can hold one.
    if "\\u" in text and _has_lone_surrogate(frame):
        raise ProtocolError(INVALID_JSON, "frame holds an unpaired surrogate escape")
    kind = frame.get("type")
    try:
        request_id = _request_id(frame, limits)
    except ProtocolError as exc:
        if kind == "send_message":
            raise send_message_error(exc.message) from None
        if isinstance(kind, str) and kind in _KEYED_BY_REQUEST_ID:
            raise
        # Elsewhere a requestId only tags the answer: one that cannot be echoed (a number,
        # say, from a client that tags every frame) is left out, not a reason to refuse.
        request_id = None
    if not isinstance(kind, str):
        raise ProtocolError(INVALID_MESSAGE, "type must be a string", request_id)
    if kind == "send_message":
        return _send_message(_Fields(frame, request_id, SEND_MESSAGE_MISSING), limits)
    f = _Fields(frame, request_id, "")
    if kind == "ping":
        return Ping(request_id=request_id)
    if kind in ("typing_start", "typing_stop"):
        conversation_id = f.required_id("conversationId")
        return Typing(conversation_id, kind == "typing_start", request_id=request_id)
    if kind == "mark_read":
        return MarkRead(f.required_id("messageId"), request_id=request_id)
    if kind == "join_conversation":
        return JoinConversation(f.required_id("conversationId"), request_id=request_id)
    if kind == "get_online_users":
        return GetOnlineUsers(request_id=request_id)
    if kind == "create_conversation":
        return _create_conversation(f, limits)
    if kind == "get_messages":
        return _get_messages(f)
    if kind == "sync":
        return _sync(f)
    if kind == "refresh_token":
        return _refresh(f)
    if kind == "get_conversations":
        return _get_conversations(f)
    if kind == "pitch_view":
        return PitchView(f.required_id("pitchId"), request_id=request_id)
    if kind == "pitch_leave":
        return PitchLeave(f.required_id("pitchId"), request_id=request_id)
    if kind in ("pitch_like", "pitch_unlike"):
        return PitchLike(f.required_id("pitchId"), kind == "pitch_like", request_id=request_id)
    if kind == "pitch_comment":
        return _pitch_comment(f, limits)
    if kind == "typing":
        return _pitch_typing(f)
    if kind == "get_pitch_activity":
        return GetPitchActivity(f.required_id("pitchId"), f.id("beforeCommentId", required=False),
                                _optional_limit(f), request_id=request_id)
    if kind == "get_notifications":
        return _get_notifications(f)
    if kind == "mark_notifications_read":
        return _mark_notifications_read(f, limits)
    raise ProtocolError(UNKNOWN_TYPE, f"unknown message type: {kind[:64]}", request_id)


def now_iso() -> str:
    """The current time as the wire timestamp format."""
    return _iso_ms(time.time_ns() // 1_000_000)


@functools.lru_cache(maxsize=1)
def _iso_ms(ms: int) -> str:
    # Formatting a datetime costs microseconds; the hot path asks many times per millisecond.
    return iso(datetime.fromtimestamp(ms / 1000, UTC))


def iso(moment: datetime) -> str:
    """``2026-11-25T21:00:00.123Z``: UTC, milliseconds, Z."""
    stamp = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.")
    return f"{stamp}{moment.microsecond // 1000:03d}Z"


def iso_from_epoch(seconds: float) -> str:
    return iso(datetime.fromtimestamp(seconds, UTC))


def encode(kind: str, **fields: Any) -> str:
    """Encode one server frame. A None value is sent as null; leave optional fields out."""
    return dumps({"type": kind, **fields})


# -- server frames: one builder per frame type (PROTOCOL.md sections 2-5) --------------------


def display_name(user_id: int, username: str | None) -> str:
    """What to show for a user with no known name."""
    return username or f"User {user_id}"


def error(
    code: str, message: str, request_id: str | None = None, retry_after_ms: int | None = None,
    detail: str | None = None, pitch_id: int | None = None,
) -> str:
    fields: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        fields["detail"] = detail
    if pitch_id is not None:
        fields["pitchId"] = pitch_id
    if request_id is not None:
        fields["requestId"] = request_id
    if retry_after_ms is not None:
        fields["retryAfterMs"] = retry_after_ms
    return encode("error", **fields)


def connected(user_id: int, username: str) -> str:
    return encode("connected", userId=user_id, username=username, timestamp=now_iso())


def pong(user_id: int) -> str:
    return encode("pong", timestamp=now_iso(), userId=user_id)


def message_fields(
    message_id: int,
    conversation_id: int,
    sender_id: int,
    sender_name: str | None,
    content: str,
    attachments: list[dict[str, Any]],
    message_type: str,
    timestamp: str,
) -> dict[str, Any]:
    """The fields ``new_message``, ``message_sent`` and a queued ``new_message`` share."""
    return {
        "messageId": message_id,
        "conversationId": conversation_id,
        "senderId": sender_id,
        "senderName": display_name(sender_id, sender_name),
        "content": content,
        "attachments": attachments,
        "messageType": message_type,
        "timestamp": timestamp,
    }


def row_fields(row: MessageRow) -> dict[str, Any]:
    """``message_fields`` of a stored message."""
    return message_fields(
        row.id, row.conversation_id, row.sender_id, row.sender_name, row.content,
        loads(row.attachments), row.message_type, row.sent_at,
    )


def new_message(fields: dict[str, Any]) -> str:
    return encode("new_message", **fields, delivered=True)


def message_sent(fields: dict[str, Any], delivered: bool, request_id: str | None) -> str:
    if request_id is None:
        return encode("message_sent", **fields, delivered=delivered)
    return encode("message_sent", **fields, delivered=delivered, requestId=request_id)


def read_fields(
    message_id: int, conversation_id: int, reader_id: int, reader_name: str | None, read_at: str
) -> dict[str, Any]:
    return {
        "messageId": message_id,
        "conversationId": conversation_id,
        "readBy": reader_id,
        "readByName": display_name(reader_id, reader_name),
        "readAt": read_at,
    }


def message_read(fields: dict[str, Any]) -> str:
    return encode("message_read", **fields)


def queued_message(original_type: str, queued_at: str, fields: dict[str, Any]) -> str:
    """A durable event replayed after ``connected`` or by ``sync`` (PROTOCOL.md 5)."""
    return encode("queued_message", **fields, originalType=original_type, queuedAt=queued_at)


def queued_new_message(row: MessageRow, queued_at: str) -> str:
    return queued_message("new_message", queued_at, {**row_fields(row), "delivered": True})


def history_entry(row: MessageRow) -> dict[str, Any]:
    """One message of ``conversation_joined`` and ``messages`` (PROTOCOL.md 4.4)."""
    return {
        "id": row.id,
        "messageId": row.id,
        "conversationId": row.conversation_id,
        "senderId": row.sender_id,
        "senderName": display_name(row.sender_id, row.sender_name),
        "content": row.content,
        "attachments": loads(row.attachments),
        "messageType": row.message_type,
        "sentAt": row.sent_at,
        "timestamp": row.sent_at,
        "isRead": row.is_read,
    }


def conversation_joined(conversation_id: int, rows: list[MessageRow]) -> str:
    return encode(
        "conversation_joined",
        conversationId=conversation_id,
        messages=[history_entry(r) for r in rows],
        timestamp=now_iso(),
    )


def messages_page(conversation_id: int, rows: list[MessageRow], has_more: bool) -> str:
    return encode(
        "messages",
        conversationId=conversation_id,
        messages=[history_entry(r) for r in rows],
        hasMore=has_more,
    )


def conversation_created(row: ConversationRow, request_id: str | None = None) -> str:
    fields: dict[str, Any] = {
        "conversationId": row.id,
        "title": row.title,
        "isGroup": row.is_group,
        "participantIds": sorted(row.members),
        "createdBy": row.created_by,
    }
    if request_id is not None:
        fields["requestId"] = request_id
    return encode("conversation_created", **fields)


def user_typing(
    user_id: int, username: str | None, conversation_id: int, is_typing: bool
) -> str:
    return encode(
        "user_typing",
        userId=user_id,
        username=display_name(user_id, username),
        conversationId=conversation_id,
        isTyping=is_typing,
        timestamp=now_iso(),
    )


def user_online(user_id: int, username: str) -> str:
    return encode("user_online", userId=user_id, username=username, timestamp=now_iso())


def user_offline(user_id: int, username: str, last_seen: str) -> str:
    return encode("user_offline", userId=user_id, username=username, lastSeen=last_seen)


class OnlineUser(NamedTuple):
    user_id: int
    username: str
    user_type: str | None
    last_seen: str | None  # set while the user is inside the offline grace period


def online_users(users: list[OnlineUser]) -> str:
    return encode(
        "online_users",
        users=[
            {
                "userId": u.user_id,
                "username": u.username,
                "userType": u.user_type,
                "isOnline": True,
                "lastSeen": u.last_seen,
            }
            for u in users
        ],
        timestamp=now_iso(),
    )


def sync_complete(last_message_id: int, has_more: bool) -> str:
    return encode("sync_complete", lastMessageId=last_message_id, hasMore=has_more)


def token_refreshed(expires_at: str | None) -> str:
    return encode("token_refreshed", expiresAt=expires_at)


def frame_type(frame: str) -> str:
    """The ``type`` of a frame built here (every builder puts it first), for metrics."""
    end = frame.find('"', 9)
    return frame[9:end] if frame.startswith('{"type":"') and end > 0 else "unknown"


# -- the inbox and the HTTP history (PROTOCOL.md 8) ------------------------------------------


def encode_cursor(cursor: tuple[str, int]) -> str:
    """An opaque inbox cursor: the last entry's activity time and id."""
    return base64.urlsafe_b64encode(f"{cursor[0]}|{cursor[1]}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[str, int]:
    """The cursor ``encode_cursor`` made; ValueError for anything else."""
    if len(text) > 128:
        raise ValueError("cursor too long")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("not a cursor") from None
    at, sep, ident = raw.rpartition("|")
    if not sep or not ident.isdigit() or not 0 < int(ident) <= MAX_ID:
        raise ValueError("not a cursor")
    return at, int(ident)


def conversation_entry(row: ConversationSummary) -> dict[str, Any]:
    """One entry of the inbox, as ``GET /api/messages/conversations`` and ``conversations``
    give it. ``pitchTitle``: the title of the pitch the conversation is about, when the
    daemon has that pitch (registered by the backend, or the app's row), else null."""
    others = [
        {"id": u.id, "name": display_name(u.id, u.username), "username": u.username,
         "userType": u.user_type}
        for u in row.others
    ]
    last = row.last_message
    last_fields = None
    if last is not None:
        last_fields = {
            "id": last.id,
            "content": last.content,
            "senderId": last.sender_id,
            "senderName": display_name(last.sender_id, last.sender_name),
            "sentAt": last.sent_at,
            "messageType": last.message_type,
            # The names a later Pitchey Messages page reads (lastMessage.createdAt or
            # .timestamp): the same instant.
            "createdAt": last.sent_at,
            "timestamp": last.sent_at,
        }
    # A group: marked so, or more than two participants (PROTOCOL.md 3), as the app's own
    # rows may leave is_group at its default.
    group = row.is_group or len(others) > 1
    one_other = not group and len(others) == 1
    return {
        "id": row.id,
        "title": row.title,
        "pitchId": row.pitch_id,
        "pitchTitle": row.pitch_title,
        "isGroup": group,
        "lastMessageAt": row.last_message_at,
        "createdAt": row.created_at,
        "participants": others,
        "lastMessage": last_fields,
        "unreadCount": row.unread_count,
        "participantName": others[0]["name"] if one_other else row.title,
        "participantType": others[0]["userType"] if one_other else None,
        "timestamp": row.last_message_at or row.created_at,
        # Aliases a later Pitchey Messages page reads (conv.participantDetails[0].name,
        # conv.updatedAt).
        "participantDetails": others,
        "updatedAt": row.last_message_at or row.created_at,
    }


def conversations(rows: list[ConversationSummary], cursor: tuple[str, int] | None,
                  request_id: str | None = None) -> str:
    fields: dict[str, Any] = {
        "conversations": [conversation_entry(r) for r in rows],
        "nextCursor": encode_cursor(cursor) if cursor is not None else None,
    }
    if request_id is not None:
        fields["requestId"] = request_id
    return encode("conversations", **fields)


def detailed_history_entry(row: MessageRow, detail: MessageDetail | None) -> dict[str, Any]:
    """The 4.4 history entry plus the fields of ``GET /api/messages/{id}/messages``."""
    entry = history_entry(row)
    name = entry["senderName"]
    entry["sender"] = {"id": row.sender_id, "name": name, "username": row.sender_name,
                       "userType": detail.sender_user_type if detail else None}
    entry["receiverId"] = detail.receiver_id if detail else None
    entry["parentMessageId"] = detail.parent_message_id if detail else None
    entry["subject"] = detail.subject if detail else None
    entry["isEdited"] = detail.is_edited if detail else False
    entry["isDeleted"] = detail.is_deleted if detail else False
    entry["editedAt"] = detail.edited_at if detail else None
    entry["readReceipts"] = [
        {"userId": r.user_id, "userName": display_name(r.user_id, r.username),
         "deliveredAt": r.delivered_at, "readAt": r.read_at}
        for r in (detail.receipts if detail else [])
    ]
    return entry


# -- pitch activity and notifications (PROTOCOL.md 9, 10) ------------------------------------


def pitch_viewed(pitch_id: int, view_count: int, viewer: tuple[int, str] | None = None) -> str:
    """``viewer`` (id, name) only in the owner's frame: only the owner learns who viewed."""
    if viewer is None:
        return encode("pitch_viewed", pitchId=pitch_id, viewCount=view_count,
                      timestamp=now_iso())
    return encode("pitch_viewed", pitchId=pitch_id, viewCount=view_count, timestamp=now_iso(),
                  userId=viewer[0], username=viewer[1])


def like_fields(pitch_id: int, like_count: int, user_id: int, username: str,
                timestamp: str) -> dict[str, Any]:
    """The fields of ``pitch_liked`` / ``pitch_unliked`` (and of the owner's notification)."""
    return {"pitchId": pitch_id, "likeCount": like_count, "userId": user_id,
            "username": username, "timestamp": timestamp}


def comment_fields(row: CommentRow) -> dict[str, Any]:
    """The fields of ``new_comment``, ``comment_sent`` and a ``pitch_activity`` comment."""
    return {"pitchId": row.pitch_id, "commentId": row.id, "userId": row.user_id,
            "username": display_name(row.user_id, row.username), "comment": row.content,
            "timestamp": row.created_at}


def comment_sent(fields: dict[str, Any], request_id: str | None) -> str:
    if request_id is None:
        return encode("comment_sent", **fields)
    return encode("comment_sent", **fields, requestId=request_id)


def pitch_user_typing(pitch_id: int, user_id: int, username: str | None,
                      is_typing: bool) -> str:
    return encode("user_typing", pitchId=pitch_id, userId=user_id,
                  username=display_name(user_id, username), isTyping=is_typing,
                  timestamp=now_iso())


def pitch_activity_fields(pitch: PitchRow, stats: PitchStats, comments: list[CommentRow],
                          has_more: bool) -> dict[str, Any]:
    return {"pitchId": pitch.id, "title": pitch.title, "ownerId": pitch.owner_id,
            "viewCount": stats.view_count, "likeCount": stats.like_count,
            "likedByMe": stats.liked_by_me, "comments": [comment_fields(c) for c in comments],
            "hasMore": has_more}


def pitch_activity(fields: dict[str, Any], request_id: str | None) -> str:
    if request_id is None:
        return encode("pitch_activity", **fields)
    return encode("pitch_activity", **fields, requestId=request_id)


def event(kind: str, fields: dict[str, Any]) -> str:
    """A frame of a type this module does not name (a backend event, a daemon-made
    notification): ``kind`` first, then the fields."""
    return encode(kind, **fields)


def notification_frame(row: NotificationRow, queued_at: str | None = None) -> str:
    """A notification as a frame of its own type: its fields, ``notificationId`` and
    ``createdAt`` (and ``queuedAt`` when replayed after ``connected``). An event published
    without a ``timestamp`` gets ``createdAt`` as one: the Pitchey frontend reads
    ``nda_signed {signedBy, timestamp, pitchId}``."""
    fields: dict[str, Any] = {"timestamp": row.created_at, **loads(row.fields),
                              "notificationId": row.id, "createdAt": row.created_at}
    if queued_at is not None:
        fields["queuedAt"] = queued_at
    return encode(row.type, **fields)


def notification_entry(row: NotificationRow) -> dict[str, Any]:
    """One entry of ``notifications`` and of ``GET /api/notifications``."""
    return {"timestamp": row.created_at, **loads(row.fields), "notificationId": row.id,
            "type": row.type, "createdAt": row.created_at, "readAt": row.read_at}


def notifications_page(rows: list[NotificationRow], unread: int, has_more: bool,
                       request_id: str | None) -> str:
    fields: dict[str, Any] = {"notifications": [notification_entry(r) for r in rows],
                              "unreadCount": unread, "hasMore": has_more}
    if request_id is not None:
        fields["requestId"] = request_id
    return encode("notifications", **fields)


def notifications_read(ids: list[int], unread: int) -> str:
    return encode("notifications_read", notificationIds=ids, unreadCount=unread)


# Every frame type the server sends (each builder above; a test checks the list against them).
# The backend may not publish events of these types (PROTOCOL.md 11): it cannot forge chat,
# presence, pitch or error frames.
SERVER_FRAME_TYPES: Final = frozenset({
    "error", "connected", "pong", "new_message", "message_sent", "message_read",
    "queued_message", "conversation_joined", "messages", "conversation_created",
    "user_typing", "user_online", "user_offline", "online_users", "sync_complete",
    "token_refreshed", "conversations", "pitch_viewed", "pitch_liked", "pitch_unliked",
    "new_comment", "comment_sent", "pitch_activity", "notifications", "notifications_read",
    "sync_required",
})
# Fields a notification frame gets from the daemon; an event may not bring its own.
NOTIFICATION_FIELDS: Final = frozenset({"type", "notificationId", "createdAt", "queuedAt",
                                        "readAt"})
EVENT_TYPE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")


def sync_required(reason: str) -> str:
    """Frames for this connection may have been lost between daemons (the backplane was
    unreachable): the client should ``sync`` from the newest messageId it has (docs/protocol.md,
    multi-node)."""
    return encode("sync_required", reason=reason, timestamp=now_iso())
