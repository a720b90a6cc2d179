"""Pitch activity (PROTOCOL.md 9): views, likes, comments and comment typing, over real sockets."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend import KEY, call, put_pitch
from conftest import Connector, Daemon, conversation, make_token, new_user

_pitch_ids = itertools.count(100)
MAX_CHARS = 100


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Iterator[Daemon]:
    """This module's daemon: the backend API on, small limits to reach."""
    d = Daemon(tmp_path_factory.mktemp("pitch"), {
        "api.key": KEY, "limits.max_pitch_subscriptions": 3,
        "limits.max_content_chars": MAX_CHARS, "typing.ttl_seconds": 30})
    d.start()
    yield d
    d.stop()


async def test_watchers_and_owner_see_each_event_once(daemon: Daemon,
                                                      connect_to: Connector) -> None:
    """Two watchers and the owner see a view, a like, an unlike, a comment and typing once."""
    owner_id = new_user()
    pitch = next(_pitch_ids)
    put_pitch(daemon, pitch, owner_id)
    owner = await connect_to(owner_id, username="owner")
    owner_sub = await connect_to(owner_id, username="owner")  # the owner's, and subscribed
    a = await connect_to(username="alice")
    b = await connect_to(username="bob")
    await owner_sub.send({"type": "pitch_view", "pitchId": pitch})
    for c in (owner, owner_sub):
        seen = await c.expect("pitch_viewed", pitchId=pitch, viewCount=1)
        assert seen["userId"] == owner_id
    await b.send({"type": "pitch_view", "pitchId": pitch})
    await b.expect("pitch_viewed", viewCount=2)
    for c in (owner, owner_sub):
        assert (await c.expect("pitch_viewed", viewCount=2))["userId"] == b.user_id
    await a.send({"type": "pitch_view", "pitchId": pitch})
    for c in (a, b):
        frame = await c.expect("pitch_viewed", pitchId=pitch, viewCount=3)
        assert "userId" not in frame and "username" not in frame
    for c in (owner, owner_sub):
        frame = await c.expect("pitch_viewed", viewCount=3)
        assert frame["userId"] == a.user_id and frame["username"] == "alice"
    # A second view by the same user changes nothing and notifies no one.
    await a.send({"type": "pitch_view", "pitchId": pitch})
    # The sender's barrier first: once its ping is answered, its frames were handled.
    for c in (a, owner, owner_sub, b):
        await c.absent("pitch_viewed")
    everyone = (b, owner, owner_sub, a)

    await b.send({"type": "pitch_like", "pitchId": pitch})
    for c in everyone:
        frame = await c.expect("pitch_liked", pitchId=pitch, likeCount=1, userId=b.user_id)
        assert frame["username"] == "bob"
        assert ("notificationId" in frame) == (c.user_id == owner_id)
    await b.send({"type": "pitch_like", "pitchId": pitch})  # idempotent
    await b.send({"type": "pitch_unlike", "pitchId": pitch})
    for c in everyone:
        await c.expect("pitch_unliked", pitchId=pitch, likeCount=0, userId=b.user_id)
    await b.send({"type": "pitch_unlike", "pitchId": pitch})
    for c in everyone:  # b first
        await c.absent("pitch_liked")
        await c.absent("pitch_unliked")

    await a.send({"type": "typing", "pitchId": pitch, "isTyping": True})
    await a.send({"type": "typing", "pitchId": pitch, "isTyping": True})  # a repeat: nothing
    for c in (owner, owner_sub, b):
        await c.expect("user_typing", pitchId=pitch, userId=a.user_id, isTyping=True)
    await a.send({"type": "pitch_comment", "pitchId": pitch, "comment": "Great logline",
                  "requestId": "c1"})
    sent = await a.expect("comment_sent", requestId="c1")
    assert sent["comment"] == "Great logline" and sent["pitchId"] == pitch
    # The commenter watches too: its own new_comment (what the Pitchey page lists), besides
    # the comment_sent answer.
    mine = await a.expect("new_comment", commentId=sent["commentId"])
    assert mine["comment"] == "Great logline" and "requestId" not in mine
    for c in (owner, owner_sub, b):
        frame = await c.expect("new_comment", commentId=sent["commentId"])
        assert frame["userId"] == a.user_id and frame["username"] == "alice"
        assert ("notificationId" in frame) == (c.user_id == owner_id)
        await c.expect("user_typing", pitchId=pitch, userId=a.user_id, isTyping=False)
    for c in (a, b, owner, owner_sub):
        await c.absent("user_typing")
        await c.absent("new_comment")
    await a.absent("comment_sent")

    activity = await a.request({"type": "get_pitch_activity", "pitchId": pitch},
                               "pitch_activity")
    assert activity["viewCount"] == 3 and activity["likeCount"] == 0
    assert activity["likedByMe"] is False and activity["ownerId"] == owner_id
    assert [c["comment"] for c in activity["comments"]] == ["Great logline"]
    assert activity["hasMore"] is False and activity["title"] == "A pitch"
    status, body = call(daemon, "GET", f"/api/pitches/{pitch}/activity",
                        token=make_token(b.user_id))
    assert status == 200 and body["viewCount"] == 3 and body["comments"][0]["userId"] == a.user_id


