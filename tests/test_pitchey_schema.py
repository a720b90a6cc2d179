"""pitchey-ws on an existing Pitchey database (PostgreSQL, database.pitchey_schema = "existing").

The database is made from tests/data/pitchey-schema.sql (a copy of the app's tables, shared/
pitchey-schema.sql) with users, a pitch, an NDA and a conversation inserted the way the app
does; then the daemon must use those rows at once, write messages the app can read with its
own queries, add no column to the app's tables and insert no user.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from backend import KEY, call
from conftest import TIMEOUT, Client, Connector, Daemon, eventually, make_token, pg_query
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

SCHEMA = Path(__file__).with_name("data") / "pitchey-schema.sql"
APP_TABLES = ("users", "pitches", "ndas", "pitch_views", "conversations",
              "conversation_participants", "messages", "message_read_receipts",
              "typing_indicators")
COLUMNS = (
    "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns"
    " WHERE table_schema = 'public' AND table_name = ANY(?::text[])"
    " ORDER BY table_name, column_name"
)


@pytest.fixture
def pitchey_db(postgres_server: Any) -> str:
    """A Pitchey database as the app leaves it: its schema, three users, a pitch with an NDA
    signed by the investor, and a conversation about the pitch created by the app."""
    url: str = postgres_server.create_database()
    _script(url, SCHEMA.read_text())
    _script(url, """
        INSERT INTO users (id, email, username, password_hash, user_type)
        VALUES (1, 'alex@example.com', 'alex', 'x', 'creator'),
               (2, 'sarah@example.com', 'sarah', 'x', 'investor'),
               (3, 'stellar@example.com', 'stellar', 'x', 'production');
        SELECT setval('users_id_seq', 3);
        INSERT INTO pitches (id, user_id, title, logline, genre, format, status, published_at)
        VALUES (7, 1, 'Night Train', 'A train that never stops.', 'thriller', 'feature',
                'published', now());
        INSERT INTO ndas (pitch_id, signer_id, nda_type) VALUES (7, 2, 'basic');
        INSERT INTO conversations (id, pitch_id, created_by_id, title)
        VALUES (40, 7, 2, 'Night Train');
        SELECT setval('conversations_id_seq', 40);
        INSERT INTO conversation_participants (conversation_id, user_id) VALUES (40, 1), (40, 2);
    """)
    return url


def _script(url: str, sql: str) -> None:
    """Run a multi-statement script (no parameters) on the database."""
    import asyncio
    import concurrent.futures

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture
async def existing(tmp_path: Path, pitchey_db: str) -> AsyncIterator[Connector]:
    daemon = Daemon(tmp_path, {"database.pitchey_schema": "existing", "api.key": KEY},
                    database_url=pitchey_db)
    before = daemon.query(COLUMNS, (list(APP_TABLES),))
    daemon.start()
    connector = Connector(daemon)
    try:
        yield connector
    finally:
        await connector.close_all()
        if daemon.proc is not None:
            daemon.stop()
    # Whatever the test did, the app's tables have exactly their own columns.
    assert daemon.query(COLUMNS, (list(APP_TABLES),)) == before


async def test_app_conversation_usable_and_message_readable_by_app(
    existing: Connector,
) -> None:
    """A conversation the app created works over the socket at once; the app reads the message."""
    daemon = existing.daemon
    alex = await existing(1, username="alex")
    sarah = await existing(2, username="sarah")
    await sarah.send({"type": "send_message", "conversationId": 40, "content": "Loved it",
                      "requestId": "r1", "pitchId": 7})
    sent = await sarah.expect("message_sent", requestId="r1")
    got = await alex.expect("new_message", messageId=sent["messageId"])
    assert got["content"] == "Loved it" and got["senderId"] == 2 and got["senderName"] == "sarah"
    # The app's own query shape: its messages with their sender, by conversation.
    rows = daemon.query(
        "SELECT m.id, m.content, m.sender_id, u.username, m.pitch_id, m.is_read, m.sent_at"
        " FROM messages m JOIN users u ON u.id = m.sender_id WHERE m.conversation_id = ?"
        " ORDER BY m.sent_at DESC LIMIT 50",
        (40,),
    )
    assert rows == [(sent["messageId"], "Loved it", 2, "sarah", 7, False, sent["timestamp"])]
    # Delivered: the app's receipt row appears with a real delivered_at (it is NOT NULL there).
    receipt = "SELECT delivered_at, read_at FROM message_read_receipts WHERE message_id = ?"
    (delivered_at, read_at), = await eventually(
        lambda: daemon.query(receipt, (sent["messageId"],)))
    assert delivered_at >= sent["timestamp"] and read_at is None
    await alex.send({"type": "mark_read", "messageId": sent["messageId"]})
    read = await sarah.expect("message_read", messageId=sent["messageId"])
    await eventually(lambda: daemon.query(receipt, (sent["messageId"],))[0][1] == read["readAt"])
    assert daemon.query("SELECT is_read FROM messages WHERE id = ?", (sent["messageId"],)) == [
        (True,)
    ]
    # A repeated requestId is the same message (idempotency in a ws_* table).
    await sarah.send({"type": "send_message", "conversationId": 40, "content": "Loved it",
                      "requestId": "r1"})
    again = await sarah.expect("message_sent", requestId="r1")
    assert again["messageId"] == sent["messageId"]
    assert daemon.query("SELECT COUNT(*) FROM messages") == [(1,)]


async def test_history_of_app_messages_and_new_conversation(existing: Connector) -> None:
    """Messages the app stored are history; a new direct conversation uses known users only."""
    daemon = existing.daemon
    pg_query(daemon.database_url or "",
             "INSERT INTO messages (conversation_id, sender_id, content, sent_at)"
             " VALUES (40, 1, 'from the app', '2025-01-02 03:04:05.678')")
    alex = await existing(1, username="alex")
    page = await alex.request({"type": "get_messages", "conversationId": 40}, "messages")
    assert [(m["content"], m["timestamp"], m["attachments"]) for m in page["messages"]] == [
        ("from the app", "2025-01-02T03:04:05.678Z", [])
    ]
    stellar = await existing(3, username="stellar")
    reply = await alex.request(
        {"type": "create_conversation", "participantIds": [3], "requestId": "c1"},
        "conversation_created", requestId="c1",
    )
    await stellar.expect("conversation_created", conversationId=reply["conversationId"])
    assert daemon.query(
        "SELECT user_id FROM conversation_participants WHERE conversation_id = ? ORDER BY 1",
        (reply["conversationId"],),
    ) == [(1,), (3,)]
    # A participant the app does not know: refused, and no user was inserted.
    await alex.send({"type": "create_conversation", "participantIds": [999], "requestId": "c2"})
    error = await alex.expect("error")
    assert error["code"] != "internal", error
    assert daemon.query("SELECT COUNT(*) FROM users") == [(3,)]


async def test_unknown_user_refused(existing: Connector) -> None:
    """A valid token of a user the app does not have is 401 unknown_user at the handshake."""
    daemon = existing.daemon
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{daemon.url}?token={make_token(999, username='ghost')}",
                           open_timeout=TIMEOUT):
            pass
    response = info.value.response
    assert response.status_code == 401
    assert json.loads(response.body)["error"] == "unknown_user"
    assert daemon.query("SELECT COUNT(*) FROM users WHERE id = ?", (999,)) == [(0,)]
    # A user the app deactivated is refused the same way, on the socket and over HTTP.
    pg_query(daemon.database_url or "", "UPDATE users SET is_active = false WHERE id = 3")
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{daemon.url}?token={make_token(3, username='stellar')}",
                           open_timeout=TIMEOUT):
            pass
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body)["error"] == "unknown_user"
    status, body = call(daemon, "GET", "/api/notifications", token=make_token(3))
    assert status == 401 and body["error"] == "unknown_user"


async def test_app_pitches_ndas_and_views(existing: Connector) -> None:
    """Pitches are the app's rows: a published one is watchable by anyone, a draft only by its
    owner and NDA signers with access_granted; a view is a pitch_views row; the owner's
    notification of a like is kept in a ws_* table."""
    daemon = existing.daemon
    url = daemon.database_url or ""
    _script(url, """
        INSERT INTO pitches (id, user_id, title, logline, genre, format, status)
        VALUES (8, 1, 'Cold Open', 'Not yet.', 'drama', 'tv', 'draft');
        INSERT INTO ndas (pitch_id, signer_id, nda_type, access_granted)
        VALUES (8, 2, 'basic', true), (8, 3, 'basic', false);
    """)
    alex = await existing(1, username="alex")
    sarah = await existing(2, username="sarah")
    stellar = await existing(3, username="stellar")
    # Published (pitch 7): a user without an NDA may watch it; the view is the app's row.
    seen = await stellar.request({"type": "pitch_view", "pitchId": 7}, "pitch_viewed")
    assert seen["viewCount"] == 1
    owner_frame = await alex.expect("pitch_viewed", pitchId=7)
    assert owner_frame["userId"] == 3 and owner_frame["username"] == "stellar"
    views = "SELECT pitch_id, viewer_id FROM pitch_views WHERE pitch_id = ? ORDER BY id"
    assert daemon.query(views, (7,)) == [(7, 3)]
    activity = await stellar.request({"type": "get_pitch_activity", "pitchId": 7},
                                     "pitch_activity")
    assert activity["ownerId"] == 1 and activity["title"] == "Night Train"
    # Draft (pitch 8): forbidden to a signer without access, visible to one with it.
    error = await stellar.request({"type": "pitch_view", "pitchId": 8}, "error")
    assert error["code"] == "forbidden"
    assert (await sarah.request({"type": "pitch_view", "pitchId": 8}, "pitch_viewed")
            )["viewCount"] == 1
    assert daemon.query(views, (8,)) == [(8, 2)]
    # A like by the signer: the owner's notification, stored in ws_notifications.
    await sarah.send({"type": "pitch_like", "pitchId": 8})
    liked = await alex.expect("pitch_liked", pitchId=8)
    assert liked["userId"] == 2 and "notificationId" in liked
    assert daemon.query("SELECT user_id, type FROM ws_notifications") == [(1, "pitch_liked")]
    assert daemon.query("SELECT like_count, view_count FROM pitches WHERE id = 8") == [(0, 0)]
    # The app's pitch rows and users are as the app left them.
    assert daemon.query("SELECT COUNT(*) FROM pitches") == [(2,)]
    assert daemon.query("SELECT COUNT(*) FROM users") == [(3,)]


async def test_backend_pitch_registration_on_app_pitches(existing: Connector) -> None:
    """PUT /api/pitches on an existing database: the app's row rules (owner, title, status);
    the allowed users are added (a ws_* table); a pitch the app does not have is 409."""
    daemon = existing.daemon
    _script(daemon.database_url or "", """
        INSERT INTO pitches (id, user_id, title, logline, genre, format, status)
        VALUES (9, 1, 'Hidden Gem', 'Shh.', 'drama', 'short', 'hidden');
    """)
    status, _ = call(daemon, "PUT", "/api/pitches/9",
                     {"ownerId": 1, "title": "Hidden Gem", "visibility": "private",
                      "allowedUserIds": [3]})
    assert status == 200
    stellar = await existing(3, username="stellar")
    activity = await stellar.request({"type": "get_pitch_activity", "pitchId": 9},
                                     "pitch_activity")
    assert activity["ownerId"] == 1
    assert daemon.query("SELECT title, status::text FROM pitches WHERE id = 9") == [
        ("Hidden Gem", "hidden")]
    status, body = call(daemon, "PUT", "/api/pitches/77",
                        {"ownerId": 1, "title": "New", "visibility": "public"})
    assert status == 409 and body["error"] == "conflict"
    assert daemon.query("SELECT COUNT(*) FROM pitches WHERE id = 77") == [(0,)]


async def _first(client: Client, kinds: tuple[str, ...]) -> dict[str, Any]:
    """The next frame of one of these types (others, such as presence, are passed over)."""
    frame = await client.recv()
    while frame["type"] not in kinds:
        frame = await client.recv()
    return frame


async def test_direct_conversation_the_app_made_is_used(existing: Connector) -> None:
    """recipientId finds the non-group conversation of exactly the two users that the app
    created (rows inserted directly), instead of making a second one (PROTOCOL.md 3)."""
    daemon = existing.daemon
    _script(daemon.database_url or "", """
        INSERT INTO conversations (id, created_by_id) VALUES (41, 1);
        INSERT INTO conversations (id, created_by_id, is_group) VALUES (42, 1, true);
        SELECT setval('conversations_id_seq', 42);
        INSERT INTO conversation_participants (conversation_id, user_id)
        VALUES (42, 1), (42, 3), (41, 1), (41, 3);
    """)
    alex = await existing(1, username="alex")
    stellar = await existing(3, username="stellar")
    sent = await alex.request({"type": "send_message", "recipientId": 3, "content": "hi",
                               "requestId": "d1"}, "message_sent", requestId="d1")
    assert sent["conversationId"] == 41
    assert (await stellar.expect("new_message", messageId=sent["messageId"]))[
        "conversationId"] == 41
    # Over HTTP too (receiverId), and no conversation was added.
    status, body = call(daemon, "POST", "/api/messages/send",
                        {"receiverId": 1, "content": "back"}, token=make_token(3))
    assert status == 201 and body["message"]["conversationId"] == 41, body
    assert daemon.query("SELECT id FROM conversations ORDER BY id") == [(40,), (41,), (42,)]


async def test_unknown_pitch_or_recipient_is_invalid_message(existing: Connector) -> None:
    """A pitchId the app does not have, or a recipientId that is not one of its users, is
    invalid_message (400 over HTTP), not an internal error; nothing is stored."""
    daemon = existing.daemon
    alex = await existing(1, username="alex")
    for frame in ({"conversationId": 40, "pitchId": 999}, {"recipientId": 999}):
        await alex.send({"type": "send_message", "content": "x", "requestId": "u1", **frame})
        error = await _first(alex, ("message_sent", "error"))
        assert error["type"] == "error" and error["code"] == "invalid_message", error
        assert error.get("requestId") == "u1"
    token = make_token(1, username="alex")
    for body in ({"conversationId": 40, "content": "y", "pitchId": 999},
                 {"receiverId": 999, "content": "y"}):
        status, answer = call(daemon, "POST", "/api/messages/send", body, token=token)
        assert status == 400 and answer["error"] == "invalid_message", (status, answer)
    assert daemon.query("SELECT COUNT(*) FROM messages") == [(0,)]
    assert daemon.query("SELECT id FROM conversations ORDER BY id") == [(40,)]
    # The connection still works.
    sent = await alex.request({"type": "send_message", "conversationId": 40, "content": "ok",
                               "requestId": "u2"}, "message_sent", requestId="u2")
    assert sent["conversationId"] == 40


async def test_http_refuses_a_user_the_app_does_not_have(existing: Connector) -> None:
    """The HTTP API applies the handshake's rule: a valid token of an unknown user is 401
    unknown_user, and no row is written."""
    daemon = existing.daemon
    token = make_token(999, username="ghost")
    for method, path, body in (("GET", "/api/messages/conversations", None),
                               ("GET", "/api/notifications", None),
                               ("POST", "/api/messages/send", {"receiverId": 1, "content": "b"})):
        status, answer = call(daemon, method, path, body, token=token)
        assert status == 401 and answer["error"] == "unknown_user", (path, status, answer)
    assert daemon.query("SELECT COUNT(*) FROM users") == [(3,)]
    assert daemon.query("SELECT COUNT(*) FROM messages") == [(0,)]
    status, answer = call(daemon, "GET", "/api/messages/conversations",
                          token=make_token(1, username="alex"))
    assert status == 200 and [c["id"] for c in answer["conversations"]] == [40]


async def test_participants_the_app_changes_are_seen(existing: Connector) -> None:
    """The app adds a participant to a conversation the daemon has in memory: usable at once.
    It deactivates one: within the cache's few seconds that user gets nothing more."""
    daemon = existing.daemon
    url = daemon.database_url or ""
    alex = await existing(1, username="alex")
    sarah = await existing(2, username="sarah")
    stellar = await existing(3, username="stellar")
    first = await alex.request({"type": "send_message", "conversationId": 40, "content": "one",
                                "requestId": "a1"}, "message_sent", requestId="a1")
    await sarah.expect("new_message", messageId=first["messageId"])
    pg_query(url, "INSERT INTO conversation_participants (conversation_id, user_id)"
                  " VALUES (40, 3)")
    page = await stellar.request({"type": "get_messages", "conversationId": 40}, "messages")
    assert [m["messageId"] for m in page["messages"]] == [first["messageId"]]
    pg_query(url, "UPDATE conversation_participants SET is_active = false, left_at = now()"
                  " WHERE conversation_id = 40 AND user_id = 2")

    async def refused() -> bool:
        await sarah.send({"type": "get_messages", "conversationId": 40})
        return (await _first(sarah, ("messages", "error")))["type"] == "error"

    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not await refused():
        assert asyncio.get_running_loop().time() < deadline, "removal never seen"
        await asyncio.sleep(0.2)  # paces the polling (and the rate limit); refusal is the event
    later = await alex.request({"type": "send_message", "conversationId": 40,
                                "content": "secret", "requestId": "a2"},
                               "message_sent", requestId="a2")
    await stellar.expect("new_message", messageId=later["messageId"])
    await sarah.absent("new_message")


