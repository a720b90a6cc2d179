"""Fuzzing the parser (property tests of ``protocol.parse``) and a live socket with junk frames.

``parse`` must turn any input into a command or a ``ProtocolError`` with a wire code; a
command must hold exactly what the frame said, within the limits; and the daemon must answer
any junk with an error frame (never ``internal``) and keep the connection open.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Connector, Daemon, conversation
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(ROOT))
import protocol

SECTION_6_CODES = {"invalid_json", "invalid_message", "unknown_type", "forbidden",
                   "rate_limited", "internal"}
# What a parser can know; the other section-6 codes need the server's state.
PARSE_CODES = {"invalid_json", "invalid_message", "unknown_type"}
LIMITS = protocol.Limits()
MAX_ID = 2**63 - 1
TYPES = ["ping", "send_message", "typing_start", "typing_stop", "mark_read",
         "join_conversation", "get_online_users", "create_conversation", "get_messages",
         "sync", "refresh_token"]
COMMANDS = (protocol.Ping, protocol.SendMessage, protocol.Typing, protocol.MarkRead,
            protocol.JoinConversation, protocol.GetOnlineUsers, protocol.CreateConversation,
            protocol.GetMessages, protocol.Sync, protocol.RefreshToken)

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Strings as a JSON peer can send them: any code point, unpaired surrogates included
# (json.dumps writes those as \ud800-style escapes, which json.loads accepts).
chars = st.one_of(st.characters(), st.characters(categories=["Cs"]))
strings = st.one_of(st.text(chars, max_size=20), st.sampled_from(TYPES), st.just(""))
ints = st.one_of(
    st.integers(),
    st.integers(min_value=-2, max_value=5),
    st.sampled_from([0, -1, MAX_ID, MAX_ID + 1, 2**64, -(2**63), 10**40]),
)
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), strings)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(strings, children, max_size=5),
    max_leaves=25,
)
FIELDS = ["conversationId", "recipientId", "content", "requestId", "attachments", "messageType",
          "pitchId", "subject", "messageId", "participantIds", "title", "beforeMessageId",
          "limit", "sinceMessageId", "token"]


def outcome(text: str) -> protocol.Command | protocol.ProtocolError:
    """parse(), with the only exception it may raise turned into a value."""
    try:
        command = protocol.parse(text, LIMITS)
    except protocol.ProtocolError as exc:
        assert exc.code in PARSE_CODES <= SECTION_6_CODES, exc.code
        assert isinstance(exc.message, str) and exc.message
        assert exc.request_id is None or (
            isinstance(exc.request_id, str)
            and 1 <= len(exc.request_id) <= LIMITS.max_request_id_chars
        )
        return exc
    assert isinstance(command, COMMANDS), command
    return command


def is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


def check_command(cmd: protocol.Command, frame: dict[str, Any]) -> None:
    """A command holds exactly the frame's values, each of the right type and within limits."""
    kind = frame["type"]
    if isinstance(cmd, protocol.SendMessage):
        assert kind == "send_message"
        assert isinstance(cmd.content, str) and cmd.content.strip()
        assert cmd.content == frame["content"]
        assert len(cmd.content) <= LIMITS.max_content_chars
        if cmd.conversation_id is not None:
            assert is_id(cmd.conversation_id) and cmd.conversation_id == frame["conversationId"]
            assert cmd.recipient_id is None
        else:
            assert is_id(cmd.recipient_id) and cmd.recipient_id == frame["recipientId"]
        assert len(cmd.attachments) <= LIMITS.max_attachments
        for a, raw in zip(cmd.attachments, frame.get("attachments") or [], strict=True):
            for name in ("type", "url", "filename"):
                value = raw[name]
                assert isinstance(value, str) and len(value) <= LIMITS.max_attachment_field_chars
            assert isinstance(a.size, int) and not isinstance(a.size, bool) and a.size >= 0
        assert isinstance(cmd.message_type, str)
        assert cmd.pitch_id is None or is_id(cmd.pitch_id)
        assert cmd.subject is None or len(cmd.subject) <= LIMITS.max_title_chars
        assert cmd.request_id == frame.get("requestId")
    elif isinstance(cmd, protocol.Typing):
        assert kind in ("typing_start", "typing_stop")
        assert cmd.is_typing == (kind == "typing_start")
        assert is_id(cmd.conversation_id) and cmd.conversation_id == frame["conversationId"]
    elif isinstance(cmd, protocol.MarkRead):
        assert kind == "mark_read" and is_id(cmd.message_id)
        assert cmd.message_id == frame["messageId"]
    elif isinstance(cmd, protocol.JoinConversation):
        assert kind == "join_conversation" and cmd.conversation_id == frame["conversationId"]
        assert is_id(cmd.conversation_id)
    elif isinstance(cmd, protocol.CreateConversation):
        assert kind == "create_conversation"
        assert cmd.participant_ids and all(is_id(u) for u in cmd.participant_ids)
        assert list(cmd.participant_ids) == list(dict.fromkeys(frame["participantIds"]))
        assert len(cmd.participant_ids) <= LIMITS.max_participants
        assert cmd.title is None or len(cmd.title) <= LIMITS.max_title_chars
    elif isinstance(cmd, protocol.GetMessages):
        assert kind == "get_messages" and is_id(cmd.conversation_id)
        assert cmd.limit is None or (isinstance(cmd.limit, int) and cmd.limit >= 1)
        assert cmd.before_message_id is None or is_id(cmd.before_message_id)
    elif isinstance(cmd, protocol.Sync):
        assert kind == "sync" and cmd.since_message_id == frame["sinceMessageId"]
        assert isinstance(cmd.since_message_id, int) and 0 <= cmd.since_message_id <= MAX_ID
    elif isinstance(cmd, protocol.RefreshToken):
        assert kind == "refresh_token" and cmd.token == frame["token"]
    elif isinstance(cmd, protocol.Ping):
        assert kind == "ping"
    else:
        assert isinstance(cmd, protocol.GetOnlineUsers) and kind == "get_online_users"


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [s for f in dataclasses.fields(value) for s in strings_in(getattr(value, f.name))]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in strings_in(item)]
    return []