async def test_comment_request_id_is_idempotent(daemon: Daemon, connect_to: Connector) -> None:
    """The same comment requestId twice stores one comment and tells the watchers once."""
    owner_id = new_user()
    pitch = next(_pitch_ids)
    put_pitch(daemon, pitch, owner_id)
    a = await connect_to()
    w = await connect_to()
    await w.request({"type": "pitch_view", "pitchId": pitch}, "pitch_viewed")
    frame = {"type": "pitch_comment", "pitchId": pitch, "comment": "hi", "requestId": "same"}
    first = await a.request(frame, "comment_sent")
    again = await a.request(frame, "comment_sent")
    assert first["commentId"] == again["commentId"]
    await w.expect("new_comment", commentId=first["commentId"])
    await w.absent("new_comment")
    assert daemon.query(f"SELECT COUNT(*) FROM {daemon.table('pitch_comments')} WHERE pitch_id = ?",
                        (pitch,)) == [(1,)]


async def test_private_pitch_is_forbidden_for_every_frame(daemon: Daemon,
                                                          connect_to: Connector) -> None:
    """A user not allowed on a private pitch (or any user on an unknown one) gets forbidden,
    naming the pitch (every pitch frame carries pitchId)."""
    owner_id, friend_id = new_user(), new_user()
    pitch = next(_pitch_ids)
    put_pitch(daemon, pitch, owner_id, private=True, allowed=[friend_id])
    stranger = await connect_to()
    frames = [
        {"type": "pitch_view"}, {"type": "pitch_leave"}, {"type": "pitch_like"},
        {"type": "pitch_unlike"}, {"type": "pitch_comment", "comment": "let me in"},
        {"type": "typing", "isTyping": True}, {"type": "get_pitch_activity"},
    ]
    for target in (pitch, 999_999):
        for frame in frames:
            error = await stranger.request({**frame, "pitchId": target}, "error")
            assert error["code"] == "forbidden" and error["pitchId"] == target, (frame, error)
    assert daemon.query("SELECT COUNT(*) FROM pitch_views WHERE pitch_id = ?", (pitch,)) == [(0,)]
    assert daemon.query(f"SELECT COUNT(*) FROM {daemon.table('pitch_comments')} WHERE pitch_id = ?",
                        (pitch,)) == [(0,)]
    status, _ = call(daemon, "GET", f"/api/pitches/{pitch}/activity",
                     token=make_token(stranger.user_id))
    assert status == 403
    friend = await connect_to(friend_id)
    await friend.request({"type": "pitch_view", "pitchId": pitch}, "pitch_viewed", viewCount=1)
    error = await friend.request({"type": "pitch_comment", "pitchId": pitch, "comment": " "},
                                 "error")
    assert error["code"] == "invalid_message" and error["pitchId"] == pitch


