"""Notifications (PROTOCOL.md 10): stored before sent, live as their own type, replayed once."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend import KEY, call, put_pitch
from conftest import (
    Client,
    Connector,
    Daemon,
    conversation,
    eventually_db,
    make_token,
    new_user,
    write_config,
)

_pitch_ids = itertools.count(500)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Iterator[Daemon]:
    """This module's daemon, with the backend API on."""
    d = Daemon(tmp_path_factory.mktemp("notifications"), {"api.key": KEY})
    d.start()
    yield d
    d.stop()


async def replay(client: Client) -> list[dict[str, object]]:
    """Every frame a new connection got before the answer to its first ping."""
    await client.request({"type": "ping"}, "pong")
    frames, client.seen = list(client.seen), []
    return frames


async def test_offline_owner_finds_like_and_comment_once(daemon: Daemon,
                                                         connect_to: Connector) -> None:
    """An offline owner gets the like and the comment after connected, once, with queuedAt."""
    owner_id = new_user()
    pitch = next(_pitch_ids)
    put_pitch(daemon, pitch, owner_id)
    fan = await connect_to(username="fan")
    await fan.send({"type": "pitch_like", "pitchId": pitch})
    await fan.request({"type": "pitch_comment", "pitchId": pitch, "comment": "Love it"},
                      "comment_sent")
    owner = await connect_to(owner_id)
    frames = await replay(owner)
    assert [f["type"] for f in frames] == ["pitch_liked", "new_comment"]
    like, comment = frames
    assert like["pitchId"] == pitch and like["likeCount"] == 1 and like["userId"] == fan.user_id
    assert comment["comment"] == "Love it" and comment["username"] == "fan"
    for frame in frames:
        assert {"notificationId", "createdAt", "queuedAt"} <= frame.keys()
    await owner.close()
    again = await connect_to(owner_id)
    assert await replay(again) == []
    page = await again.request({"type": "get_notifications"}, "notifications")
    assert [n["type"] for n in page["notifications"]] == ["new_comment", "pitch_liked"]
    assert page["unreadCount"] == 2 and page["hasMore"] is False
    assert page["notifications"][0]["readAt"] is None


async def test_owner_comments_and_likes_make_no_notification(daemon: Daemon,
                                                             connect_to: Connector) -> None:
    """Likes and comments by the owner on their own pitch are not notifications."""
    owner_id = new_user()
    pitch = next(_pitch_ids)
    put_pitch(daemon, pitch, owner_id)
    owner = await connect_to(owner_id)
    await owner.send({"type": "pitch_like", "pitchId": pitch})
    liked = await owner.expect("pitch_liked")
    assert "notificationId" not in liked
    await owner.request({"type": "pitch_comment", "pitchId": pitch, "comment": "mine"},
                        "comment_sent")
    assert daemon.query(f"SELECT COUNT(*) FROM {daemon.table('notifications')} WHERE user_id = ?",
                        (owner_id,)) == [(0,)]


async def test_read_marks_reach_every_connection(daemon: Daemon, connect_to: Connector) -> None:
    """mark_notifications_read answers notifications_read on every connection of the user."""
    user = new_user()
    status, answer = call(daemon, "POST", "/api/publish", {
        "users": [user, user], "event": {"type": "nda_signed", "pitchId": 1}})
    assert status == 200 and answer["stored"] == 1
    status, answer = call(daemon, "POST", "/api/publish", {
        "users": [user], "event": {"type": "nda_signed", "pitchId": 2}})
    first, second = await connect_to(user), await connect_to(user)
    ids = [n["notificationId"] for n in
           (await first.request({"type": "get_notifications"}, "notifications"))["notifications"]]
    assert len(ids) == 2
    await first.send({"type": "mark_notifications_read", "notificationIds": [ids[0]]})
    for c in (first, second):
        read = await c.expect("notifications_read")
        assert read == {"type": "notifications_read", "notificationIds": [ids[0]],
                        "unreadCount": 1}
    unread = await first.request({"type": "get_notifications", "unreadOnly": True},
                                 "notifications")
    assert [n["notificationId"] for n in unread["notifications"]] == [ids[1]]
    token = make_token(user)
    status, body = call(daemon, "GET", "/api/notifications?unread=1", token=token)
    assert status == 200 and body["unreadCount"] == 1 and len(body["notifications"]) == 1
    status, body = call(daemon, "POST", "/api/notifications/read", {"all": True}, token=token)
    assert status == 200 and body["unreadCount"] == 0 and body["notificationIds"] == [ids[1]]
    for c in (first, second):
        await c.expect("notifications_read", notificationIds=[ids[1]], unreadCount=0)
    page = await second.request({"type": "get_notifications", "limit": 1}, "notifications")
    assert page["hasMore"] is True and page["notifications"][0]["readAt"] is not None