async def test_pitch_published_or_nda_signed_by_the_app_is_seen(existing: Connector) -> None:
    """A draft pitch the daemon refused a user: once the app records that user's NDA, or
    publishes the pitch, pitch_view is answered at once (no stale refusal)."""
    daemon = existing.daemon
    url = daemon.database_url or ""
    _script(url, """
        INSERT INTO pitches (id, user_id, title, logline, genre, format, status)
        VALUES (8, 1, 'Cold Open', 'Not yet.', 'drama', 'tv', 'draft'),
               (9, 1, 'Second Act', 'Later.', 'drama', 'tv', 'draft');
    """)
    stellar = await existing(3, username="stellar")
    for pitch in (8, 9):
        error = await stellar.request({"type": "pitch_view", "pitchId": pitch}, "error")
        assert error["code"] == "forbidden"
    pg_query(url, "INSERT INTO ndas (pitch_id, signer_id, nda_type) VALUES (8, 3, 'basic')")
    pg_query(url, "UPDATE pitches SET status = 'published', published_at = now() WHERE id = 9")
    for pitch in (8, 9):
        seen = await stellar.request({"type": "pitch_view", "pitchId": pitch}, "pitch_viewed",
                                     pitchId=pitch)
        assert seen["viewCount"] == 1


async def test_inbox_pages_app_conversations_of_one_instant(existing: Connector) -> None:
    """Conversations the app made in one transaction share a microsecond timestamp: paging
    the inbox one at a time still lists each once."""
    daemon = existing.daemon
    _script(daemon.database_url or "", """
        INSERT INTO conversations (id, created_by_id, title)
        VALUES (41, 1, 'a'), (42, 1, 'b'), (43, 1, 'c');
        SELECT setval('conversations_id_seq', 43);
        INSERT INTO conversation_participants (conversation_id, user_id)
        VALUES (41, 1), (41, 3), (42, 1), (42, 3), (43, 1), (43, 2);
        INSERT INTO messages (conversation_id, sender_id, content, attachments)
        VALUES (40, 2, 'no attachments', 'null'::jsonb);
    """)
    token = make_token(1, username="alex")
    seen: list[int] = []
    before = None
    for _ in range(10):
        path = "/api/messages/conversations?limit=1" + (f"&before={before}" if before else "")
        status, body = call(daemon, "GET", path, token=token)
        assert status == 200, body
        seen += [c["id"] for c in body["conversations"]]
        # The app's pitch names the conversation about it.
        assert [c["pitchTitle"] for c in body["conversations"]] == [
            "Night Train" if c["id"] == 40 else None for c in body["conversations"]]
        before = body["nextCursor"]
        if before is None:
            break
    assert sorted(seen) == [40, 41, 42, 43] and len(seen) == 4, seen
    # A JSON null in the app's attachments column is no attachments.
    alex = await existing(1, username="alex")
    page = await alex.request({"type": "get_messages", "conversationId": 40}, "messages")
    assert page["messages"][-1]["attachments"] == []


