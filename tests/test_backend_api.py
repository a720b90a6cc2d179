"""The backend's API (PROTOCOL.md 11): publish, profiles, conversations, participants, pitches."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from backend import KEY, call, put_pitch
from conftest import (
    ROOT,
    Client,
    Connector,
    Daemon,
    conversation,
    free_port,
    make_token,
    new_user,
    running,
)
from websockets.asyncio.client import connect as connect_ws
from websockets.exceptions import InvalidStatus


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, engine: str) -> Iterator[Daemon]:
    """This module's daemon, with the backend API on."""
    d = Daemon(tmp_path_factory.mktemp("backend"), {"api.key": KEY, "api.max_event_bytes": 512,
                                                    "api.max_publish_users": 5})
    d.start()
    yield d
    d.stop()


async def after_connected(client: Client) -> list[dict[str, object]]:
    await client.request({"type": "ping"}, "pong")
    frames, client.seen = list(client.seen), []
    return frames


def notifications_of(daemon: Daemon, user: int) -> int:
    return int(daemon.query(
        f"SELECT COUNT(*) FROM {daemon.table('notifications')} WHERE user_id = ?", (user,)
    )[0][0])


async def test_nda_signed_to_offline_creator_arrives_after_connected(
        daemon: Daemon, connect_to: Connector) -> None:
    """A publish of nda_signed to an offline creator comes after connected, with queuedAt."""
    creator = new_user()
    status, answer = call(daemon, "POST", "/api/publish", {
        "users": [creator], "event": {"type": "nda_signed", "pitchId": 3,
                                      "signedBy": "Victor Hale"}})
    assert status == 200
    assert answer["delivered"] == 0 and answer["stored"] == 1
    client = await connect_to(creator, wait_connected=False)
    assert (await client.recv())["type"] == "connected"
    frames = await after_connected(client)
    assert len(frames) == 1
    frame = frames[0]
    assert frame["type"] == "nda_signed" and frame["signedBy"] == "Victor Hale"
    assert frame["notificationId"] == answer["notificationIds"][0]
    assert {"createdAt", "queuedAt"} <= frame.keys()


async def test_live_publish_reaches_every_connection_once(daemon: Daemon,
                                                          connect_to: Connector) -> None:
    """A durable publish to an online user reaches each connection, and is not replayed."""
    user = new_user()
    tabs = [await connect_to(user), await connect_to(user)]
    for tab in tabs:  # past their (empty) replay: what comes now is live
        await tab.request({"type": "ping"}, "pong")
    status, answer = call(daemon, "POST", "/api/publish",
                          {"users": [user], "event": {"type": "pitch_saved", "pitchId": 9}})
    assert status == 200 and answer["delivered"] == 1 and answer["stored"] == 1
    for tab in tabs:
        frame = await tab.expect("pitch_saved")
        assert frame["notificationId"] == answer["notificationIds"][0]
        assert "queuedAt" not in frame
    later = await connect_to(user)
    assert [f for f in await after_connected(later) if f["type"] == "pitch_saved"] == []


async def test_idempotency_key_stores_one_notification(daemon: Daemon,
                                                       connect_to: Connector) -> None:
    """The same idempotencyKey twice stores and sends one notification, and answers the same."""
    user = new_user()
    client = await connect_to(user)
    body = {"users": [user], "event": {"type": "nda_signed"}, "idempotencyKey": f"k-{user}"}
    first = call(daemon, "POST", "/api/publish", body)
    second = call(daemon, "POST", "/api/publish", body)
    assert first[0] == second[0] == 200
    assert first[1] == second[1] and first[1]["delivered"] == 1
    await client.expect("nda_signed")
    await client.absent("nda_signed")
    assert notifications_of(daemon, user) == 1


