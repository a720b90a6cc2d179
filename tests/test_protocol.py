"""protocol.py without a loop or a socket: parsing and encoding."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import protocol as p

LIMITS = p.Limits()


def code_of(text: str) -> str:
    with pytest.raises(p.ProtocolError) as info:
        p.parse(text, LIMITS)
    return info.value.code


def test_not_json_and_not_object() -> None:
    """Garbage and non-objects are invalid_json."""
    assert code_of("{nope") == p.INVALID_JSON
    assert code_of("[1, 2]") == p.INVALID_JSON
    assert code_of('"text"') == p.INVALID_JSON
    assert code_of("[" * 100000) == p.INVALID_JSON


def test_type_checks() -> None:
    """A missing or non-string type is invalid_message; an unknown one unknown_type."""
    assert code_of("{}") == p.INVALID_MESSAGE
    assert code_of('{"type": 5}') == p.INVALID_MESSAGE
    assert code_of('{"type": "teleport"}') == p.UNKNOWN_TYPE


def test_send_message_parses() -> None:
    """A full send_message becomes a SendMessage with attachments."""
    frame = {
        "type": "send_message", "conversationId": 3, "recipientId": 9, "content": "hi",
        "requestId": "r-1", "messageType": "pitch", "pitchId": 7, "subject": "s",
        "attachments": [{"type": "file", "url": "u", "filename": "f", "size": 3,
                         "mimeType": "text/plain"}],
    }
    cmd = p.parse(json.dumps(frame), LIMITS)
    assert isinstance(cmd, p.SendMessage)
    assert cmd.conversation_id == 3 and cmd.recipient_id is None  # conversationId wins
    assert cmd.request_id == "r-1" and cmd.message_type == "pitch" and cmd.pitch_id == 7
    assert cmd.attachments[0].to_wire()["mimeType"] == "text/plain"


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "send_message", "content": "no target"},
        {"type": "send_message", "conversationId": 1},
        {"type": "send_message", "conversationId": 1, "content": ""},
        {"type": "send_message", "conversationId": 1, "content": "   "},
        {"type": "send_message", "conversationId": 1, "content": 5},
    ],
)
def test_send_message_missing_fields(frame: dict[str, object]) -> None:
    """Missing target or content answers the reference's message text."""
    with pytest.raises(p.ProtocolError) as info:
        p.parse(json.dumps(frame), LIMITS)
    assert info.value.code == p.INVALID_MESSAGE
    assert info.value.message == p.SEND_MESSAGE_MISSING


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "send_message", "conversationId": "1", "content": "x"},
        {"type": "send_message", "conversationId": True, "content": "x"},
        {"type": "send_message", "conversationId": 0, "content": "x"},
        {"type": "send_message", "conversationId": 2**64, "content": "x"},
        {"type": "send_message", "conversationId": 1.5, "content": "x"},
        {"type": "send_message", "conversationId": 1, "content": "x" * 10001},
        {"type": "send_message", "conversationId": 1, "content": "x", "requestId": "r" * 129},
        {"type": "send_message", "conversationId": 1, "content": "x", "requestId": 5},
        {"type": "send_message", "conversationId": 1, "content": "x", "attachments": {}},
        {"type": "send_message", "conversationId": 1, "content": "x", "attachments": [1]},
        {"type": "send_message", "conversationId": 1, "content": "x",
         "attachments": [{"type": "f", "url": "u", "filename": "f", "size": -1}]},
        {"type": "send_message", "conversationId": 1, "content": "x",
         "attachments": [{"type": "f", "url": "u" * 3000, "filename": "f", "size": 1}]},
        {"type": "send_message", "conversationId": 1, "content": "x",
         "attachments": [{"type": "f", "url": "u", "filename": "f", "size": 1}] * 11},
        {"type": "typing_start"},
        {"type": "mark_read", "messageId": None},
        {"type": "join_conversation", "conversationId": []},
        {"type": "create_conversation", "participantIds": []},
        {"type": "create_conversation", "participantIds": [1, "2"]},
        {"type": "create_conversation", "participantIds": list(range(1, 1002))},
        {"type": "create_conversation", "participantIds": [2], "title": 3},
        {"type": "get_messages", "conversationId": 1, "limit": 0},
        {"type": "get_messages", "conversationId": 1, "limit": "5"},
        {"type": "sync"},
        {"type": "sync", "sinceMessageId": -1},
        {"type": "refresh_token"},
    ],
)
def test_invalid_fields(frame: dict[str, object]) -> None:
    """Each mistyped or out-of-range field is invalid_message."""
    assert code_of(json.dumps(frame)) == p.INVALID_MESSAGE