async def test_receipts_the_app_writes_count_for_unread(existing: Connector) -> None:
    """Messages sent to an offline user that the app then marks delivered or read through its
    own routes (receipt rows): the inbox counts each once, and a read one not at all."""
    daemon = existing.daemon
    url = daemon.database_url or ""
    sarah = await existing(2, username="sarah")
    ids = []
    for n in range(3):
        sent = await sarah.request({"type": "send_message", "conversationId": 40,
                                    "content": f"m{n}", "requestId": f"o{n}"},
                                   "message_sent", requestId=f"o{n}")
        ids.append(sent["messageId"])
    token = make_token(1, username="alex")

    def unread() -> int:
        status, body = call(daemon, "GET", "/api/messages/conversations", token=token)
        assert status == 200, body
        return int(body["conversations"][0]["unreadCount"])

    assert unread() == 3
    pg_query(url, "INSERT INTO message_read_receipts (message_id, user_id, read_at)"
                  " VALUES ($1, 1, now())", (ids[0],))
    pg_query(url, "INSERT INTO message_read_receipts (message_id, user_id)"
                  " VALUES ($1, 1)", (ids[1],))
    assert unread() == 2


def test_missing_indexes_on_the_app_tables_are_named(tmp_path: Path, pitchey_db: str) -> None:
    """pitchey-ws adds no index to the app's tables; at start it warns of each one its reads
    need that is missing, with the statement to add it, and says nothing once they exist."""
    daemon = Daemon(tmp_path, {"database.pitchey_schema": "existing"}, database_url=pitchey_db)
    daemon.start()
    daemon.stop()
    log = daemon.log_text()
    assert "no index on messages (conversation_id, id)" in log, log[-2000:]
    assert "no index on message_read_receipts (user_id)" in log
    assert "CREATE INDEX messages_conversation_id_id_idx ON messages (conversation_id, id);" in log
    _script(pitchey_db, """
        CREATE INDEX messages_conversation_id_id_idx ON messages (conversation_id, id);
        CREATE INDEX message_read_receipts_unread_idx ON message_read_receipts
            (user_id, message_id) WHERE read_at IS NULL;
    """)
    (tmp_path / "again").mkdir()
    again = Daemon(tmp_path / "again", {"database.pitchey_schema": "existing"},
                   database_url=pitchey_db)
    again.start()
    again.stop()
    assert "no index on" not in again.log_text()