# -- any input -----------------------------------------------------------------------------


@FUZZ
@given(json_values)
def test_parse_any_json_value(value: Any) -> None:
    """Any JSON value parses to a command or a ProtocolError with a wire code."""
    result = outcome(json.dumps(value))
    if not isinstance(value, dict):
        assert isinstance(result, protocol.ProtocolError) and result.code == "invalid_json"
    elif isinstance(result, COMMANDS):
        check_command(result, value)


@FUZZ
@given(st.text(chars))
@example("")
@example("[" * 100_000)
@example('{"type": "ping", "n": ' + "9" * 5000 + "}")
@example('{"type": "send_message", "conversationId": NaN, "content": "x"}')
@example('{"type": "sync", "sinceMessageId": 1e400}')
@example('{"type": "ping"}{"type": "ping"}')
def test_parse_any_text(text: str) -> None:
    """Any text, however broken or deep, yields a command or a ProtocolError."""
    outcome(text)


@FUZZ
@given(st.binary())
def test_parse_any_bytes(data: bytes) -> None:
    """Any bytes, decoded with replacement, yield a command or a ProtocolError."""
    outcome(data.decode("utf-8", errors="replace"))


@st.composite
def typed_frames(draw: st.DrawFn) -> dict[str, Any]:
    """A frame of a real type whose known fields hold values of any JSON type."""
    frame: dict[str, Any] = {"type": draw(st.sampled_from(TYPES))}
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=6)):
        frame[name] = draw(json_values)
    return frame


@FUZZ
@given(typed_frames())
def test_parse_typed_frames_with_random_fields(frame: dict[str, Any]) -> None:
    """Known types with fields of random types: a faithful command or a wire error."""
    result = outcome(json.dumps(frame))
    if isinstance(result, COMMANDS):
        check_command(result, frame)


# -- good input is accepted ----------------------------------------------------------------

ids = st.integers(min_value=1, max_value=MAX_ID)
# Valid text is encodable as UTF-8: no lone surrogates (those are refused, see above).
# Stored text holds no U+0000 (protocol.NO_NUL): a frame with one is invalid, not valid.
valid_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
texts = st.text(valid_chars, min_size=1, max_size=40).filter(lambda s: s.strip())
attachment = st.fixed_dictionaries(
    {"type": texts, "url": texts, "filename": texts, "size": st.integers(0, MAX_ID)},
    optional={"mimeType": texts},
)


@st.composite
def valid_frames(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(TYPES))
    frame: dict[str, Any] = {"type": kind}
    if draw(st.booleans()):
        frame["requestId"] = draw(
            st.text(valid_chars, min_size=1, max_size=LIMITS.max_request_id_chars)
        )
    if kind == "send_message":
        frame[draw(st.sampled_from(["conversationId", "recipientId"]))] = draw(ids)
        frame["content"] = draw(texts)
        frame["attachments"] = draw(st.lists(attachment, max_size=LIMITS.max_attachments))
    elif kind in ("typing_start", "typing_stop", "join_conversation"):
        frame["conversationId"] = draw(ids)
    elif kind == "mark_read":
        frame["messageId"] = draw(ids)
    elif kind == "create_conversation":
        frame["participantIds"] = draw(st.lists(ids, min_size=1, max_size=20))
    elif kind == "get_messages":
        frame["conversationId"] = draw(ids)
        frame["limit"] = draw(st.integers(1, 10**6))
    elif kind == "sync":
        frame["sinceMessageId"] = draw(st.integers(0, MAX_ID))
    elif kind == "refresh_token":
        frame["token"] = draw(texts)
    return frame


