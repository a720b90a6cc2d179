"""Section 6: every malformed frame gets an error and the connection stays open."""

from __future__ import annotations

import pytest
from conftest import Connector


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json at all", "invalid_json"),
        ("[1, 2, 3]", "invalid_json"),
        ("42", "invalid_json"),
        ('{"no": "type"}', "invalid_message"),
        ('{"type": "launch_rockets"}', "unknown_type"),
        ('{"type": "send_message"}', "invalid_message"),
        ('{"type": "send_message", "conversationId": "7", "content": "x"}', "invalid_message"),
        ('{"type": "join_conversation"}', "invalid_message"),
        ('{"type": "mark_read", "messageId": -3}', "invalid_message"),
        ('{"type": "get_messages", "conversationId": 1, "limit": 0}', "invalid_message"),
        ('{"type": "create_conversation", "participantIds": "2"}', "invalid_message"),
        ('{"type": "sync", "sinceMessageId": "0"}', "invalid_message"),
        ('{"type": "refresh_token", "token": 5}', "invalid_message"),
    ],
)
async def test_error_codes(connect_to: Connector, frame: str, code: str) -> None:
    """The frame gets error with the right code, then the connection still answers ping."""
    client = await connect_to()
    await client.send(frame)
    err = await client.expect("error")
    assert err["code"] == code and isinstance(err["message"], str) and err["message"]
    await client.request({"type": "ping"}, "pong")


async def test_send_message_missing_fields_text(connect_to: Connector) -> None:
    """A send_message without content answers the reference's text, with the requestId."""
    client = await connect_to()
    err = await client.request(
        {"type": "send_message", "conversationId": 1, "requestId": "r9"}, "error"
    )
    assert err == {"type": "error", "code": "invalid_message",
                   "message": "Missing required fields for message", "requestId": "r9"}


@pytest.mark.parametrize(("fields", "detail"), [
    ({"conversationId": "7", "content": "x"}, "conversationId must be an integer"),
    ({"conversationId": -1, "content": "x"}, "conversationId must be a positive integer"),
    ({"recipientId": "102", "content": "x"}, "recipientId must be an integer"),
    ({"conversationId": 1, "content": "x", "requestId": 5},
     "requestId must be a non-empty string"),
    ({"conversationId": 1, "content": "x" * 10_001},
     "content is longer than 10000 characters"),
    ({"conversationId": 1, "content": "x", "attachments": "x"}, "attachments must be a list"),
    ({"conversationId": 1, "content": "x", "messageType": 5}, "messageType must be a string"),
    ({"conversationId": 1, "content": "x", "pitchId": "x"}, "pitchId must be an integer"),
])
async def test_send_message_errors_keep_the_reference_text(
        connect_to: Connector, fields: dict[str, object], detail: str) -> None:
    """Every invalid send_message, missing or mistyped, is invalid_message with the text
    PROTOCOL.md 6 fixes for it; what exactly is wrong is in ``detail``."""
    client = await connect_to()
    err = await client.request({"type": "send_message", **fields}, "error")
    assert err["code"] == "invalid_message"
    assert err["message"] == "Missing required fields for message"
    assert err["detail"] == detail
    me = {"type": "send_message", "recipientId": client.user_id, "content": "x",
          "requestId": "self"}
    err = await client.request(me, "error")
    assert err == {"type": "error", "code": "invalid_message", "requestId": "self",
                   "message": "Missing required fields for message",
                   "detail": "recipientId must be another user"}


async def test_binary_frame_closes_1003(connect_to: Connector) -> None:
    """A binary frame closes the connection with 1003."""
    client = await connect_to()
    await client.ws.send(b"\x00\x01binary")
    assert await client.closed() == 1003


async def test_too_big_closes_1009(connect_to: Connector) -> None:
    """A frame over server.max_message_bytes (64 KiB by default) closes with 1009."""
    client = await connect_to()
    await client.send('{"type":"ping","pad":"' + "x" * 70000 + '"}')
    assert await client.closed() == 1009


async def test_errors_echo_request_id_for_every_type(connect_to: Connector) -> None:
    """A refused request of any type echoes its requestId, so clients can pair replies."""
    client = await connect_to()
    for frame in (
        {"type": "join_conversation", "conversationId": 10**12, "requestId": "j1"},
        {"type": "get_messages", "conversationId": 10**12, "requestId": "g1"},
        {"type": "typing_start", "conversationId": 10**12, "requestId": "t1"},
        {"type": "mark_read", "messageId": 10**12, "requestId": "m1"},
        {"type": "refresh_token", "token": "garbage", "requestId": "r1"},
        {"type": "no_such_thing", "requestId": "u1"},
    ):
        err = await client.request(frame, "error")
        assert err["requestId"] == frame["requestId"], (frame, err)