async def test_names_from_tokens_and_the_backend_on_the_app_users(existing: Connector) -> None:
    """On the app's database the display name follows PROTOCOL.md 12 as on SQLite: the
    token's claim first, then the backend's PUT /api/users, then the app's users.username;
    live frames and history agree, and the app's users rows are not changed."""
    daemon = existing.daemon
    alex = await existing(1, username="alex")
    sarah = await existing(2, username="Sarah Chen")
    sent = await sarah.request({"type": "send_message", "conversationId": 40, "content": "hey",
                                "requestId": "n1"}, "message_sent", requestId="n1")
    live = await alex.expect("new_message", messageId=sent["messageId"])
    page = await alex.request({"type": "get_messages", "conversationId": 40}, "messages")
    assert live["senderName"] == page["messages"][-1]["senderName"] == "Sarah Chen"
    status, _ = call(daemon, "PUT", "/api/users/1", {"username": "Alex Director"})
    assert status == 200
    status, _ = call(daemon, "PUT", "/api/users/999", {"username": "Nobody"})  # not the app's
    assert status == 200
    nameless = await existing(1, token=make_token(1))
    mine = await nameless.request({"type": "send_message", "conversationId": 40,
                                   "content": "hi", "requestId": "n2"},
                                  "message_sent", requestId="n2")
    assert mine["senderName"] == "Alex Director"
    assert daemon.query("SELECT id, username FROM users ORDER BY id") == [
        (1, "alex"), (2, "sarah"), (3, "stellar")]
    assert daemon.query("SELECT COUNT(*) FROM ws_users WHERE user_id = ?", (999,)) == [(0,)]