async def test_ephemeral_publish_names_its_target(daemon: Daemon, connect_to: Connector) -> None:
    """A publish to a pitch reaches its watchers and owner with the pitch's pitchId (what
    usePitchUpdates filters on), one to a conversation carries its conversationId, and every
    ephemeral event gets a timestamp unless the backend gave one; nothing is stored."""
    owner_id, watcher_id, other_id = new_user(), new_user(), new_user()
    put_pitch(daemon, 9101, owner_id)
    owner, watcher, other = (await connect_to(owner_id), await connect_to(watcher_id),
                             await connect_to(other_id))
    await watcher.request({"type": "pitch_view", "pitchId": 9101}, "pitch_viewed")
    status, answer = call(daemon, "POST", "/api/publish", {
        "pitchId": 9101, "event": {"type": "pitch_updated", "field": "budget", "pitchId": 1}})
    assert status == 200 and answer == {"delivered": 2, "stored": 0, "notificationIds": []}
    for client in (owner, watcher):
        got = await client.expect("pitch_updated")
        assert got["pitchId"] == 9101 and got["field"] == "budget"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", got["timestamp"])
    cid = await conversation(owner, other_id)
    await other.expect("conversation_created")
    status, answer = call(daemon, "POST", "/api/publish", {
        "conversationId": cid, "event": {"type": "call_started", "timestamp": "then"}})
    assert status == 200 and answer["delivered"] == 2
    for client in (owner, other):
        got = await client.expect("call_started")
        assert got == {"type": "call_started", "timestamp": "then", "conversationId": cid}
    status, answer = call(daemon, "POST", "/api/publish", {
        "users": [other_id], "durable": False, "event": {"type": "poke"}})
    assert status == 200 and answer["delivered"] == 1
    assert set(await other.expect("poke")) == {"type", "timestamp"}
    assert notifications_of(daemon, other_id) == 0


@pytest.mark.parametrize("event_type", ["new_message", "error", "queued_message", "user_online",
                                        "pitch_liked", "new_comment", "notifications_read",
                                        "connected", "Nda", "1st", "", "a" * 65, "nda-signed"])
async def test_reserved_or_malformed_types_are_refused(daemon: Daemon, event_type: str) -> None:
    """The daemon's own frame types and types outside ^[a-z][a-z0-9_]{0,63}$ are 400."""
    user = new_user()
    status, body = call(daemon, "POST", "/api/publish",
                        {"users": [user], "event": {"type": event_type}})
    assert status == 400 and body["error"] == "invalid_message"
    assert notifications_of(daemon, user) == 0


def test_every_server_frame_type_is_reserved() -> None:
    """Each frame type protocol.py builds is in SERVER_FRAME_TYPES (the backend can't forge it)."""
    sys.path.insert(0, str(ROOT))
    import protocol

    source = (ROOT / "protocol.py").read_text()
    built = set(re.findall(r'encode\(\s*"([a-z_]+)"', source))
    assert built and built <= protocol.SERVER_FRAME_TYPES
    assert {"pitch_liked", "new_comment"} <= protocol.SERVER_FRAME_TYPES


@pytest.mark.parametrize("body, status", [
    ({"event": {"type": "x"}}, 400),
    ({"users": [1], "pitchId": 2, "event": {"type": "x"}}, 400),
    ({"users": [], "event": {"type": "x"}}, 400),
    ({"users": ["1"], "event": {"type": "x"}}, 400),
    ({"users": list(range(1, 8)), "event": {"type": "x"}}, 400),
    ({"users": [1], "event": "x"}, 400),
    ({"users": [1], "event": {"type": "x", "notificationId": 5}}, 400),
    ({"users": [1], "event": {"type": "x", "queuedAt": "now"}}, 400),
    ({"users": [1], "event": {"type": "x", "durable": 1}, "durable": "yes"}, 400),
    ({"pitchId": 1, "event": {"type": "x"}, "durable": True}, 400),
    ({"users": [1], "event": {"type": "x"}, "idempotencyKey": ""}, 400),
    ({"users": [1], "event": {"type": "x", "blob": "x" * 600}}, 413),
])
async def test_bad_publish_bodies_store_nothing(daemon: Daemon, body: dict[str, object],
                                                status: int) -> None:
    """Every malformed publish gets a clear 4xx error and stores nothing."""
    before = daemon.query(f"SELECT COUNT(*) FROM {daemon.table('notifications')}")
    got, answer = call(daemon, "POST", "/api/publish", body)
    assert got == status, answer
    assert answer["error"] and answer["message"]
    assert daemon.query(f"SELECT COUNT(*) FROM {daemon.table('notifications')}") == before


