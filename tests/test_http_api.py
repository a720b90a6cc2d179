"""The HTTP API of PROTOCOL.md section 8 over real HTTP against the real daemon, beside sockets."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SCALE,
    TIMEOUT,
    Client,
    Connector,
    Daemon,
    conversation,
    make_token,
    new_user,
    running,
)

ORIGIN = "https://app.pitchey.test"


def call(
    port: int, method: str, path: str, body: Any = None, *, token: str | None = None,
    headers: dict[str, str] | None = None, raw: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request; the answer's status, headers (lower-case names) and JSON (or bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        payload = response.read()
        got = {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    if got.get("content-type") == "application/json" and payload:
        return response.status, got, json.loads(payload)
    return response.status, got, payload


def raw_request(port: int, data: bytes) -> bytes:
    """Send raw bytes; everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        return read_all(s)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends on ``sock`` until it closes."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


async def acall(*args: Any, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    return await asyncio.to_thread(call, *args, **kwargs)


def tok(user_id: int, name: str | None = None, **claims: Any) -> str:
    return make_token(user_id, username=name or f"user{user_id}", **claims)


MESSAGE_KEYS = {"id", "messageId", "conversationId", "senderId", "senderName", "content",
                "attachments", "messageType", "sentAt", "timestamp", "isRead"}
DETAIL_KEYS = {"receiverId", "parentMessageId", "subject", "isEdited", "isDeleted", "editedAt",
               "sender", "readReceipts"}
CONVERSATION_KEYS = {"id", "title", "pitchId", "pitchTitle", "isGroup", "lastMessageAt",
                     "createdAt", "participants", "lastMessage", "unreadCount",
                     "participantName", "participantType", "timestamp"}


async def test_send_over_http_reaches_sockets_once(daemon: Daemon, connect_to: Connector) -> None:
    """POST send: 201 with the history entry; new_message once to the other user and to the
    sender's own socket; a repeat with the same Idempotency-Key stores and sends nothing."""
    alice = await connect_to(username="Alice")
    bob = await connect_to(username="Bob")
    cid = await conversation(alice, bob.user_id)
    status, headers, body = await acall(
        daemon.port, "POST", "/api/messages/send",
        {"conversationId": cid, "content": "over http"}, token=tok(alice.user_id, "Alice"),
        headers={"Idempotency-Key": "k-1"},
    )
    assert status == 201 and headers["content-type"] == "application/json", body
    assert body["success"] is True
    message = body["message"]
    assert set(message) >= MESSAGE_KEYS
    assert message["id"] == message["messageId"] and message["sentAt"] == message["timestamp"]
    assert message["content"] == "over http" and message["senderName"] == "Alice"
    assert message["conversationId"] == cid and message["senderId"] == alice.user_id
    live = await bob.expect("new_message", messageId=message["id"])
    assert live["content"] == "over http" and "requestId" not in live
    mine = await alice.expect("new_message", messageId=message["id"])
    assert mine["senderId"] == alice.user_id
    again = await acall(
        daemon.port, "POST", "/api/messages/send",
        {"conversationId": cid, "content": "over http"}, token=tok(alice.user_id, "Alice"),
        headers={"Idempotency-Key": "k-1"},
    )
    assert again[0] == 201 and again[2]["message"]["id"] == message["id"]
    # "requestId": null is no requestId: the header still makes the retry a repeat.
    third = await acall(
        daemon.port, "POST", "/api/messages/send",
        {"conversationId": cid, "content": "over http", "requestId": None},
        token=tok(alice.user_id, "Alice"), headers={"Idempotency-Key": "k-1"},
    )
    assert third[0] == 201 and third[2]["message"]["id"] == message["id"]
    await bob.quiet("new_message")
    assert daemon.query("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", (cid,)) == [(1,)]


async def test_the_later_pages_paths(daemon: Daemon, connect_to: Connector) -> None:
    """The paths a later Pitchey Messages page (messaging.service) calls answer as the
    contract's: POST /api/messages sends, /api/messages/conversations/{id}/messages pages,
    POST /api/messages/conversations/{id}/read marks read."""
    alice = await connect_to(username="Alice")
    bob = await connect_to(username="Bob")
    cid = await conversation(alice, bob.user_id)
    await bob.expect("conversation_created", conversationId=cid)
    status, _, sent = await acall(daemon.port, "POST", "/api/messages",
                                  {"conversationId": cid, "content": "by the other path"},
                                  token=tok(alice.user_id, "Alice"))
    assert status == 201 and sent["message"]["content"] == "by the other path"
    await bob.expect("new_message", messageId=sent["message"]["id"])
    status, _, page = await acall(daemon.port, "GET",
                                  f"/api/messages/conversations/{cid}/messages",
                                  token=tok(bob.user_id, "Bob"))
    assert status == 200 and [m["id"] for m in page["messages"]] == [sent["message"]["id"]]
    status, _, read = await acall(daemon.port, "POST", f"/api/messages/conversations/{cid}/read",
                                  None, token=tok(bob.user_id, "Bob"))
    assert (status, read) == (200, {"success": True, "read": 1})
    await alice.expect("message_read", messageId=sent["message"]["id"])
    status, _, _ = await acall(daemon.port, "GET", "/api/messages", token=tok(bob.user_id))
    assert status == 405


async def test_send_to_receiver_id(daemon: Daemon, connect_to: Connector) -> None:
    """receiverId (alias of recipientId) finds or makes the direct conversation."""
    carol = new_user()
    dave = await connect_to()
    status, _, body = await acall(daemon.port, "POST", "/api/messages/send",
                                  {"receiverId": dave.user_id, "content": "hi", "requestId": "r"},
                                  token=tok(carol))
    assert status == 201, body
    frame = await dave.expect("new_message", messageId=body["message"]["id"])
    assert frame["senderId"] == carol
    assert body["message"]["requestId"] == "r"
    status, _, again = await acall(daemon.port, "POST", "/api/messages/send",
                                   {"receiverId": dave.user_id, "recipientId": None,
                                    "content": "hi again"}, token=tok(carol))
    assert status == 201 and again["message"]["conversationId"] == frame["conversationId"]


async def test_send_bad_bodies(daemon: Daemon, connect_to: Connector) -> None:
    """Malformed JSON, a non-object, missing fields: 400 with the codes of section 6."""
    user = new_user()
    port = daemon.port
    status, _, body = await acall(port, "POST", "/api/messages/send", raw=b"{nope",
                                  token=tok(user))
    assert status == 400 and body["error"] == "invalid_json" and body["message"]
    status, _, body = await acall(port, "POST", "/api/messages/send", [1], token=tok(user))
    assert status == 400 and body["error"] == "invalid_json"
    status, _, body = await acall(port, "POST", "/api/messages/send", {"conversationId": 1},
                                  token=tok(user))
    assert status == 400 and body["error"] == "invalid_message"
    status, _, body = await acall(port, "POST", "/api/messages/send",
                                  {"conversationId": "1", "content": "x"}, token=tok(user))
    assert status == 400 and body == {"error": "invalid_message",
                                      "message": "Missing required fields for message",
                                      "detail": "conversationId must be an integer"}
    status, _, body = await acall(port, "POST", "/api/messages/send",
                                  {"receiverId": user, "content": "x"}, token=tok(user))
    assert status == 400 and body["detail"] == "recipientId must be another user"


async def test_not_a_participant_is_403(daemon: Daemon, connect_to: Connector) -> None:
    """Sending into, reading or marking a conversation of others: 403 forbidden."""
    alice = await connect_to()
    cid = await conversation(alice, new_user())
    outsider = tok(new_user())
    for method, path, body in (
        ("POST", "/api/messages/send", {"conversationId": cid, "content": "x"}),
        ("GET", f"/api/messages/{cid}/messages", None),
        ("POST", f"/api/messages/{cid}/read", None),
        ("POST", f"/api/creator/conversations/{cid}/read", {}),
    ):
        status, _, answer = await acall(daemon.port, method, path, body, token=outsider)
        assert status == 403 and answer["error"] == "forbidden", (path, answer)


def test_auth_refusals(daemon: Daemon) -> None:
    """No token, a bad one, an expired one: 401 JSON; two Authorization headers: 400."""
    port = daemon.port
    for token in (None, "not-a-jwt", make_token(new_user(), exp=-60)):
        status, headers, body = call(port, "GET", "/api/messages/conversations", token=token)
        assert status == 401 and set(body) == {"error", "message"}, body
        assert headers["www-authenticate"] == "Bearer"
    answer = raw_request(port, (
        "GET /api/messages/conversations HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {tok(new_user())}\r\nAuthorization: Bearer x\r\n"
        "Connection: close\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    # The same on the WebSocket handshake: refused, never a 500.
    answer = raw_request(port, (
        "GET /api/messages/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {tok(new_user())}\r\n"
        "Authorization: Bearer y\r\n\r\n").encode())
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"Traceback" not in daemon.log_text().encode()


def test_unknown_and_method_not_allowed(daemon: Daemon) -> None:
    """Unknown paths 404; a wrong method 405 with Allow."""
    token = tok(new_user())
    for path in ("/nope", "/api/messages/conversations/1", "/api/nope/1/messages"):
        status, _, body = call(daemon.port, "GET", path, token=token)
        assert status == 404 and body["error"] == "not_found"
    status, headers, body = call(daemon.port, "DELETE", "/api/messages/send", token=token)
    assert status == 405 and "POST" in headers["allow"] and body["error"]
    status, headers, _ = call(daemon.port, "POST", "/api/messages/conversations", {},
                              token=token)
    assert status == 405 and "GET" in headers["allow"] and "HEAD" in headers["allow"]


def test_too_large(daemon: Daemon) -> None:
    """A body over server.max_message_bytes: 413; a head over http.max_header_bytes: 431."""
    status, _, body = call(daemon.port, "POST", "/api/messages/send",
                           raw=b"{" + b" " * 70000 + b"}", token=tok(new_user()))
    assert status == 413 and body["error"] == "too_large"
    answer = raw_request(daemon.port, b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: "
                         + b"a" * 20000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def test_head_and_health(daemon: Daemon) -> None:
    """HEAD works wherever GET does: same status and headers, no body."""
    status, headers, body = call(daemon.port, "HEAD", "/api/health")
    assert status == 200 and body == b"" and headers["content-type"] == "application/json"
    status, _, body = call(daemon.port, "HEAD", "/api/messages/conversations",
                           token=tok(new_user()))
    assert status == 200 and body == b""


def test_client_cacheable(daemon: Daemon) -> None:
    """/client/* carries an ETag; If-None-Match with it gets 304."""
    status, headers, body = call(daemon.port, "GET", "/client/pitchey-ws.js")
    assert status == 200 and b"PitcheyClient" in body and "no-store" not in headers["cache-control"]
    status, _, body = call(daemon.port, "GET", "/client/pitchey-ws.js",
                           headers={"If-None-Match": headers["etag"]})
    assert status == 304 and body == b""


async def test_history_entries(daemon: Daemon, connect_to: Connector) -> None:
    """GET messages: the 4.4 entry plus section 8's fields; GET does not mark anything read."""
    alice = await connect_to(username="Alice")
    bob = await connect_to(username="Bob")
    cid = await conversation(alice, bob.user_id)
    sent = await alice.request({"type": "send_message", "conversationId": cid, "content": "a",
                                "requestId": "h1"}, "message_sent")
    status, _, body = await acall(daemon.port, "GET", f"/api/messages/{cid}/messages",
                                  token=tok(bob.user_id, "Bob"))
    assert status == 200 and body["success"] is True and body["hasMore"] is False
    [entry] = body["messages"]
    assert set(entry) >= MESSAGE_KEYS | DETAIL_KEYS
    assert entry["id"] == sent["messageId"] and entry["isRead"] is False
    assert entry["receiverId"] == bob.user_id and entry["isEdited"] is False
    assert entry["sender"] == {"id": alice.user_id, "name": "Alice", "username": "Alice",
                               "userType": None}
    [receipt] = entry["readReceipts"]
    assert receipt["userId"] == bob.user_id and receipt["readAt"] is None
    assert set(receipt) == {"userId", "userName", "deliveredAt", "readAt"}
    again = await acall(daemon.port, "GET", f"/api/messages/{cid}/messages",
                        token=tok(bob.user_id, "Bob"))
    assert again[2]["messages"][0]["readReceipts"][0]["readAt"] is None
    await alice.quiet("message_read")


async def test_mark_read_notifies_sender(daemon: Daemon, connect_to: Connector) -> None:
    """POST read marks the caller's unread messages and sends message_read to the sender."""
    alice = await connect_to(username="Alice")
    bob_id = new_user()
    cid = await conversation(alice, bob_id)
    ids = []
    for n in range(3):
        sent = await alice.request({"type": "send_message", "conversationId": cid,
                                    "content": f"m{n}", "requestId": f"mr{n}"}, "message_sent")
        ids.append(sent["messageId"])
    status, _, body = await acall(daemon.port, "POST", f"/api/messages/{cid}/read",
                                  {"upToMessageId": ids[1]}, token=tok(bob_id, "Bob"))
    assert (status, body) == (200, {"success": True, "read": 2})
    for mid in ids[:2]:
        notice = await alice.expect("message_read", messageId=mid)
        assert notice["readBy"] == bob_id and notice["readByName"] == "Bob"
        assert notice["conversationId"] == cid and notice["readAt"]
    status, _, body = await acall(daemon.port, "POST",
                                  f"/api/creator/conversations/{cid}/read", None,
                                  token=tok(bob_id, "Bob"))
    assert body == {"success": True, "read": 1}
    await alice.expect("message_read", messageId=ids[2])
    _, _, body = await acall(daemon.port, "POST", f"/api/messages/{cid}/read", {},
                             token=tok(bob_id, "Bob"))
    assert body["read"] == 0
    await alice.quiet("message_read")


async def test_inbox_http_equals_socket(daemon: Daemon, connect_to: Connector) -> None:
    """The inbox: entries field by field, most recent activity first, paged by an opaque
    cursor; get_conversations over the socket gives the same list."""
    me = await connect_to(username="Me")
    victor = new_user()
    maya = new_user()
    first = await conversation(me, victor)
    second = await conversation(me, maya)
    group = await conversation(me, victor, maya)
    await me.request({"type": "send_message", "conversationId": first, "content": "newest",
                      "requestId": "ib1"}, "message_sent")
    victor_token = tok(victor, "Victor", userType="investor")
    status, _, body = await acall(daemon.port, "POST", "/api/messages/send",
                                  {"conversationId": first, "content": "reply"},
                                  token=victor_token)
    assert status == 201
    status, _, body = await acall(daemon.port, "GET", "/api/messages/conversations",
                                  token=tok(me.user_id, "Me"))
    assert status == 200 and body["success"] is True and body["nextCursor"] is None
    entries = body["conversations"]
    assert [e["id"] for e in entries] == [first, group, second]
    top = entries[0]
    assert set(top) >= CONVERSATION_KEYS
    assert top["participants"] == [{"id": victor, "name": "Victor", "username": "Victor",
                                    "userType": "investor"}]
    assert top["participantName"] == "Victor" and top["participantType"] == "investor"
    assert top["lastMessage"]["content"] == "reply" and top["lastMessage"]["senderId"] == victor
    assert set(top["lastMessage"]) >= {"id", "content", "senderId", "senderName", "sentAt",
                                       "messageType"}
    # The names a later Pitchey Messages page reads, as aliases.
    assert top["lastMessage"]["createdAt"] == top["lastMessage"]["timestamp"] \
        == top["lastMessage"]["sentAt"]
    assert top["participantDetails"] == top["participants"]
    assert top["updatedAt"] == top["timestamp"]
    assert top["unreadCount"] == 1 and top["timestamp"] == top["lastMessageAt"]
    assert top["isGroup"] is False and top["pitchTitle"] is None
    assert entries[1]["isGroup"] is True and entries[1]["participantType"] is None
    assert entries[2]["lastMessage"] is None and entries[2]["timestamp"] == entries[2]["createdAt"]
    # Paging: two, then one, by the cursor.
    _, _, page = await acall(daemon.port, "GET", "/api/messages/conversations?limit=2",
                             token=tok(me.user_id, "Me"))
    assert [e["id"] for e in page["conversations"]] == [first, group] and page["nextCursor"]
    _, _, rest = await acall(daemon.port, "GET",
                             f"/api/messages/conversations?limit=2&before={page['nextCursor']}",
                             token=tok(me.user_id, "Me"))
    assert [e["id"] for e in rest["conversations"]] == [second] and rest["nextCursor"] is None
    status, _, bad = await acall(daemon.port, "GET", "/api/messages/conversations?before=zz",
                                 token=tok(me.user_id, "Me"))
    assert status == 400 and bad["error"] == "invalid_message"
    frame = await me.request({"type": "get_conversations"}, "conversations")
    assert frame["conversations"] == entries and frame["nextCursor"] is None
    frame = await me.request({"type": "get_conversations", "limit": 2}, "conversations")
    assert frame["nextCursor"] == page["nextCursor"]


async def test_expect_100_continue(daemon: Daemon, connect_to: Connector) -> None:
    """A client that sends Expect: 100-continue gets 100 Continue before it sends the body
    (curl and others otherwise wait a second or more), then the answer."""
    bob = await connect_to()
    token = tok(new_user())
    body = json.dumps({"recipientId": bob.user_id, "content": "after 100"}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(b"POST /api/messages/send HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + token.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert interim.startswith(b"HTTP/1.1 100 ")
    writer.write(body)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 201 ")
    writer.close()
    await bob.expect("new_message", content="after 100")


UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_the_websocket_path_refuses_in_json(daemon: Daemon) -> None:
    """Every refusal on the WebSocket path is JSON: a plain GET with a valid token is 426
    (with Upgrade: websocket); a token too long for a request line, in the query or the
    Authorization header, is 401 invalid_token; another header line that long is 431."""
    token = tok(new_user())
    status, headers, body = call(daemon.port, "GET", f"/api/messages/ws?token={token}")
    assert status == 426 and headers["upgrade"] == "websocket"
    assert body["error"] == "upgrade_required" and body["message"]
    status, _, body = call(daemon.port, "GET", "/api/messages/ws")
    assert status == 401 and body["error"] == "missing_token"
    long = "a" * 9000
    status, _, body = call(daemon.port, "GET", f"/api/messages/ws?token={long}", headers=UPGRADE)
    assert status == 401 and body == {"error": "invalid_token", "message": "Token is too long"}
    status, _, body = call(daemon.port, "GET", "/api/messages/ws",
                           headers={**UPGRADE, "Authorization": f"Bearer {long}"})
    assert status == 401 and body["error"] == "invalid_token"
    status, _, body = call(daemon.port, "GET", f"/api/messages/ws?token={token}",
                           headers={**UPGRADE, "Cookie": long})
    assert status == 431 and body["error"] == "header_too_large"


async def test_mark_read_takes_every_unread_message(tmp_path: Path) -> None:
    """POST read marks all of the caller's unread messages of the conversation, past one
    transaction's 1000, each with its message_read: the Messages page calls it once per
    conversation."""
    async with running(tmp_path, {"limits.frames_per_second": 100_000,
                                  "limits.frames_burst": 100_000}) as connect:
        alice = await connect(username="Alice")
        bob_id = new_user()
        cid = await conversation(alice, bob_id)
        count = 1005
        for n in range(count):
            await alice.send({"type": "send_message", "conversationId": cid,
                              "content": f"m{n}", "requestId": f"all-{n}"})
        sent = set()
        while len(sent) < count:
            sent.add((await alice.expect("message_sent"))["messageId"])
        status, _, body = await acall(connect.daemon.port, "POST", f"/api/messages/{cid}/read",
                                      None, token=tok(bob_id, "Bob"))
        assert (status, body) == (200, {"success": True, "read": count})
        notified = set()
        while len(notified) < count:
            notified.add((await alice.expect("message_read", readBy=bob_id))["messageId"])
        assert notified == sent
        _, _, inbox = await acall(connect.daemon.port, "GET", "/api/messages/conversations",
                                  token=tok(bob_id, "Bob"))
        assert inbox["conversations"][0]["unreadCount"] == 0


def test_preflight(daemon: Daemon) -> None:
    """With no origins configured, a cross-origin preflight gets no CORS headers."""
    status, headers, _ = call(daemon.port, "OPTIONS", "/api/messages/send",
                              headers={"Origin": ORIGIN,
                                       "Access-Control-Request-Method": "POST"})
    assert status == 204 and "access-control-allow-origin" not in headers


async def test_cors_and_origin(tmp_path: Path) -> None:
    """http.cors_origins: listed origins get CORS on preflight and answers, others none; a
    handshake from an unlisted Origin gets 403 origin_not_allowed, a listed one connects."""
    async with running(tmp_path, {"http.cors_origins": [ORIGIN]}) as connect:
        port = connect.daemon.port
        status, headers, _ = await acall(port, "OPTIONS", "/api/messages/send", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert status == 204 and headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in headers["access-control-allow-methods"]
        allowed = headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "idempotency-key"} <= {
            h.strip() for h in allowed.split(",")}
        # Each CORS header once: a browser refuses an answer with two Allow-Origin values.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("OPTIONS", "/api/messages/send", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
        names = [k.lower() for k, _ in conn.getresponse().getheaders()]
        conn.close()
        cors = [n for n in names if n.startswith("access-control") or n == "vary"]
        assert len(cors) == len(set(cors)), names
        status, headers, _ = await acall(port, "OPTIONS", "/api/messages/send",
                                         headers={"Origin": "https://evil.test"})
        assert status == 204 and not any(k.startswith("access-control") for k in headers)
        status, headers, _ = await acall(port, "GET", "/client/pitchey-ws.js",
                                         headers={"Origin": ORIGIN})
        assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
        status, headers, _ = await acall(port, "GET", "/api/messages/conversations",
                                         token=tok(new_user()), headers={"Origin": "https://evil.test"})
        assert status == 200 and "access-control-allow-origin" not in headers
        # The errors the front writes before the API sees the request carry CORS too, so a
        # page can read them (a browser reports a bare 413 as a network failure).
        big = b'{"content": "' + b"x" * 70_000 + b'"}'
        for origin, allowed in ((ORIGIN, True), ("https://evil.test", False)):
            status, headers, body = await acall(port, "POST", "/api/messages/send", raw=big,
                                                token=tok(new_user()),
                                                headers={"Origin": origin})
            assert status == 413 and body["error"] == "too_large"
            assert (headers.get("access-control-allow-origin") == ORIGIN) is allowed, headers
        status, headers, body = await acall(port, "GET", "/api/health",
                                            headers={"Origin": ORIGIN, "X-Big": "y" * 20_000})
        assert status == 431 and headers["access-control-allow-origin"] == ORIGIN
        uid = new_user()
        with pytest.raises(Exception) as refused:
            await connect(uid, origin="https://evil.test")  # type: ignore[arg-type]
        assert "403" in str(refused.value)
        ok: Client = await connect(uid, origin=ORIGIN)  # type: ignore[arg-type]
        assert (await ok.request({"type": "ping"}, "pong"))["userId"] == uid


async def test_rate_limited_shares_the_bucket(tmp_path: Path) -> None:
    """HTTP requests draw on the user's token bucket: beyond it, 429 with Retry-After."""
    async with running(tmp_path, {"limits.frames_per_second": 1, "limits.frames_burst": 3}
                       ) as connect:
        port = connect.daemon.port
        token = tok(new_user())
        statuses = []
        for _ in range(5):
            status, headers, body = await acall(port, "GET", "/api/messages/conversations",
                                                token=token)
            statuses.append(status)
        assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429
        assert body["error"] == "rate_limited" and int(headers["retry-after"]) >= 1


def test_websocket_path_still_refuses_plainly(daemon: Daemon) -> None:
    """The handshake's JSON refusals are unchanged behind the front: no token is 401."""
    status, _, body = daemon.get("/api/messages/ws")
    assert status == 401 and json.loads(body)["error"] == "missing_token"


async def test_in_progress_bound(tmp_path: Path) -> None:
    """Beyond http.max_in_progress connections still sending their request, others wait for
    a turn, unread, and are served in order as the ones in progress end. (How many may wait
    follows the descriptor limit: test_descriptors.py.)"""
    async with running(tmp_path, {"http.max_in_progress": 1}) as connect:
        port = connect.daemon.port
        request = b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as idle:
            idle.sendall(b"GET /api/health HTTP/1.1\r\n")  # a head that has not ended
            waiters = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                       for _ in range(3)]
            try:
                for waiter in waiters:
                    waiter.sendall(request)
                # Unanswered while the first holds the one slot.
                waiters[0].settimeout(0.3 * SCALE)
                with pytest.raises(TimeoutError):
                    waiters[0].recv(1)
                waiters[0].settimeout(TIMEOUT)
                # The first ends its head; then each waiting one is answered in turn.
                idle.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
                first = await asyncio.to_thread(read_all, idle)
                assert first.startswith(b"HTTP/1.1 200 "), first[:100]
                for waiter in waiters:
                    answer = await asyncio.to_thread(read_all, waiter)
                    assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
            finally:
                for waiter in waiters:
                    waiter.close()
        status, _, _ = await acall(port, "GET", "/api/health")
        assert status == 200


def test_log_summary_counts_what_it_holds_back() -> None:
    """LogSummary: at most per_second lines a second per kind, then one line with the count."""
    import logging

    from http_front import LogSummary

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("pitchey.test.summary")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    now = [0.0]
    summary = LogSummary(logger, per_second=2, clock=lambda: now[0])
    for n in range(10):
        summary.note("bad", "bad request %d", n)
    summary.note("other", "other")
    now[0] = 1.5
    summary.note("bad", "bad request again")
    assert lines == ["bad request 0", "bad request 1", "other",
                     "bad: 8 more like it in the last second, not logged", "bad request again"]
    # The summary was a line of its second: with one line a second, a steady flood writes
    # one line a second, the count of the rest.
    lines.clear()
    once = LogSummary(logger, per_second=1, clock=lambda: now[0])
    for second in range(3):
        for n in range(5):
            now[0] = 10 + second + n / 10
            once.note("accept", "accept failed %d", n)
    now[0] = 13.5
    once.flush("accept")
    held = "accept: %d more like it in the last second, not logged"
    assert lines == ["accept failed 0", held % 4, held % 5, held % 5], lines


def test_port_and_host_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve takes PORT and HOST from the environment; --port and --host win."""
    import pitchey_ws

    monkeypatch.setenv("PORT", "9123")
    monkeypatch.setenv("HOST", "0.0.0.0")
    parser = pitchey_ws.build_parser()
    config = pitchey_ws.load_config(parser.parse_args(["serve"]))
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9123)
    config = pitchey_ws.load_config(
        parser.parse_args(["serve", "--port", "9200", "--host", "127.0.0.1"]))
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9200)


async def test_handshake_after_a_request_on_a_kept_alive_connection(daemon: Daemon) -> None:
    """A WebSocket handshake on a connection that first served a GET (a pooled connection, as
    Node's fetch-based WebSocket uses) is handed over and gets connected."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
        user = new_user()
        writer.write(
            (f"GET /api/messages/ws?token={make_token(user)} HTTP/1.1\r\nHost: x\r\n"
             "Upgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
             ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101"), head
        frame = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
        assert frame[0] == 0x81  # a final text frame: connected
        body = await asyncio.wait_for(reader.readexactly(frame[1] & 0x7F), TIMEOUT)
        assert json.loads(body) == {**json.loads(body), "type": "connected", "userId": user}
    finally:
        writer.close()


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/api/notifications", "GET"),
    ("POST", "/api/notifications/read", "POST"),
    ("GET", "/api/pitches/77/activity", "GET"),
    ("POST", "/api/messages/77/read", "POST"),
])
def test_route_refusals(daemon: Daemon, method: str, path: str, allow: str) -> None:
    """Each route of section 8: 401 without a token, 405 with Allow for another method, 413
    over max_message_bytes and 400 for a malformed body (POST), 429 with Retry-After once the
    user's bucket is empty."""
    status, headers, body = call(daemon.port, method, path)
    assert status == 401 and body["error"] == "missing_token", body
    user = new_user()
    other = "DELETE"
    status, headers, body = call(daemon.port, other, path, token=tok(user))
    assert status == 405 and allow in headers["allow"] and body["error"], body
    if method == "POST":
        status, _, body = call(daemon.port, "POST", path, raw=b"{" + b" " * 70000 + b"}",
                               token=tok(user))
        assert status == 413 and body["error"] == "too_large", body
        status, _, body = call(daemon.port, "POST", path, raw=b"{not json", token=tok(user))
        assert status == 400 and body["error"] == "invalid_json", body
    limited = new_user()
    for _ in range(200):
        status, headers, body = call(daemon.port, method, path, token=tok(limited),
                                     body={} if method == "POST" else None)
        if status == 429:
            break
    assert status == 429 and body["error"] == "rate_limited", body
    assert int(headers["retry-after"]) >= 1