async def test_app_conversation_of_three_is_a_group_in_the_inbox(existing: Connector) -> None:
    """A conversation the app made for three users without setting is_group is a group in the
    inbox (more than two participants, PROTOCOL.md 3): named by its title."""
    daemon = existing.daemon
    _script(daemon.database_url or "", """
        INSERT INTO conversations (id, created_by_id, title) VALUES (41, 1, 'Team');
        SELECT setval('conversations_id_seq', 41);
        INSERT INTO conversation_participants (conversation_id, user_id)
        VALUES (41, 1), (41, 2), (41, 3);
    """)
    status, body = call(daemon, "GET", "/api/messages/conversations",
                        token=make_token(1, username="alex"))
    assert status == 200
    entries = {c["id"]: c for c in body["conversations"]}
    assert entries[41]["isGroup"] is True and entries[41]["participantName"] == "Team"
    assert entries[40]["isGroup"] is False and entries[40]["participantName"] == "sarah"


async def test_a_participant_the_app_marked_left_is_not_a_member(existing: Connector) -> None:
    """A participant row with left_at set (the app's way to leave, is_active left at its
    default) gives no access; the backend adding the user back restores it."""
    daemon = existing.daemon
    _script(daemon.database_url or "", """
        INSERT INTO conversation_participants (conversation_id, user_id, left_at)
        VALUES (40, 3, now());
    """)
    stellar = await existing(3, username="stellar")
    error = await stellar.request({"type": "get_messages", "conversationId": 40}, "error")
    assert error["code"] == "forbidden"
    status, body = call(daemon, "POST", "/api/conversations/40/participants", {"add": [3]})
    assert status == 200 and 3 in body["conversation"]["participantIds"], body
    page = await stellar.request({"type": "get_messages", "conversationId": 40}, "messages")
    assert page["messages"] == []
    assert daemon.query("SELECT is_active, left_at FROM conversation_participants"
                        " WHERE conversation_id = 40 AND user_id = 3") == [(True, None)]