async def test_api_key_required_and_user_jwt_refused(daemon: Daemon) -> None:
    """Without the key, with a wrong one or with a user's JWT, the backend API is 401."""
    body = {"users": [new_user()], "event": {"type": "nda_signed"}}
    for key, token in ((None, None), ("wrong", None), (None, make_token(1))):
        status, answer = call(daemon, "POST", "/api/publish", body, key=key, token=token)
        assert status == 401 and answer["error"] == "invalid_api_key"
    status, _ = call(daemon, "PUT", "/api/pitches/1", {"ownerId": 1, "title": "t",
                                                       "visibility": "public"}, key="wrong")
    assert status == 401


async def test_no_key_configured_means_404(tmp_path: Path) -> None:
    """With no api.key the backend API does not exist: 404."""
    async with running(tmp_path, {}) as connect:
        for method, path in (("POST", "/api/publish"), ("PUT", "/api/users/1"),
                             ("POST", "/api/conversations"), ("PUT", "/api/pitches/1")):
            status, _ = call(connect.daemon, method, path, {})
            assert status == 404


async def test_removed_participant_stops_receiving_and_is_forbidden(
        daemon: Daemon, connect_to: Connector) -> None:
    """A participant removed over the API stops receiving on an open connection; forbidden."""
    a, b, c = new_user(), new_user(), new_user()
    cid = 70_000 + a
    body = {"id": cid, "participantIds": [b, c], "createdBy": a, "title": "Deal room"}
    ca, cb, cc = await connect_to(a), await connect_to(b), await connect_to(c)
    status, answer = call(daemon, "POST", "/api/conversations", body)
    assert status == 201 and answer["conversation"]["participantIds"] == sorted([a, b, c])
    # The conversation with conversation_joined's fields (PROTOCOL.md 4.4), also at the top.
    assert answer["conversationId"] == answer["id"] == cid and answer["messages"] == []
    assert answer["timestamp"] and answer["conversation"]["timestamp"] == answer["timestamp"]
    for client in (ca, cb, cc):
        await client.expect("conversation_created", conversationId=cid)
    assert call(daemon, "POST", "/api/conversations", body)[0] == 201  # the same body again
    assert call(daemon, "POST", "/api/conversations", {**body, "title": "Other"})[0] == 409
    await cc.send({"type": "typing_start", "conversationId": cid})
    await cb.expect("user_typing", userId=c, isTyping=True)
    status, answer = call(daemon, "POST", f"/api/conversations/{cid}/participants",
                          {"remove": [c]})
    assert status == 200 and answer["conversation"]["participantIds"] == sorted([a, b])
    await cb.expect("user_typing", userId=c, isTyping=False)
    await ca.request({"type": "send_message", "conversationId": cid, "content": "hi"},
                     "message_sent")
    await cb.expect("new_message", content="hi")
    status, again = call(daemon, "POST", "/api/conversations", {**body, "participantIds": [b]})
    assert status == 201 and [m["content"] for m in again["messages"]] == ["hi"]
    await cc.absent("new_message")
    error = await cc.request({"type": "send_message", "conversationId": cid, "content": "x"},
                             "error")
    assert error["code"] == "forbidden"
    error = await cc.request({"type": "join_conversation", "conversationId": cid}, "error")
    assert error["code"] == "forbidden"
    d = new_user()
    cd = await connect_to(d)
    status, _ = call(daemon, "POST", f"/api/conversations/{cid}/participants", {"add": [d]})
    assert status == 200
    await cd.expect("conversation_created", conversationId=cid)
    assert call(daemon, "POST", "/api/conversations/999999/participants", {"add": [d]})[0] == 404
    assert call(daemon, "POST", f"/api/conversations/{cid}/participants", {})[0] == 400