@FUZZ
@given(valid_frames())
def test_parse_accepts_valid_frames(frame: dict[str, Any]) -> None:
    """Every well-formed frame of every type parses to its command, values unchanged."""
    result = outcome(json.dumps(frame))
    assert isinstance(result, COMMANDS), result
    check_command(result, frame)


@pytest.mark.parametrize("value", [True, False, 1.0, 0, -5, MAX_ID + 1, "7", [7], None])
def test_ids_must_be_positive_64_bit_integers(value: Any) -> None:
    """Booleans, floats, strings, zero, negatives and ids past 2**63-1 are invalid_message."""
    frame = {"type": "join_conversation", "conversationId": value}
    result = outcome(json.dumps(frame))
    assert isinstance(result, protocol.ProtocolError) and result.code == "invalid_message"
    assert isinstance(outcome(json.dumps({**frame, "conversationId": MAX_ID})),
                      protocol.JoinConversation)


@FUZZ
@given(json_values)
@example({"type": "send_message", "conversationId": 1, "content": "\ud800"})
@example({"type": "nope\udfff"})
@example({"type": "send_message", "requestId": "\ud800", "conversationId": "x", "content": "x"})
def test_parse_results_are_utf8_encodable(value: Any) -> None:
    """What parse returns is stored and echoed as UTF-8, so it never holds a lone surrogate."""
    result = outcome(json.dumps(value))
    if isinstance(result, protocol.ProtocolError):
        texts_out = [result.message, result.request_id or ""]
    else:
        texts_out = strings_in(result)
    for text in texts_out:
        text.encode("utf-8")  # raises UnicodeEncodeError on an unpaired surrogate


# -- orjson and the standard library agree -------------------------------------------------

needs_orjson = pytest.mark.skipif(protocol.orjson is None, reason="orjson is not installed")


def outcome_with(codec: Any, text: str) -> Any:
    """parse() with protocol's JSON codec set to ``codec``, as a comparable value."""
    saved = protocol.loads
    protocol.loads = codec
    try:
        result = outcome(text)
    finally:
        protocol.loads = saved
    if isinstance(result, protocol.ProtocolError):
        return (result.code, result.message, result.request_id)
    return result


@needs_orjson
@FUZZ
@given(st.one_of(json_values.map(json.dumps), typed_frames().map(json.dumps), st.text(chars)))
@example('{"type": "send_message", "conversationId": NaN, "content": "x"}')
@example('{"type": "sync", "sinceMessageId": ' + str(2**64) + "}")
@example('{"type": "mark_read", "messageId": ' + str(2**64 + 1) + "}")
@example('{"type": "get_messages", "conversationId": 1, "limit": ' + str(-(10**23)) + "}")
@example('{"type": "send_message", "conversationId": 1, "content": "\\ud800"}')
@example("[" * 5000 + "]" * 5000)
@example('{"type": "ping", "requestId": "a", "requestId": "b"}')
def test_codecs_parse_alike(text: str) -> None:
    """Every frame gets the same command or the same error from orjson as from json."""
    assert outcome_with(protocol.fast_loads, text) == outcome_with(protocol.std_loads, text)


# Server frames hold no floats (NaN and infinities are where orjson and json differ).
wire_values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, strings),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(strings, children, max_size=5),
    max_leaves=25,
)


@needs_orjson
@FUZZ
@given(wire_values)
@example({"content": "caf\u00e9 \U0001f3ac \u2028 \x00\x1f\x7f \"q\" \\ </script>"})
@example({"name": "\ud800"})
@example({"id": 2**64})
def test_codecs_encode_alike(value: Any) -> None:
    """Every server frame is the same text from orjson as from json (compact, UTF-8)."""
    assert protocol.fast_dumps(value) == protocol.std_dumps(value)


# -- a live socket -------------------------------------------------------------------------

FRAME_TYPES = {"pong", "online_users", "conversation_joined", "messages", "sync_complete",
               "queued_message", "message_sent", "new_message", "conversation_created",
               "user_typing", "message_read", "token_refreshed", "error", "user_online",
               "user_offline"}