@pytest.mark.parametrize("request_id", [5, "", "r" * 129, None, ["x"]])
def test_a_request_id_that_only_tags_the_answer_may_be_anything(request_id: object) -> None:
    """On frames whose requestId is only echoed, one that is not a usable string is left out
    (a client may tag every frame with a number); where it makes a repeat answer as the first
    (send_message, create_conversation, pitch_comment), it is refused."""
    cmd = p.parse(json.dumps({"type": "ping", "requestId": request_id}), LIMITS)
    assert isinstance(cmd, p.Ping) and cmd.request_id is None
    with pytest.raises(p.ProtocolError) as info:
        p.parse(json.dumps({"type": "nope", "requestId": request_id}), LIMITS)
    assert info.value.code == p.UNKNOWN_TYPE
    if request_id is None:
        return
    for frame in ({"type": "create_conversation", "participantIds": [2]},
                  {"type": "pitch_comment", "pitchId": 1, "comment": "c"}):
        assert code_of(json.dumps({**frame, "requestId": request_id})) == p.INVALID_MESSAGE


@pytest.mark.parametrize("kind", [[], {}, 5, None])
def test_a_bad_type_with_a_bad_request_id_is_invalid_message(kind: object) -> None:
    """A type that is not a string beside a requestId that is not one: invalid_message, not
    an exception out of the parser (which closed the connection with 1011)."""
    assert code_of(json.dumps({"type": kind, "requestId": 1})) == p.INVALID_MESSAGE


def test_parse_errors_of_pitch_frames_name_the_pitch() -> None:
    """A pitch frame refused for a later field names the pitchId it did read."""
    for frame in ({"type": "pitch_comment", "pitchId": 41, "comment": ""},
                  {"type": "get_pitch_activity", "pitchId": 41, "limit": 0},
                  {"type": "typing", "pitchId": 41, "isTyping": "yes"}):
        with pytest.raises(p.ProtocolError) as info:
            p.parse(json.dumps(frame), LIMITS)
        assert info.value.code == p.INVALID_MESSAGE and info.value.pitch_id == 41, frame


def test_request_id_travels_with_errors() -> None:
    """An error for a frame with a valid requestId carries it."""
    with pytest.raises(p.ProtocolError) as info:
        p.parse(json.dumps({"type": "send_message", "requestId": "abc"}), LIMITS)
    assert info.value.request_id == "abc"


def test_create_conversation_dedupes() -> None:
    """Repeated participant ids count once."""
    cmd = p.parse('{"type":"create_conversation","participantIds":[2,2,3]}', LIMITS)
    assert isinstance(cmd, p.CreateConversation) and cmd.participant_ids == (2, 3)


def test_encode_and_error() -> None:
    """Frames encode compactly; error leaves out absent optional fields."""
    assert json.loads(p.encode("pong", userId=1)) == {"type": "pong", "userId": 1}
    assert json.loads(p.error("forbidden", "no")) == {
        "type": "error", "code": "forbidden", "message": "no"
    }
    frame = json.loads(p.error("rate_limited", "slow", "r", 250))
    assert frame["requestId"] == "r" and frame["retryAfterMs"] == 250


def test_timestamps() -> None:
    """Timestamps are UTC with milliseconds and Z."""
    stamp = p.iso_from_epoch(1764104400.1234)
    assert stamp == "2025-11-25T21:00:00.123Z"
    assert p.now_iso().endswith("Z") and len(p.now_iso()) == 24


# -- numbers: the same answer from both JSON paths ------------------------------------------

BOTH_CODECS = pytest.mark.parametrize(
    "codec",
    [p.std_loads, pytest.param(p.fast_loads, marks=pytest.mark.skipif(
        p.orjson is None, reason="orjson is not installed"))],
    ids=["json", "orjson"],
)

OUT_OF_RANGE = "must be a positive integer"
NOT_INTEGER = "must be an integer"