async def test_profiles_name_senders(daemon: Daemon, connect_to: Connector) -> None:
    """PUT /api/users and POST /api/users set the names shown for users without a name claim."""
    a, b = new_user(), new_user()
    assert call(daemon, "PUT", f"/api/users/{a}", {"name": "Ada L", "userType": "creator"})[0] \
        == 200
    assert call(daemon, "POST", "/api/users", [{"id": b, "username": "Bo"}])[0] == 200
    assert call(daemon, "POST", "/api/users", [{"id": "x"}])[0] == 400
    sender = await connect_to(a, token=make_token(a))
    assert (await sender.request({"type": "ping"}, "pong"))["userId"] == a
    rows = daemon.query("SELECT id, username FROM users WHERE id IN (?, ?) ORDER BY id", (a, b))
    assert rows == [(a, "Ada L"), (b, "Bo")]


async def test_a_profile_reaches_connected_users(daemon: Daemon, connect_to: Connector) -> None:
    """A profile the backend registers while the user is connected names them from then on
    (new_message's senderName, online_users), unless their token names them: a claim wins.
    The answer is the profile as stored (a field left out keeps its value)."""
    plain, claimed, peer = new_user(), new_user(), new_user()
    assert call(daemon, "PUT", f"/api/users/{plain}", {"name": "Maya Chen"})[0] == 200
    me = await connect_to(plain, token=make_token(plain))
    them = await connect_to(claimed, token=make_token(claimed, username="Token Name"))
    other = await connect_to(peer)
    assert (await me.request({"type": "ping"}, "pong"))["userId"] == plain
    status, answer = call(daemon, "PUT", f"/api/users/{plain}",
                          {"username": "Maya C.", "userType": "creator"})
    assert status == 200 and answer["user"] == {"id": plain, "username": "Maya C.",
                                                "userType": "creator"}
    status, answer = call(daemon, "PUT", f"/api/users/{plain}", {})
    assert status == 200 and answer["user"]["username"] == "Maya C."
    assert call(daemon, "PUT", f"/api/users/{claimed}", {"name": "Backend Name"})[0] == 200
    for sender, name in ((me, "Maya C."), (them, "Token Name")):
        cid = await conversation(sender, peer)
        await other.expect("conversation_created", conversationId=cid)
        await sender.request({"type": "send_message", "conversationId": cid, "content": "hi"},
                             "message_sent")
        got = await other.expect("new_message", conversationId=cid)
        assert got["senderName"] == name
    online = await other.request({"type": "get_online_users"}, "online_users")
    names = {u["userId"]: (u["username"], u["userType"]) for u in online["users"]}
    assert names[plain] == ("Maya C.", "creator") and names[claimed][0] == "Token Name"


async def test_publish_cli(daemon: Daemon, connect_to: Connector) -> None:
    """`pitchey_ws.py publish` posts the event with the key from PITCHEY_WS_API_KEY."""
    user = new_user()
    client = await connect_to(user)
    env = {**os.environ, "PITCHEY_WS_API_KEY": KEY}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "pitchey_ws.py"), "publish", "--url", daemon.http,
         "--user", str(user), "--type", "nda_signed", "--data", '{"pitchId": 3}'],
        env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert '"stored": 1' in done.stdout
    await client.expect("nda_signed", pitchId=3)