def junk(rng: random.Random, conv: int) -> str:
    """One malformed or odd frame, always under the frame-size limit, no lone surrogates."""

    def value(depth: int = 0) -> Any:
        makers = [
            lambda: None, lambda: True, lambda: rng.randint(-3, 3),
            lambda: 10 ** rng.randint(18, 60), lambda: -(2**63), lambda: rng.random() * 1e300,
            lambda: "".join(chr(rng.randint(32, 0xD7FF)) for _ in range(5)),
            lambda: rng.choice(TYPES), lambda: conv, lambda: "",
            lambda: [value(depth + 1) for _ in range(3)],
            lambda: {rng.choice(FIELDS): value(depth + 1) for _ in range(3)},
        ]
        return rng.choice(makers if depth < 3 else makers[:-2])()

    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice(["", " ", "{", "}", "null", "[]", "nan", "{'type': 'ping'}",
                           '{"type": "ping"', "\x00", "\ufeff{}", '"ping"', "1e999999"])
    if kind == 1:
        return "[" * 20_000 + "]" * 20_000
    if kind == 2:
        return '{"type": "sync", "sinceMessageId": ' + "9" * rng.randint(20, 5000) + "}"
    if kind == 3:
        return json.dumps({"type": f"no_such_{rng.randrange(1000)}", "x": value()})
    if kind == 4:
        return json.dumps(value())
    frame: dict[str, Any] = {"type": rng.choice(TYPES)}
    for name in rng.sample(FIELDS, rng.randint(0, 5)):
        frame[name] = value()
    if kind == 5 and rng.random() < 0.5:
        frame["type"] = value()
    text = json.dumps(frame, allow_nan=True)
    return text if len(text) < 60_000 else '{"type": 1}'


async def test_socket_survives_junk_frames(tmp_path: Path) -> None:
    """Hundreds of junk frames each get errors, never internal; socket and server stay up."""
    d = Daemon(tmp_path, {"limits.frames_per_second": 100000, "limits.frames_burst": 100000})
    d.start()
    connector = Connector(d)
    try:
        a = await connector()
        b = await connector()
        conv = await conversation(a, b.user_id)
        rng = random.Random(20261125)
        mark = 10**12
        errors: dict[str, int] = {}
        for i in range(400):
            text = junk(rng, conv)
            await a.send(text)
            # A sync past every id answers with our own cursor: a marker nothing else produces.
            await a.send({"type": "sync", "sinceMessageId": mark + i})
            while True:
                frame = await a.recv()
                kind = frame.get("type")
                assert kind in FRAME_TYPES, frame
                if kind == "sync_complete" and frame["lastMessageId"] == mark + i:
                    break
                if kind == "error":
                    code = frame["code"]
                    assert code in SECTION_6_CODES and code != "internal", (text[:200], frame)
                    errors[code] = errors.get(code, 0) + 1
        # Each kind of junk was met and refused.
        assert {"invalid_json", "invalid_message", "unknown_type"} <= set(errors), errors
        assert (await a.request({"type": "ping"}, "pong"))["userId"] == a.user_id
        fresh = await connector()
        await fresh.request({"type": "ping"}, "pong")
        status, _, body = d.get("/api/health")
        assert status == 200 and json.loads(body)["status"] == "healthy"
    finally:
        await connector.close_all()
        d.stop()


@pytest.mark.parametrize(
    "template",
    [
        '{"type": "send_message", "conversationId": %(conv)d, "content": "a \\ud800 b"}',
        '{"type": "create_conversation", "participantIds": [%(other)d], "title": "\\udfff"}',
        '{"type": "no_such_type\\ud800"}',
        '{"type": "join_conversation", "conversationId": "x", "requestId": "\\udbff"}',
    ],
    ids=["content", "title", "unknown_type_name", "echoed_requestId"],
)
async def test_unpaired_surrogate_is_a_client_error(
    daemon: Daemon, connect_to: Connector, template: str
) -> None:
    """A JSON string with an unpaired surrogate escape gets a client error; the socket lives."""
    a = await connect_to()
    b = await connect_to()
    conv = await conversation(a, b.user_id)
    await a.send(template % {"conv": conv, "other": b.user_id})
    err = await a.expect("error")
    assert err["code"] in {"invalid_json", "invalid_message", "unknown_type"}, err
    assert (await a.request({"type": "ping"}, "pong"))["userId"] == a.user_id
    rows = daemon.query("SELECT COUNT(*) FROM messages WHERE sender_id = ?", (a.user_id,))
    assert rows == [(0,)]