async def _until_refused(client: Client, conversation_id: int) -> None:
    """Poll until ``client`` is refused the conversation: the daemon has seen the app's change
    (its cache trusts a row for a few seconds)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        await client.send({"type": "get_messages", "conversationId": conversation_id})
        if (await _first(client, ("messages", "error")))["type"] == "error":
            return
        assert asyncio.get_running_loop().time() < deadline, "the app's change never seen"
        await asyncio.sleep(0.2)  # paces the polling (and the rate limit); refusal is the event


async def test_recipient_id_follows_the_app_changing_a_direct_conversation(
    existing: Connector,
) -> None:
    """The pair's recorded 1:1 stops being theirs when the app adds a third participant or
    removes one of the two: recipientId then uses a conversation of exactly the two (PROTOCOL.md
    3), so the message neither reaches the third user nor goes unseen by the recipient."""
    daemon = existing.daemon
    url = daemon.database_url or ""
    alex = await existing(1, username="alex")
    sarah = await existing(2, username="sarah")
    stellar = await existing(3, username="stellar")
    first = await alex.request({"type": "send_message", "recipientId": 3, "content": "one",
                                "requestId": "p1"}, "message_sent", requestId="p1")
    direct = first["conversationId"]
    await stellar.expect("new_message", messageId=first["messageId"])
    pg_query(url, "INSERT INTO conversation_participants (conversation_id, user_id)"
                  " VALUES (?, 2)", (direct,))
    # sarah, not a member in the daemon's memory, is looked up again: the row is re-read.
    page = await sarah.request({"type": "get_messages", "conversationId": direct}, "messages")
    assert [m["messageId"] for m in page["messages"]] == [first["messageId"]]
    second = await alex.request({"type": "send_message", "recipientId": 3,
                                 "content": "for stellar only", "requestId": "p2"},
                                "message_sent", requestId="p2")
    assert second["conversationId"] not in (direct, 40), second
    await stellar.expect("new_message", messageId=second["messageId"])
    await sarah.absent("new_message")
    members = "SELECT user_id FROM conversation_participants WHERE conversation_id = ? ORDER BY 1"
    assert daemon.query(members, (second["conversationId"],)) == [(1,), (3,)]
    # The app removes stellar from the new 1:1: the next send makes another one she is in.
    pg_query(url, "UPDATE conversation_participants SET is_active = false, left_at = now()"
                  " WHERE conversation_id = ? AND user_id = 3", (second["conversationId"],))
    await _until_refused(stellar, second["conversationId"])
    third = await alex.request({"type": "send_message", "recipientId": 3, "content": "three",
                                "requestId": "p3"}, "message_sent", requestId="p3")
    assert third["conversationId"] not in (direct, 40, second["conversationId"]), third
    got = await stellar.expect("new_message", messageId=third["messageId"])
    assert got["conversationId"] == third["conversationId"]
    # And it stays the pair's conversation.
    fourth = await alex.request({"type": "send_message", "recipientId": 3, "content": "four",
                                 "requestId": "p4"}, "message_sent", requestId="p4")
    assert fourth["conversationId"] == third["conversationId"]


async def test_a_message_the_app_deleted_is_not_replayed(existing: Connector) -> None:
    """A message the app soft-deletes while its recipient is offline is not replayed on the
    next connect, and marking it read is refused like an unknown message (history and sync
    hide it already)."""
    daemon = existing.daemon
    alex = await existing(1, username="alex")
    gone = await alex.request({"type": "send_message", "conversationId": 40,
                               "content": "oops", "requestId": "x1"},
                              "message_sent", requestId="x1")
    kept = await alex.request({"type": "send_message", "conversationId": 40,
                               "content": "kept", "requestId": "x2"},
                              "message_sent", requestId="x2")
    pg_query(daemon.database_url or "",
             "UPDATE messages SET is_deleted = true, deleted_at = now() WHERE id = ?",
             (gone["messageId"],))
    sarah = await existing(2, username="sarah")
    replayed = await sarah.expect("queued_message")
    assert replayed["messageId"] == kept["messageId"], replayed
    await sarah.absent("queued_message")
    error = await sarah.request({"type": "mark_read", "messageId": gone["messageId"]}, "error")
    assert error["code"] == "forbidden"
    await alex.absent("message_read")


async def test_the_app_inserts_users_and_pitches_beside_the_daemon(
    tmp_path: Path, postgres_db: str,
) -> None:
    """In a database pitchey-ws created (pitchey_schema = "create"), rows it writes with the
    ids tokens and the backend give move the tables' sequences past them: the app's own next
    sign-up and pitch (ids from the sequence) do not collide with them."""
    daemon = Daemon(tmp_path, {"api.key": KEY}, database_url=postgres_db)
    daemon.start()
    connector = Connector(daemon)
    try:
        await connector(4, username="dana")
        status, _ = call(daemon, "PUT", "/api/users/9", {"username": "ivy"})
        assert status == 200
        status, _ = call(daemon, "PUT", "/api/pitches/5",
                         {"ownerId": 4, "title": "Pilot", "visibility": "public"})
        assert status == 200
        user = pg_query(postgres_db, "INSERT INTO users (email, username)"
                                     " VALUES ('new@example.com', 'new') RETURNING id")
        assert user[0][0] > 9, user
        pitch = pg_query(postgres_db, "INSERT INTO pitches (user_id, title)"
                                      " VALUES (4, 'Second') RETURNING id")
        assert pitch[0][0] > 5, pitch
    finally:
        await connector.close_all()
        daemon.stop()


async def test_users_of_a_conversation_the_app_made_while_they_were_online_see_presence(
    existing: Connector,
) -> None:
    """The app creates a conversation of two connected users: once it is used, they are each
    other's contacts (PROTOCOL.md 4.5): get_online_users lists the other, and a departure is
    announced."""
    alex = await existing(1, username="alex")
    stellar = await existing(3, username="stellar")
    _script(existing.daemon.database_url or "", """
        INSERT INTO conversations (id, created_by_id) VALUES (41, 1);
        SELECT setval('conversations_id_seq', 41);
        INSERT INTO conversation_participants (conversation_id, user_id) VALUES (41, 1), (41, 3);
    """)
    sent = await alex.request({"type": "send_message", "conversationId": 41, "content": "hi",
                               "requestId": "pr1"}, "message_sent", requestId="pr1")
    await stellar.expect("new_message", messageId=sent["messageId"])
    for me, other in ((alex, 3), (stellar, 1)):
        online = await me.request({"type": "get_online_users"}, "online_users")
        assert other in [u["userId"] for u in online["users"]], online
    await stellar.close()
    await alex.expect("user_offline", userId=3)


def _documented_grants(block: str, role: str) -> str:
    """The SQL of docs/deploy.md's block marked ``<!-- grants:{block} -->``, for ``role``."""
    text = (Path(__file__).parents[1] / "docs" / "deploy.md").read_text()
    after = text.split(f"<!-- grants:{block} -->", 1)[1]
    sql = after.split("```sql", 1)[1].split("```", 1)[0]
    return sql.replace("pitchey_ws", role)