@pytest.mark.parametrize("frame", [
    {"type": "mark_notifications_read"},
    {"type": "mark_notifications_read", "notificationIds": []},
    {"type": "mark_notifications_read", "notificationIds": ["1"]},
    {"type": "mark_notifications_read", "all": False},
    {"type": "mark_notifications_read", "all": True, "notificationIds": [1]},
    {"type": "get_notifications", "limit": 0},
    {"type": "get_notifications", "beforeId": "x"},
    {"type": "get_notifications", "unreadOnly": 1},
])
async def test_bad_notification_frames(daemon: Daemon, connect_to: Connector,
                                       frame: dict[str, object]) -> None:
    """Mistyped notification frames are invalid_message; the HTTP twin answers 400."""
    client = await connect_to()
    error = await client.request(frame, "error")
    assert error["code"] == "invalid_message"
    if frame["type"] == "mark_notifications_read":
        body = {k: v for k, v in frame.items() if k != "type"}
        status, _ = call(daemon, "POST", "/api/notifications/read", body,
                         token=make_token(client.user_id))
        assert status == 400


async def test_replay_merges_messages_and_notifications_in_order(
        daemon: Daemon, connect_to: Connector) -> None:
    """An offline user's messages and notifications come back in the order they were queued."""
    sender = await connect_to()
    user = new_user()
    cid = await conversation(sender, user)
    await sender.request({"type": "send_message", "conversationId": cid, "content": "one"},
                         "message_sent")
    call(daemon, "POST", "/api/publish", {"users": [user], "event": {"type": "nda_signed"}})
    await sender.request({"type": "send_message", "conversationId": cid, "content": "two"},
                         "message_sent")
    client = await connect_to(user)
    frames = [f for f in await replay(client) if f["type"] != "user_online"]
    assert [f.get("content") for f in frames if f["type"] == "queued_message"] == ["one", "two"]
    # Oldest queued first. Queue times have milliseconds: events of one millisecond come
    # messages first, then notifications (docs/protocol.md), so "two" may precede the
    # notification when both were queued within the same millisecond.
    rank = {"queued_message": 0, "nda_signed": 2}
    assert frames == sorted(frames, key=lambda f: (f["queuedAt"], rank[f["type"]]))
    assert sorted(f["type"] for f in frames) == ["nda_signed", "queued_message", "queued_message"]


async def test_like_survives_kill_9_and_is_delivered_once(tmp_path: Path) -> None:
    """A like on an offline owner's pitch, then kill -9: on return the owner gets it once."""
    d = Daemon(tmp_path, {"api.key": KEY})
    d.start()
    connect = Connector(d)
    try:
        owner_id = new_user()
        put_pitch(d, 7, owner_id)
        fan = await connect()
        await fan.send({"type": "pitch_like", "pitchId": 7})
        await fan.request({"type": "pitch_comment", "pitchId": 7, "comment": "c"},
                          "comment_sent")
        await eventually_db(d, f"SELECT COUNT(*) FROM {d.table('notifications')} WHERE user_id = ?",
                            (owner_id,), [(2,)])
        d.kill()
        d.start()
        owner = await connect(owner_id)
        frames = await replay(owner)
        assert [f["type"] for f in frames] == ["pitch_liked", "new_comment"]
        assert all("queuedAt" in f for f in frames)
        await eventually_db(d, f"SELECT COUNT(*) FROM {d.table('notifications')} WHERE user_id = ?"
                            " AND delivered_at IS NULL", (owner_id,), [(0,)])
        d.kill()
        d.start()
        owner = await connect(owner_id)
        assert await replay(owner) == []
    finally:
        await connect.close_all()
        if d.proc is not None:
            d.stop()