def outcome_with(codec: object, text: str) -> tuple[str, str]:
    """(code, reason) of the error ``parse`` raises with ``codec`` as the JSON reader: the
    reason is the error's detail when its message is send_message's fixed text."""
    saved = p.loads
    p.loads = codec  # type: ignore[assignment]
    try:
        with pytest.raises(p.ProtocolError) as info:
            p.parse(text, LIMITS)
    finally:
        p.loads = saved
    if '"send_message"' in text:
        assert info.value.message == p.SEND_MESSAGE_MISSING, text
    return info.value.code, info.value.detail or info.value.message


@BOTH_CODECS
@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("18446744073709551617", OUT_OF_RANGE),  # 2**64 + 1: orjson made it a float
        ("18446744073709551616", OUT_OF_RANGE),
        ("9223372036854775808", OUT_OF_RANGE),  # 2**63: past SQLite's integers
        ("-9223372036854775809", OUT_OF_RANGE),
        ("-99999999999999999999999", OUT_OF_RANGE),
        ("123456789012345678901234567890", OUT_OF_RANGE),
        ("-0", OUT_OF_RANGE),
        ("0", OUT_OF_RANGE),
        ("1e3", NOT_INTEGER),
        ("1.0", NOT_INTEGER),
        ("-0.0", NOT_INTEGER),
        ("1E400", None),  # infinity as a double: the std reader takes it as inf
    ],
)
def test_ids_must_be_integers_in_range(codec: object, literal: str, expected: str | None) -> None:
    """An id out of range or not an integer is the same invalid_message on both JSON paths."""
    for frame in (
        '{"type":"send_message","conversationId":%s,"content":"x"}',
        '{"type":"send_message","recipientId":%s,"content":"x"}',
        '{"type":"typing_start","conversationId":%s}',
        '{"type":"mark_read","messageId":%s}',
        '{"type":"join_conversation","conversationId":%s}',
        '{"type":"get_messages","conversationId":%s}',
        '{"type":"get_messages","conversationId":1,"beforeMessageId":%s}',
        '{"type":"send_message","conversationId":1,"content":"x","pitchId":%s}',
    ):
        code, message = outcome_with(codec, frame % literal)
        assert code == p.INVALID_MESSAGE, (frame, literal)
        assert message.endswith(expected or NOT_INTEGER), (frame, literal, message)
        assert (code, message) == outcome_with(p.std_loads, frame % literal)


@BOTH_CODECS
@pytest.mark.parametrize(
    "text",
    [
        '{"type":"create_conversation","participantIds":[2,18446744073709551617]}',
        '{"type":"create_conversation","participantIds":[2,1e3]}',
        '{"type":"sync","sinceMessageId":18446744073709551617}',
        '{"type":"sync","sinceMessageId":-99999999999999999999999}',
        '{"type":"sync","sinceMessageId":1.0}',
        '{"type":"get_messages","conversationId":1,"limit":18446744073709551617}',
        '{"type":"get_messages","conversationId":1,"limit":-99999999999999999999999}',
        '{"type":"get_messages","conversationId":1,"limit":1e3}',
        '{"type":"send_message","conversationId":1,"content":"x",'
        '"attachments":[{"type":"f","url":"u","filename":"f","size":18446744073709551617}]}',
        '{"type":"send_message","conversationId":1,"content":"x",'
        '"attachments":[{"type":"f","url":"u","filename":"f","size":1.0}]}',
    ],
)
def test_numbers_refused_alike(codec: object, text: str) -> None:
    """Huge, negative and fractional numbers in lists, cursors, limits and sizes are the same
    invalid_message on both JSON paths."""
    code, message = outcome_with(codec, text)
    assert code == p.INVALID_MESSAGE
    assert (code, message) == outcome_with(p.std_loads, text)


@BOTH_CODECS
def test_big_integers_in_content_stay_text(codec: object) -> None:
    """Long digit runs inside strings and in-range 19-digit ids parse the same on both paths."""
    saved = p.loads
    p.loads = codec  # type: ignore[assignment]
    try:
        cmd = p.parse('{"type":"send_message","conversationId":9223372036854775807,'
                      '"content":"call 123456789012345678901234567890"}', LIMITS)
    finally:
        p.loads = saved
    assert isinstance(cmd, p.SendMessage)
    assert cmd.conversation_id == 2**63 - 1
    assert cmd.content == "call 123456789012345678901234567890"