async def test_leave_and_subscription_limit(daemon: Daemon, connect_to: Connector) -> None:
    """pitch_leave stops the events; more than max_pitch_subscriptions is invalid_message."""
    owner_id = new_user()
    pitches = [next(_pitch_ids) for _ in range(4)]
    for pitch in pitches:
        put_pitch(daemon, pitch, owner_id)
    watcher = await connect_to()
    liker = await connect_to()
    for pitch in pitches[:3]:
        await watcher.request({"type": "pitch_view", "pitchId": pitch}, "pitch_viewed")
    error = await watcher.request({"type": "pitch_view", "pitchId": pitches[3]}, "error")
    assert error["code"] == "invalid_message"
    await watcher.send({"type": "pitch_leave", "pitchId": pitches[0]})
    await watcher.request({"type": "pitch_view", "pitchId": pitches[3]}, "pitch_viewed")
    await liker.send({"type": "pitch_like", "pitchId": pitches[0]})
    await liker.send({"type": "pitch_like", "pitchId": pitches[1]})
    await watcher.expect("pitch_liked", pitchId=pitches[1])
    await watcher.absent("pitch_liked")


@pytest.mark.parametrize("frame", [
    {"type": "pitch_comment", "comment": ""},
    {"type": "pitch_comment", "comment": "   "},
    {"type": "pitch_comment", "comment": "x" * (MAX_CHARS + 1)},
    {"type": "pitch_comment", "comment": 5},
    {"type": "pitch_comment"},
    {"type": "typing"},
    {"type": "typing", "isTyping": "yes"},
    {"type": "get_pitch_activity", "limit": 0},
])
async def test_bad_pitch_frames_are_invalid(daemon: Daemon, connect_to: Connector,
                                            frame: dict[str, object]) -> None:
    """Bad comment content and mistyped fields are invalid_message, with nothing stored."""
    pitch = next(_pitch_ids)
    put_pitch(daemon, pitch, new_user())
    client = await connect_to()
    error = await client.request({**frame, "pitchId": pitch}, "error")
    assert error["code"] == "invalid_message"
    error = await client.request({**frame, "pitchId": "seven"}, "error")
    assert error["code"] == "invalid_message"
    assert daemon.query(f"SELECT COUNT(*) FROM {daemon.table('pitch_comments')} WHERE pitch_id = ?",
                        (pitch,)) == [(0,)]


async def test_bad_pitch_registrations_are_refused(daemon: Daemon) -> None:
    """PUT /api/pitches with a bad owner, title or visibility is 400, and stores nothing."""
    pitch = next(_pitch_ids)
    good = {"ownerId": 5, "title": "T", "visibility": "public"}
    for bad in ({**good, "ownerId": "5"}, {**good, "title": ""}, {**good, "title": "x" * 201},
                {**good, "visibility": "secret"}, {**good, "allowedUserIds": [0]}):
        status, body = call(daemon, "PUT", f"/api/pitches/{pitch}", bad)
        assert status == 400 and body["error"] == "invalid_message", (bad, body)
    assert daemon.query("SELECT COUNT(*) FROM pitches WHERE id = ?", (pitch,)) == [(0,)]


async def test_demo_seeds_pitches_and_signs_an_nda(tmp_path: Path) -> None:
    """Demo mode seeds a public and a private pitch; POST /demo/sign-nda reaches the creator."""
    d = Daemon(tmp_path)
    d.start("--demo")
    try:
        status, _, raw = d.get("/demo/token?userId=1")
        token = json.loads(raw)["token"]
        creator = await Connector(d)(1, token=token)
        await creator.request({"type": "ping"}, "pong")
        activity = await creator.request({"type": "get_pitch_activity", "pitchId": 2},
                                         "pitch_activity")
        assert activity["ownerId"] == 1 and activity["title"]
        status, body = call(d, "POST", "/demo/sign-nda", {}, key=None)
        assert status == 200 and body["stored"] == 1
        frame = await creator.expect("nda_signed", pitchId=2)
        assert frame["signedBy"].startswith("Victor") and "notificationId" in frame
        await creator.close()
    finally:
        d.stop()