@pytest.mark.parametrize("owner_first", [False, True])
async def test_the_documented_grants_are_enough(
    tmp_path: Path, pitchey_db: str, owner_first: bool,
) -> None:
    """The daemon runs as a role with exactly docs/deploy.md's grants (creating its ws_*
    tables itself, or after the owner's first start with the second block): messages, a
    backend conversation with its own id, likes, notifications and reads all work, and the
    log has no error."""
    role = f"pws_{tmp_path.name[-12:].replace('-', '_').lower()}"
    _script(pitchey_db, f"CREATE ROLE {role} LOGIN PASSWORD 'pw';"
                        + _documented_grants("app", role))
    if owner_first:
        (tmp_path / "owner").mkdir()
        first = Daemon(tmp_path / "owner", {"database.pitchey_schema": "existing"},
                       database_url=pitchey_db)
        first.start()
        first.stop()
        _script(pitchey_db, f"REVOKE CREATE ON SCHEMA public FROM {role};"
                            + _documented_grants("ws", role))
    narrow = re.sub(r"//[^@/]*@", f"//{role}:pw@", pitchey_db, count=1)
    daemon = Daemon(tmp_path, {"database.pitchey_schema": "existing", "api.key": KEY},
                    database_url=narrow)
    daemon.start()
    connector = Connector(daemon)
    try:
        alex = await connector(1, username="alex")
        sarah = await connector(2, username="sarah")
        sent = await alex.request({"type": "send_message", "conversationId": 40,
                                   "content": "hi", "requestId": "g1"},
                                  "message_sent", requestId="g1")
        await sarah.expect("new_message", messageId=sent["messageId"])
        await sarah.send({"type": "mark_read", "messageId": sent["messageId"]})
        await alex.expect("message_read", messageId=sent["messageId"])
        await sarah.send({"type": "pitch_like", "pitchId": 7})
        await alex.expect("pitch_liked", pitchId=7, userId=2)
        status, body = call(daemon, "POST", "/api/conversations",
                            {"id": 500, "participantIds": [1, 2], "createdBy": 1})
        assert status == 201, body
        status, body = call(daemon, "POST", "/api/publish",
                            {"users": [2], "event": {"type": "nda_signed"}})
        assert status == 200 and body["stored"] == 1, body
        status, body = call(daemon, "POST", "/api/messages/500/read", {},
                            token=make_token(2))
        assert status == 200, body
    finally:
        await connector.close_all()
        daemon.stop()
    problems = [line for line in daemon.log_text().splitlines()
                if "ERROR" in line or "ermission denied" in line]
    assert not problems, problems