async def test_at_most_max_per_user_read_ones_first(tmp_path: Path) -> None:
    """A user keeps at most notifications.max_per_user: each write that adds one drops the
    oldest read ones first, then the oldest unread ones; a lower bound set at a restart is
    applied by the prune at startup."""
    overrides = {"api.key": KEY, "notifications.max_per_user": 3}
    d = Daemon(tmp_path, overrides)
    d.start()
    try:
        user = new_user()
        token = make_token(user)
        table = d.table("notifications")

        def publish(n: int) -> int:
            status, answer = call(d, "POST", "/api/publish",
                                  {"users": [user], "event": {"type": "note", "n": n}})
            assert status == 200 and answer["stored"] == 1
            return int(answer["notificationIds"][0])

        ids = [publish(n) for n in range(3)]
        status, _ = call(d, "POST", "/api/notifications/read", {"notificationIds": ids[1:]},
                         token=token)
        assert status == 200
        ids.append(publish(3))  # 4 of 3: the oldest read one goes
        assert d.query(f"SELECT id FROM {table} WHERE user_id = ? ORDER BY id", (user,)) == [
            (ids[0],), (ids[2],), (ids[3],)]
        ids.append(publish(4))  # then the other read one
        ids.append(publish(5))  # then the oldest unread one
        expected = [ids[3], ids[4], ids[5]]
        assert d.query(f"SELECT id FROM {table} WHERE user_id = ? ORDER BY id",
                       (user,)) == [(i,) for i in expected]
        status, body = call(d, "GET", "/api/notifications", token=token)
        assert status == 200 and body["unreadCount"] == 3
        assert [n["notificationId"] for n in body["notifications"]] == expected[::-1]
        # A lower bound from the next start: the prune at startup keeps the newest two.
        d.stop()
        write_config(d.config, {"presence.offline_grace_seconds": 0,
                                **({"database.url": d.database_url} if d.database_url else {}),
                                **overrides, "notifications.max_per_user": 2})
        d.start()
        await eventually_db(d, f"SELECT id FROM {table} WHERE user_id = ? ORDER BY id",
                            (user,), [(i,) for i in expected[1:]])
    finally:
        if d.proc is not None:
            d.stop()


async def test_nda_signed_carries_a_timestamp(daemon: Daemon, connect_to: Connector) -> None:
    """nda_signed published without a timestamp gets createdAt as one (the Pitchey frontend
    reads {signedBy, timestamp, pitchId}), live, replayed and listed; a given one is kept."""
    online, offline = new_user(), new_user()
    live = await connect_to(online)
    event = {"type": "nda_signed", "pitchId": 3, "signedBy": "Victor Hale"}
    status, _ = call(daemon, "POST", "/api/publish", {"users": [online, offline], "event": event})
    assert status == 200
    frame = await live.expect("nda_signed")
    assert frame["timestamp"] == frame["createdAt"] and frame["signedBy"] == "Victor Hale"
    back = await connect_to(offline)
    queued = await back.expect("nda_signed")
    assert queued["timestamp"] == queued["createdAt"] and "queuedAt" in queued
    listed = (await back.request({"type": "get_notifications"}, "notifications"))
    assert listed["notifications"][0]["timestamp"] == queued["createdAt"]
    given = {**event, "timestamp": "2026-11-30T10:00:00.000Z"}
    call(daemon, "POST", "/api/publish", {"users": [online], "event": given})
    frame = await live.expect("nda_signed")
    assert frame["timestamp"] == "2026-11-30T10:00:00.000Z"