async def test_text_with_nul_is_refused_everywhere(daemon: Daemon, connect_to: Connector) -> None:
    """U+0000 in any text that is stored (PostgreSQL's text cannot hold it) is invalid_message
    naming the field, on every engine and door, and nothing is stored; the socket stays open."""
    owner_id, other = new_user(), new_user()
    pitch = next(_pitch_ids)
    put_pitch(daemon, pitch, owner_id)
    client = await connect_to(owner_id, username="owner")
    await connect_to(other)
    conv = await conversation(client, other)
    attachment = {"type": "file", "url": "https://x.test/a", "filename": "a\x00b", "size": 1}
    frames = [
        ({"type": "send_message", "conversationId": conv, "content": "a\x00b"}, "content"),
        ({"type": "send_message", "conversationId": conv, "content": "ok",
          "subject": "s\x00"}, "subject"),
        ({"type": "send_message", "conversationId": conv, "content": "ok",
          "attachments": [attachment]}, "filename"),
        ({"type": "send_message", "conversationId": conv, "content": "ok",
          "requestId": "r\x00"}, "requestId"),
        ({"type": "create_conversation", "participantIds": [other], "title": "t\x00"}, "title"),
        ({"type": "pitch_comment", "pitchId": pitch, "comment": "c\x00"}, "comment"),
    ]
    for frame, field in frames:
        error = await client.request(frame, "error")
        assert error["code"] == "invalid_message", (frame, error)
        assert f"{field} must not contain NUL" in error.get("detail", error["message"]), error
    token = make_token(owner_id)
    status, body = call(daemon, "POST", "/api/messages/send",
                        {"conversationId": conv, "content": "x\x00"}, token=token)
    assert status == 400 and body["error"] == "invalid_message", body
    for method, path, request in (
        ("PUT", f"/api/users/{other}", {"username": "n\x00"}),
        ("PUT", f"/api/pitches/{pitch}", {"ownerId": owner_id, "title": "p\x00",
                                         "visibility": "public"}),
        ("POST", "/api/conversations", {"participantIds": [other], "createdBy": owner_id,
                                        "title": "t\x00"}),
        ("POST", "/api/publish", {"users": [other], "event": {"type": "nda_signed"},
                                  "idempotencyKey": "k\x00"}),
    ):
        status, body = call(daemon, method, path, request)
        assert status == 400 and "must not contain NUL" in body["message"], (path, body)
    page = await client.request({"type": "get_messages", "conversationId": conv}, "messages")
    assert page["messages"] == []
    activity = await client.request({"type": "get_pitch_activity", "pitchId": pitch},
                                    "pitch_activity")
    assert activity["comments"] == [] and activity["title"] == "A pitch"


async def test_a_refused_publish_does_not_keep_its_idempotency_key(
    daemon: Daemon, connect_to: Connector,
) -> None:
    """A live-only publish with an idempotencyKey that is refused (its pitch is not known
    yet) leaves no answer under the key: the backend's retry once the pitch exists is sent
    (PROTOCOL.md 11), not answered with the refused attempt's claim."""
    owner_id = new_user()
    pitch = next(_pitch_ids)
    body = {"pitchId": pitch, "event": {"type": "casting_call"}, "idempotencyKey": f"k{pitch}"}
    status, answer = call(daemon, "POST", "/api/publish", body)
    assert status == 400 and answer["error"] == "invalid_message", answer
    put_pitch(daemon, pitch, owner_id)
    owner = await connect_to(owner_id)
    status, answer = call(daemon, "POST", "/api/publish", body)
    assert status == 200 and answer["delivered"] == 1, answer
    await owner.expect("casting_call", pitchId=pitch)
    status, again = call(daemon, "POST", "/api/publish", body)
    assert status == 200 and again == answer
    await owner.absent("casting_call")