def test_backend_doc_curl_commands_work(daemon: Daemon) -> None:
    """The curl commands in docs/backend.md run as written against a daemon."""
    text = (ROOT / "docs" / "backend.md").read_text()
    commands = [block.replace("\\\n", " ") for block in
                re.findall(r"```sh\n(curl .*?)```", text, re.S)]
    assert len(commands) >= 5
    env = {**os.environ, "PITCHEY_WS_API_KEY": KEY, "WS": daemon.http}
    for command in commands:
        done = subprocess.run(["sh", "-c", command.strip() + " --fail-with-body -sS"], env=env,
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, (shlex.quote(command), done.stdout, done.stderr)


async def test_backend_api_on_a_listener_of_its_own(tmp_path: Path) -> None:
    """api.port: the backend's API (and /api/health) answers on that listener and no longer
    on the main port (404); the users' routes and WebSockets stay on the main port."""
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    async with running(tmp_path, {"api.key": KEY, "api.port": api_port}) as connect:
        d = connect.daemon
        assert f"backend API listening on {api}" in d.log_text()
        user = new_user()
        client = await connect(user)
        await client.request({"type": "ping"}, "pong")
        publish = {"users": [user], "event": {"type": "pitch_saved", "pitchId": 4}}
        status, answer = call(d, "POST", "/api/publish", publish, base=api)
        assert status == 200 and answer["delivered"] == 1, answer
        await client.expect("pitch_saved", pitchId=4)
        status, answer = call(d, "POST", "/api/publish", publish)
        assert status == 404 and answer["error"] == "not_found", answer
        assert call(d, "GET", "/api/health", key=None, base=api)[0] == 200
        token = make_token(user)
        assert call(d, "GET", "/api/messages/conversations", token=token, base=api)[0] == 404
        assert call(d, "GET", "/api/messages/conversations", token=token)[0] == 200
        with pytest.raises(InvalidStatus) as refused:
            await connect_ws(f"ws://127.0.0.1:{api_port}/api/messages/ws?token={token}")
        assert refused.value.response.status_code == 404


async def test_inbox_names_the_pitch_of_a_conversation(daemon: Daemon) -> None:
    """A conversation about a pitch the backend registered shows the pitch's title in the
    inbox (pitchTitle); one about a pitch the daemon does not have shows null."""
    a, b = new_user(), new_user()
    pitch = 80_000 + a
    put_pitch(daemon, pitch, a, title="Night Train")
    for cid, pitch_id in ((80_000 + a, pitch), (80_000 + b, pitch + 1)):
        status, _ = call(daemon, "POST", "/api/conversations",
                         {"id": cid, "participantIds": [b], "createdBy": a, "pitchId": pitch_id})
        assert status == 201
    status, body = call(daemon, "GET", "/api/messages/conversations", token=make_token(b))
    assert status == 200
    titles = {c["id"]: (c["pitchId"], c["pitchTitle"]) for c in body["conversations"]}
    assert titles == {80_000 + a: (pitch, "Night Train"), 80_000 + b: (pitch + 1, None)}
    # The conversation's pitch is part of "the body matches" (409 otherwise), and every
    # answer reports the stored one.
    same = {"id": 80_000 + a, "participantIds": [b], "createdBy": a, "pitchId": pitch}
    status, answer = call(daemon, "POST", "/api/conversations", same)
    assert status == 201 and answer["conversation"]["pitchId"] == pitch
    status, answer = call(daemon, "POST", "/api/conversations", {**same, "pitchId": pitch + 1})
    assert status == 409 and answer["error"] == "conflict"
    status, answer = call(daemon, "POST", "/api/conversations", {**same, "pitchId": None})
    assert status == 409
    status, answer = call(daemon, "POST", f"/api/conversations/{80_000 + a}/participants",
                          {"add": [new_user()]})
    assert status == 200 and answer["conversation"]["pitchId"] == pitch
    assert daemon.query(f"SELECT pitch_id FROM {daemon.table('conversations')} WHERE id = ?",
                        (80_000 + a,)) == [(pitch,)]
