"""Several daemons on one PostgreSQL database and one Redis (PROTOCOL.md 13).

Real servers on loopback: redis-server (servers.RedisServer), PostgreSQL (one database shared
by the daemons), and daemons on ports of their own. Waits are on frames; a node's death is seen
within ``presence.node_ttl_seconds``, short here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from backend import KEY, call, put_pitch
from conftest import (
    TIMEOUT,
    Client,
    Connector,
    Daemon,
    eventually,
    eventually_db,
    make_token,
    new_user,
)
from servers import PostgresServer, RedisServer, SlowLink

TTL = 2.0
OVERRIDES: dict[str, Any] = {
    "presence.offline_grace_seconds": 0,
    "presence.node_ttl_seconds": TTL,
    "presence.heartbeat_seconds": 0.3,
    "backplane.reconnect_max_seconds": 0.5,
    "limits.frames_burst": 20,
    "limits.frames_per_second": 1,
    "api.key": KEY,
}
TYPING_ROW = "SELECT is_typing FROM typing_indicators WHERE conversation_id = ? AND user_id = ?"


class Cluster:
    def __init__(self, tmp: Path, database_url: str, redis_url: str, nodes: int,
                 overrides: dict[str, Any] | None = None) -> None:
        settings = {**OVERRIDES, "backplane.url": redis_url, **(overrides or {})}
        self.redis_url = redis_url
        self.nodes = [Daemon(tmp / f"node{i}", settings, database_url=database_url)
                      for i in range(nodes)]
        self.connectors = [Connector(node) for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:  # one after the other: the first creates the schema
            node.start()

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                with contextlib.suppress(Exception):
                    node.stop()

    async def close_clients(self) -> None:
        for connector in self.connectors:
            await connector.close_all()


def _cluster(tmp: Path, postgres: PostgresServer, redis: RedisServer, nodes: int) -> Cluster:
    url = postgres.create_database()
    # Daemon writes its config in __init__; the directory must exist first.
    for i in range(nodes):
        (tmp / f"node{i}").mkdir(parents=True, exist_ok=True)
    cluster = Cluster(tmp, url, redis.url, nodes)
    cluster.start()
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer,
            _redis_session: RedisServer) -> Iterator[Cluster]:
    """Three daemons sharing the session's PostgreSQL (one database) and Redis."""
    _redis_session.start()
    c = _cluster(tmp_path_factory.mktemp("cluster"), postgres_server, _redis_session, 3)
    yield c
    c.stop()


@pytest.fixture
async def nodes(cluster: Cluster) -> AsyncIterator[list[Connector]]:
    yield cluster.connectors
    await cluster.close_clients()


async def conversation(sender: Client, other: int) -> int:
    """The direct conversation of sender and other, made by a first message (send_message by
    recipientId). (Not create_conversation: the PostgreSQL engine of this branch lacks it yet.)
    """
    reply = await sender.request({"type": "send_message", "recipientId": other,
                                  "content": "hello", "requestId": f"hello-{other}"},
                                 "message_sent", requestId=f"hello-{other}")
    return int(reply["conversationId"])


def count(client: Client, kind: str, **match: Any) -> int:
    return sum(1 for f in client.seen
               if f.get("type") == kind and all(f.get(k) == v for k, v in match.items()))


async def watch(pitch: int, *watchers: Client) -> None:
    """Each of ``watchers`` reads the pitch's activity and subscribes to it (pitch_view)."""
    for watcher in watchers:
        await watcher.request({"type": "get_pitch_activity", "pitchId": pitch},
                              "pitch_activity")
        await watcher.send({"type": "pitch_view", "pitchId": pitch})


async def ping(client: Client) -> None:
    """A barrier: the daemon has written everything queued for this client before the pong
    (the ends of a dead node's typing are written in one turn of the claiming daemon)."""
    await client.request({"type": "ping"}, "pong")


async def test_message_reaches_other_nodes_once(nodes: list[Connector],
                                                cluster: Cluster) -> None:
    """A message sent on node 1 reaches the other participant on nodes 2 and 3, and the
    sender's tab on node 2, exactly once each; the delivery is recorded."""
    a, b = new_user(), new_user()
    a1 = await nodes[0](a)
    a2 = await nodes[1](a)
    b2 = await nodes[1](b)
    b3 = await nodes[2](b)
    cid = await conversation(a1, b)
    for tab in (b2, b3, a2):
        await tab.expect("new_message", conversationId=cid)
    sent = await a1.request({"type": "send_message", "conversationId": cid, "content": "one",
                             "requestId": "m1"}, "message_sent", requestId="m1")
    first = sent["messageId"]
    for tab in (b2, b3, a2):
        frame = await tab.expect("new_message", messageId=first)
        assert frame["content"] == "one" and frame["senderId"] == a
    # Frames of one daemon reach another in order: once the second message is in, a
    # duplicate of the first would have been read before it.
    second = (await a1.request({"type": "send_message", "conversationId": cid,
                                "content": "two"}, "message_sent"))["messageId"]
    for tab in (b2, b3, a2):
        await tab.expect("new_message", messageId=second)
        assert count(tab, "new_message", messageId=first) == 0


async def test_delivery_recorded_by_the_writing_node(nodes: list[Connector],
                                                     cluster: Cluster) -> None:
    """A frame written on another daemon is recorded as delivered (by that daemon)."""
    a, b = new_user(), new_user()
    a1 = await nodes[0](a)
    b2 = await nodes[1](b)
    await conversation(a1, b)
    sent = await a1.request({"type": "send_message", "recipientId": b, "content": "r",
                             "requestId": "d1"}, "message_sent", requestId="d1")
    await b2.expect("new_message", messageId=sent["messageId"])
    # On PostgreSQL a receipt row is a delivery.
    await eventually_db(cluster.nodes[0], "SELECT count(*) FROM message_read_receipts"
                        " WHERE message_id = ? AND user_id = ?", (sent["messageId"], b),
                        [(1,)])


async def test_idempotent_retry_on_another_node(nodes: list[Connector]) -> None:
    """A send retried with the same requestId on another daemon answers the original
    messageId and fans out nothing new."""
    a, b = new_user(), new_user()
    a1 = await nodes[0](a)
    b3 = await nodes[2](b)
    cid = await conversation(a1, b)
    frame = {"type": "send_message", "conversationId": cid, "content": "x", "requestId": "r"}
    first = (await a1.request(frame, "message_sent", requestId="r"))["messageId"]
    await b3.expect("new_message", messageId=first)
    a2 = await nodes[1](a)
    again = await a2.request(frame, "message_sent", requestId="r")
    assert again["messageId"] == first
    later = (await a2.request({"type": "send_message", "conversationId": cid,
                               "content": "y"}, "message_sent"))["messageId"]
    await b3.expect("new_message", messageId=later)
    assert count(b3, "new_message", messageId=first) == 0


async def test_presence_across_nodes(nodes: list[Connector]) -> None:
    """Online and offline are global: a tab on another daemon keeps a user online, the last
    close anywhere announces user_offline, and get_online_users sees other daemons' users."""
    a, b = new_user(), new_user()
    a1 = await nodes[0](a)
    b2 = await nodes[1](b)
    await conversation(a1, b)
    await a1.close()
    await b2.expect("user_offline", userId=a)
    a1 = await nodes[0](a)
    await b2.expect("user_online", userId=a)
    listed = await b2.request({"type": "get_online_users"}, "online_users")
    assert [u["userId"] for u in listed["users"]] == [a]
    a3 = await nodes[2](a)
    await a1.close()
    await b2.quiet("user_offline", within=1.0)
    listed = await b2.request({"type": "get_online_users"}, "online_users")
    assert [u["userId"] for u in listed["users"]] == [a]
    await a3.close()
    gone = await b2.expect("user_offline", userId=a)
    assert gone["lastSeen"]
    listed = await b2.request({"type": "get_online_users"}, "online_users")
    assert listed["users"] == []


async def test_typing_across_nodes(nodes: list[Connector]) -> None:
    """typing_start and typing_stop on one daemon reach the other participant on another."""
    a, b = new_user(), new_user()
    a1 = await nodes[0](a)
    b2 = await nodes[1](b)
    cid = await conversation(a1, b)
    await a1.send({"type": "typing_start", "conversationId": cid})
    await b2.expect("user_typing", userId=a, isTyping=True, conversationId=cid)
    await a1.send({"type": "typing_stop", "conversationId": cid})
    await b2.expect("user_typing", userId=a, isTyping=False, conversationId=cid)


async def test_rate_limit_shared_across_nodes(nodes: list[Connector]) -> None:
    """One token bucket per user across daemons: two connections on two daemons together
    get no more than the burst (20) at 1 token a second."""
    u = new_user()
    c1 = await nodes[0](u)
    c2 = await nodes[1](u)
    for _ in range(15):
        await c1.send({"type": "ping"})
        await c2.send({"type": "ping"})
    answered = limited = 0
    for client in (c1, c2):
        for _ in range(15):
            frame = await client.recv()
            while frame["type"] not in ("pong", "error"):
                frame = await client.recv()
            if frame["type"] == "pong":
                answered += 1
            else:
                assert frame["code"] == "rate_limited"
                limited += 1
    assert answered <= 22, answered  # 20, plus what refilled meanwhile
    assert limited >= 8


# -- failures: clusters of their own ------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path, postgres_server: PostgresServer,
         fresh_redis_server: RedisServer) -> Iterator[tuple[Cluster, RedisServer]]:
    c = _cluster(tmp_path, postgres_server, fresh_redis_server, 2)
    yield c, fresh_redis_server
    c.stop()


async def test_killed_node(pair: tuple[Cluster, RedisServer]) -> None:
    """kill -9 of a daemon: its users are shown offline within the TTL, reconnect to another
    daemon, sync, and find every acknowledged message exactly once."""
    cluster, _ = pair
    n1, n2 = cluster.connectors
    a, b = new_user(), new_user()
    try:
        a1 = await n1(a)
        b2 = await n2(b)
        cid = await conversation(a1, b)
        hello = await b2.expect("new_message", conversationId=cid)
        sent = [hello["messageId"]]
        for i in range(3):
            reply = await a1.request({"type": "send_message", "conversationId": cid,
                                      "content": f"m{i}", "requestId": f"k{i}"},
                                     "message_sent", requestId=f"k{i}")
            sent.append(reply["messageId"])
        cluster.nodes[0].kill()
        await b2.expect("user_offline", userId=a, timeout=TTL + TIMEOUT)
        a2 = await n2(a)
        await b2.expect("user_online", userId=a)
        await a2.send({"type": "sync", "sinceMessageId": 0})
        ids = []
        while (frame := await a2.recv())["type"] != "sync_complete":
            if frame["type"] == "queued_message":
                ids.append(frame["messageId"])
        assert ids == sent
        ids_b = []
        await b2.send({"type": "sync", "sinceMessageId": 0})
        while (frame := await b2.recv())["type"] != "sync_complete":
            if frame["type"] == "queued_message":
                ids_b.append(frame["messageId"])
        assert ids_b == sent
    finally:
        await cluster.close_clients()


async def test_killed_node_ends_typing(pair: tuple[Cluster, RedisServer]) -> None:
    """kill -9 of a daemon while its user types in a conversation and on a pitch: the
    participant watching the pitch on the other daemon gets one isTyping false for each
    within the node TTL, and the typing_indicators row stops saying typing."""
    cluster, _ = pair
    n1, n2 = cluster.connectors
    a, b, owner = new_user(), new_user(), new_user()
    pitch = 700 + a % 1000
    try:
        put_pitch(cluster.nodes[1], pitch, owner)
        a1 = await n1(a, username="Ada")
        b2 = await n2(b)
        cid = await conversation(a1, b)
        await b2.expect("new_message", conversationId=cid)
        await b2.request({"type": "get_pitch_activity", "pitchId": pitch}, "pitch_activity")
        await b2.send({"type": "pitch_view", "pitchId": pitch})
        await ping(b2)
        await a1.send({"type": "typing_start", "conversationId": cid})
        await a1.send({"type": "typing", "pitchId": pitch, "isTyping": True})
        await b2.expect("user_typing", userId=a, isTyping=True, conversationId=cid)
        await b2.expect("user_typing", userId=a, isTyping=True, pitchId=pitch)
        await eventually_db(cluster.nodes[1], TYPING_ROW, (cid, a), [(1,)])
        cluster.nodes[0].kill()
        ended = await b2.expect("user_typing", userId=a, isTyping=False, conversationId=cid,
                                timeout=TTL + TIMEOUT)
        assert ended["username"] == "Ada" and "pitchId" not in ended
        on_pitch = await b2.expect("user_typing", userId=a, isTyping=False, pitchId=pitch)
        assert on_pitch["username"] == "Ada"
        await b2.expect("user_offline", userId=a)
        await ping(b2)
        assert count(b2, "user_typing") == 0
        await eventually_db(cluster.nodes[1], TYPING_ROW, (cid, a), [(0,)])
    finally:
        await cluster.close_clients()


async def test_killed_node_ends_typing_of_a_user_connected_elsewhere(
        pair: tuple[Cluster, RedisServer]) -> None:
    """kill -9 of a daemon where a user types in two conversations, with a tab on the other
    daemon typing in the second: the first ends at the claim with one isTyping false (the
    user stays online), the second only when the live tab stops, once."""
    cluster, _ = pair
    n1, n2 = cluster.connectors
    a, b, c = new_user(), new_user(), new_user()
    try:
        a1 = await n1(a)
        a2 = await n2(a)
        b2 = await n2(b)
        c2 = await n2(c)
        one = await conversation(a1, b)
        two = await conversation(a1, c)
        await b2.expect("new_message", conversationId=one)
        await c2.expect("new_message", conversationId=two)
        for cid in (one, two):
            await a1.send({"type": "typing_start", "conversationId": cid})
        await b2.expect("user_typing", userId=a, isTyping=True, conversationId=one)
        await c2.expect("user_typing", userId=a, isTyping=True, conversationId=two)
        await a2.send({"type": "typing_start", "conversationId": two})
        await ping(a2)  # the live daemon holds the typing in two as well
        cluster.nodes[0].kill()
        await b2.expect("user_typing", userId=a, isTyping=False, conversationId=one,
                        timeout=TTL + TIMEOUT)
        await ping(c2)
        assert count(c2, "user_typing", isTyping=False) == 0
        await a2.send({"type": "typing_stop", "conversationId": two})
        await c2.expect("user_typing", userId=a, isTyping=False, conversationId=two)
        for client in (b2, c2):
            await ping(client)
            assert count(client, "user_typing", isTyping=False) == 0
        await eventually_db(cluster.nodes[1], TYPING_ROW, (one, a), [(0,)])
        await eventually_db(cluster.nodes[1], TYPING_ROW, (two, a), [(0,)])
    finally:
        await cluster.close_clients()


async def test_redis_restart(pair: tuple[Cluster, RedisServer]) -> None:
    """Redis stopped mid-conversation: sends are still acknowledged; when it is back, clients
    are told to sync (sync_required), sync recovers what they missed, and live delivery
    resumes."""
    cluster, redis = pair
    n1, n2 = cluster.connectors
    a, b = new_user(), new_user()
    try:
        a1 = await n1(a)
        b2 = await n2(b)
        cid = await conversation(a1, b)
        await b2.expect("new_message", conversationId=cid)
        before = (await a1.request({"type": "send_message", "conversationId": cid,
                                    "content": "before"}, "message_sent"))["messageId"]
        await b2.expect("new_message", messageId=before)
        redis.stop()
        during = (await a1.request({"type": "send_message", "conversationId": cid,
                                    "content": "during"}, "message_sent"))["messageId"]
        redis.start()
        await b2.expect("sync_required", timeout=TIMEOUT * 2)
        await a1.expect("sync_required", timeout=TIMEOUT * 2)
        await b2.send({"type": "sync", "sinceMessageId": before})
        ids = []
        while (frame := await b2.recv())["type"] != "sync_complete":
            if frame["type"] == "queued_message":
                ids.append(frame["messageId"])
        assert ids == [during]
        after = (await a1.request({"type": "send_message", "conversationId": cid,
                                   "content": "after"}, "message_sent"))["messageId"]
        await b2.expect("new_message", messageId=after)
    finally:
        await cluster.close_clients()


async def test_pitch_activity_reaches_watchers_on_every_node(nodes: list[Connector],
                                                            cluster: Cluster) -> None:
    """Watchers of one pitch on nodes 2 and 3 see a view, a like, comment typing and a
    comment made on node 1, exactly once each; the owner on node 3 gets the like once, as a
    notification."""
    owner, fan, w2_id, w3_id = new_user(), new_user(), new_user(), new_user()
    pitch = 900 + owner % 1000
    put_pitch(cluster.nodes[0], pitch, owner)
    boss = await nodes[2](owner)
    w2 = await nodes[1](w2_id)
    w3 = await nodes[2](w3_id)
    await watch(pitch, w2, w3)
    await w2.expect("pitch_viewed", pitchId=pitch, viewCount=2)  # w3's view, from node 3
    f = await nodes[0](fan, username="Fan")
    await f.send({"type": "pitch_like", "pitchId": pitch})
    await f.send({"type": "typing", "pitchId": pitch, "isTyping": True})
    await f.request({"type": "pitch_comment", "pitchId": pitch, "comment": "Bravo",
                     "requestId": "c1"}, "comment_sent")
    for watcher in (w2, w3):
        await watcher.expect("pitch_liked", pitchId=pitch, userId=fan)
        await watcher.expect("user_typing", pitchId=pitch, userId=fan, isTyping=True)
        await watcher.expect("new_comment", pitchId=pitch, comment="Bravo")
    liked = await boss.expect("pitch_liked", pitchId=pitch, userId=fan)
    commented = await boss.expect("new_comment", pitchId=pitch, comment="Bravo")
    assert "notificationId" in liked and "notificationId" in commented
    for client in (w2, w3, boss):
        await client.absent("pitch_liked")
        assert count(client, "new_comment", pitchId=pitch) == 0  # each taken once above
        assert count(client, "pitch_liked", pitchId=pitch) == 0


async def test_create_conversation_retry_on_two_nodes_is_one(nodes: list[Connector],
                                                            cluster: Cluster) -> None:
    """The same create_conversation requestId sent to two nodes at once makes one
    conversation, answered to both (the database's unique index decides the race)."""
    import asyncio

    a, b = new_user(), new_user()
    tab1, tab2 = await nodes[0](a), await nodes[1](a)
    frame = {"type": "create_conversation", "participantIds": [b], "requestId": "twice"}
    one, two = await asyncio.gather(tab1.request(frame, "conversation_created"),
                                    tab2.request(frame, "conversation_created"))
    assert one["conversationId"] == two["conversationId"]
    assert not [f for f in tab1.seen + tab2.seen if f.get("type") == "error"]


async def test_replay_then_late_frame_from_another_node(
    tmp_path: Path, postgres_server: PostgresServer, fresh_redis_server: RedisServer
) -> None:
    """A message committed on one daemon and replayed by another on connect is not written a
    second time when the first daemon's frame for it arrives after the replay (here the
    second daemon's subscriber link to Redis is 3 s slow): the recipient gets it once, then
    the next message live."""
    url = postgres_server.create_database()
    link = SlowLink(fresh_redis_server.port)
    (tmp_path / "writer").mkdir()
    (tmp_path / "late").mkdir()
    writer = Daemon(tmp_path / "writer", {**OVERRIDES, "backplane.url": fresh_redis_server.url},
                    database_url=url)
    late = Daemon(tmp_path / "late", {**OVERRIDES, "backplane.url":
                                      f"redis://127.0.0.1:{link.port}/0"}, database_url=url)
    writers, lates = Connector(writer), Connector(late)
    try:
        writer.start()
        late.start()
        a, b = new_user(), new_user()
        a1 = await writers(a)
        cid = await conversation(a1, b)  # b is offline: owed to b
        link.delay = 3.0
        # b connects to the late daemon: it subscribes to b's channel, waits (up to 2 s) for
        # the confirmation, which comes late, then replays.
        connecting = asyncio.ensure_future(lates(b))
        await eventually(lambda: subscribers(fresh_redis_server.port, f"pws:u:{b}") == 1)
        sent = await a1.request({"type": "send_message", "conversationId": cid,
                                 "content": "late", "requestId": "late"},
                                "message_sent", requestId="late")
        # Committed before the replay reads; its frame reaches the late daemon after it.
        b2 = await connecting
        replayed = [(await b2.expect("queued_message"))["messageId"] for _ in range(2)]
        assert replayed[-1] == sent["messageId"]
        nxt = await a1.request({"type": "send_message", "conversationId": cid,
                                "content": "next", "requestId": "next"},
                               "message_sent", requestId="next")
        # One daemon's frames reach another in order: the late one came before this one.
        await b2.expect("new_message", messageId=nxt["messageId"], timeout=TIMEOUT + 3)
        assert count(b2, "new_message", messageId=sent["messageId"]) == 0
    finally:
        await writers.close_all()
        await lates.close_all()
        for node in (writer, late):
            if node.proc is not None:
                with contextlib.suppress(Exception):
                    node.stop()
        link.close()


def subscribers(port: int, channel: str) -> int:
    """PUBSUB NUMSUB of one channel, read from Redis directly."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(f"*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n${len(channel)}\r\n{channel}\r\n"
                  .encode())
        reply = b""
        while not re.search(rb"\r\n:(\d+)\r\n$", reply):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    found = re.search(rb":(\d+)\r\n$", reply)
    return int(found.group(1)) if found else 0


async def test_publish_key_at_once_on_two_nodes_is_one(nodes: list[Connector],
                                                       cluster: Cluster) -> None:
    """The same idempotencyKey sent to two daemons at the same moment stores and sends once,
    and both answer 200 with the same notification ids; so does a live-only publish to a
    conversation (claimed before it is sent)."""
    a, b = new_user(), new_user()
    a1 = await nodes[0](a)
    b2 = await nodes[1](b)
    cid = await conversation(a1, b)
    await b2.expect("new_message", conversationId=cid)
    for round_ in range(5):
        durable = {"users": [b], "event": {"type": "nda_signed", "round": round_},
                   "idempotencyKey": f"durable-{a}-{round_}"}
        live = {"conversationId": cid, "event": {"type": "deal_update", "round": round_},
                "idempotencyKey": f"live-{a}-{round_}"}
        for body in (durable, live):
            answers = await asyncio.gather(*(
                asyncio.to_thread(call, node, "POST", "/api/publish", body)
                for node in cluster.nodes[:2]))
            assert [status for status, _ in answers] == [200, 200], answers
            assert answers[0][1]["notificationIds"] == answers[1][1]["notificationIds"]
        await ping(b2)
        await ping(a1)
        assert count(b2, "nda_signed", round=round_) == 1
        assert count(b2, "deal_update", round=round_) == 1
        assert count(a1, "deal_update", round=round_) == 1
    await eventually_db(cluster.nodes[0], "SELECT count(*) FROM ws_notifications"
                        " WHERE user_id = ?", (b,), [(5,)])


async def test_likes_views_and_reads_from_two_nodes_at_once_count_once(
    nodes: list[Connector], cluster: Cluster,
) -> None:
    """One user's two tabs on two daemons like and view a pitch, and mark a message read, at
    the same moment: each change is made once, so the owner and the sender are told once and
    one notification is stored per like (PROTOCOL.md 9, 10, 4.3)."""
    owner, fan = new_user(), new_user()
    pitches = [2000 + owner % 1000 * 10 + i for i in range(4)]
    for pitch in pitches:
        put_pitch(cluster.nodes[0], pitch, owner)
    boss = await nodes[2](owner)
    tabs = [await nodes[0](fan), await nodes[1](fan)]
    for pitch in pitches:
        for kind in ("pitch_like", "pitch_view"):
            await asyncio.gather(*(tab.send({"type": kind, "pitchId": pitch}) for tab in tabs))
    for pitch in pitches:
        await boss.expect("pitch_liked", pitchId=pitch, userId=fan)
        await boss.expect("pitch_viewed", pitchId=pitch, userId=fan)
    for tab in tabs:
        await ping(tab)
    await ping(boss)
    for pitch in pitches:
        assert count(boss, "pitch_liked", pitchId=pitch) == 0, pitch  # one taken above
        assert count(boss, "pitch_viewed", pitchId=pitch) == 0, pitch
    await eventually_db(cluster.nodes[0], "SELECT count(*) FROM ws_notifications"
                        " WHERE user_id = ? AND type = 'pitch_liked'", (owner,), [(4,)])
    await eventually_db(cluster.nodes[0], "SELECT count(*) FROM pitch_views"
                        " WHERE viewer_id = ?", (fan,), [(4,)])
    # Reads (another user's tabs: the rate limit is per user): the sender is told once.
    reader = new_user()
    tabs = [await nodes[0](reader), await nodes[1](reader)]
    sender = await nodes[2](new_user())
    cid = await conversation(sender, reader)
    sent = [(await sender.request({"type": "send_message", "conversationId": cid,
                                   "content": f"m{i}", "requestId": f"rd{i}"},
                                  "message_sent", requestId=f"rd{i}"))["messageId"]
            for i in range(3)]
    for mid in sent:
        for tab in tabs:
            await tab.expect("new_message", messageId=mid)
        await asyncio.gather(*(tab.send({"type": "mark_read", "messageId": mid})
                               for tab in tabs))
    for mid in sent:
        await sender.expect("message_read", messageId=mid)
    for tab in tabs:
        await ping(tab)
    await ping(sender)
    for mid in sent:
        assert count(sender, "message_read", messageId=mid) == 0, mid


async def test_killed_node_users_offline_within_the_ttl(
    tmp_path: Path, postgres_server: PostgresServer, fresh_redis_server: RedisServer,
) -> None:
    """A daemon killed just after a heartbeat: its users are shown offline within
    presence.node_ttl_seconds of the kill (PROTOCOL.md 13), not a sweep interval later (dead
    daemons were looked for once a heartbeat, here 1.5 s)."""
    import redis.asyncio as aioredis

    ttl = 3.0
    for i in range(2):
        (tmp_path / f"node{i}").mkdir()
    cluster = Cluster(tmp_path, postgres_server.create_database(), fresh_redis_server.url, 2,
                      {"presence.node_ttl_seconds": ttl, "presence.heartbeat_seconds": 1.5})
    cluster.start()
    client = aioredis.from_url(fresh_redis_server.url)
    try:
        n1, n2 = cluster.connectors
        a, b = new_user(), new_user()
        # a on the daemon started second: the first one's sweeps run ahead of its heartbeats.
        a1 = await n2(a)
        b2 = await n1(b)
        await conversation(a1, b)
        await b2.expect("new_message")
        keys = sorted([k async for k in client.scan_iter("pws:node:*")])
        assert len(keys) == 2, keys
        # The key of a's daemon (its users set names a).
        owner = [k for k in keys
                 if await client.sismember(b"pws:nodeusers:" + k.split(b":")[-1], str(a))]
        assert len(owner) == 1, (keys, owner)
        # Wait for a fresh heartbeat (its key's TTL jumps back up), then kill at once.
        last = await client.pttl(owner[0])
        while True:
            now = await client.pttl(owner[0])
            if now > last:
                break
            last = now
            await asyncio.sleep(0.01)  # polls Redis; the jump of the TTL is the event
        killed = asyncio.get_running_loop().time()
        cluster.nodes[1].kill()
        await b2.expect("user_offline", userId=a, timeout=ttl + TIMEOUT)
        took = asyncio.get_running_loop().time() - killed
        assert took <= ttl + 0.7, took  # before: node_ttl + up to a heartbeat (4.3 s here)
    finally:
        await client.aclose()
        await cluster.close_clients()
        cluster.stop()


@pytest.mark.parametrize("grace", [0, 1.0])
async def test_sigterm_of_a_node_announces_its_users_offline(
    tmp_path: Path, postgres_server: PostgresServer, fresh_redis_server: RedisServer,
    grace: float,
) -> None:
    """SIGTERM of a daemon (a rolling restart): its users who come back on another daemon
    within the grace period stay online for their contacts there; the others are announced
    user_offline (they were never announced at all: the stopping daemon dropped them)."""
    for i in range(2):
        (tmp_path / f"node{i}").mkdir()
    cluster = Cluster(tmp_path, postgres_server.create_database(), fresh_redis_server.url, 2,
                      {"presence.offline_grace_seconds": grace})
    cluster.start()
    try:
        n1, n2 = cluster.connectors
        leaver, mover, watcher = new_user(), new_user(), new_user()
        gone = await n1(leaver)
        moving = await n1(mover)
        w = await n2(watcher)
        await conversation(gone, watcher)
        await conversation(moving, watcher)
        await w.expect("new_message", senderId=leaver)
        await w.expect("new_message", senderId=mover)
        stopping = asyncio.create_task(asyncio.to_thread(cluster.nodes[0].stop))
        if grace:
            # The mover's client reconnects to the other daemon, as after a 1012.
            assert await moving.closed() == 1012
            await n2(mover)
        assert await stopping == 0
        offline = await w.expect("user_offline", userId=leaver, timeout=grace + TIMEOUT)
        assert offline["lastSeen"]
        await ping(w)
        if grace:
            assert count(w, "user_offline", userId=mover) == 0
            online = await w.request({"type": "get_online_users"}, "online_users")
            assert mover in [u["userId"] for u in online["users"]], online
    finally:
        await cluster.close_clients()
        cluster.stop()


async def test_typing_ends_by_a_send_or_stop_through_another_node(
    nodes: list[Connector], cluster: Cluster,
) -> None:
    """A user types through one daemon; a message sent from their tab on another daemon, a
    POST /api/messages/send that lands on another daemon, or typing_stop there, ends it at
    once for the watchers (PROTOCOL.md 4.1, 4.2, 8, 13), not when the TTL (10 s) runs out;
    also for comment typing on a pitch."""
    a, b = new_user(), new_user()
    a1 = await nodes[0](a)
    a2 = await nodes[1](a)
    b3 = await nodes[2](b)
    cid = await conversation(a1, b)
    await b3.expect("new_message", conversationId=cid)
    token = make_token(a)
    ends = (
        lambda: a2.send({"type": "send_message", "conversationId": cid, "content": "sent"}),
        lambda: asyncio.to_thread(call, cluster.nodes[1], "POST", "/api/messages/send",
                                  {"conversationId": cid, "content": "by http"}, token=token),
        lambda: a2.send({"type": "typing_stop", "conversationId": cid}),
    )
    for end in ends:
        await a1.send({"type": "typing_start", "conversationId": cid})
        await b3.expect("user_typing", userId=a, isTyping=True, conversationId=cid)
        await end()
        await b3.expect("user_typing", userId=a, isTyping=False, conversationId=cid,
                        timeout=3)
    owner = new_user()
    pitch = 3000 + owner % 1000
    put_pitch(cluster.nodes[0], pitch, owner)
    boss = await nodes[2](owner)
    await a1.send({"type": "typing", "pitchId": pitch, "isTyping": True})
    await boss.expect("user_typing", pitchId=pitch, userId=a, isTyping=True)
    await a2.request({"type": "pitch_comment", "pitchId": pitch, "comment": "c",
                      "requestId": "tc"}, "comment_sent")
    await boss.expect("user_typing", pitchId=pitch, userId=a, isTyping=False, timeout=3)


async def test_a_pitch_made_private_stops_reaching_watchers_on_other_nodes(
    nodes: list[Connector], cluster: Cluster,
) -> None:
    """The backend makes a watched public pitch private through one daemon: a watcher on
    another daemon who may no longer see it gets none of its later frames (PROTOCOL.md 9),
    while an allowed watcher there and the owner still do."""
    owner, outsider, insider = new_user(), new_user(), new_user()
    pitch = 4000 + owner % 1000
    put_pitch(cluster.nodes[0], pitch, owner)
    boss = await nodes[0](owner)
    out = await nodes[1](outsider)
    ins = await nodes[1](insider)
    await watch(pitch, out, ins)
    await boss.expect("pitch_viewed", pitchId=pitch, userId=insider)
    await boss.expect("pitch_viewed", pitchId=pitch, userId=outsider)
    put_pitch(cluster.nodes[0], pitch, owner, private=True, allowed=[insider])
    await boss.request({"type": "pitch_comment", "pitchId": pitch, "comment": "secret plan",
                        "requestId": "sp"}, "comment_sent")
    await ins.expect("new_comment", pitchId=pitch, comment="secret plan")
    await ping(out)
    assert count(out, "new_comment", pitchId=pitch) == 0
    error = await out.request({"type": "get_pitch_activity", "pitchId": pitch}, "error")
    assert error["code"] == "forbidden"


async def test_a_profile_from_the_backend_shows_in_online_users_on_every_node(
    nodes: list[Connector], cluster: Cluster,
) -> None:
    """PUT /api/users through one daemon for a user connected to another (whose token names
    nobody): a contact on the first daemon sees the new name and type in get_online_users,
    not the old one (PROTOCOL.md 11: everywhere)."""
    user, contact = new_user(), new_user()
    u2 = await nodes[1](user, token=make_token(user))  # no name claim: the profile's name
    c1 = await nodes[0](contact, username="Contact")
    await conversation(c1, user)
    await u2.expect("new_message")
    status, _ = call(cluster.nodes[0], "PUT", f"/api/users/{user}",
                     {"username": "Grace Hopper", "userType": "creator"})
    assert status == 200

    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while True:
        online = await c1.request({"type": "get_online_users"}, "online_users")
        entry = [(u["username"], u.get("userType")) for u in online["users"]
                 if u["userId"] == user]
        if entry == [("Grace Hopper", "creator")]:
            break
        assert asyncio.get_running_loop().time() < deadline, entry
        await asyncio.sleep(0.5)  # paces the polling (and the rate limit); the answer is the event


async def test_a_frozen_node_announces_its_users_back(pair: tuple[Cluster, RedisServer]) -> None:
    """A daemon frozen past the TTL is taken for dead and its user announced offline; when it
    runs again and finds itself claimed, the user (still connected there) is announced online
    again, so contacts do not keep showing them offline (PROTOCOL.md 4.5, 13)."""
    import os
    import signal

    cluster, _ = pair
    n1, n2 = cluster.connectors
    a, b = new_user(), new_user()
    try:
        a1 = await n1(a)
        b2 = await n2(b)
        await conversation(a1, b)
        await b2.expect("new_message")
        proc = cluster.nodes[0].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await b2.expect("user_offline", userId=a, timeout=TTL + TIMEOUT)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        await b2.expect("user_online", userId=a, timeout=TIMEOUT)
        online = await b2.request({"type": "get_online_users"}, "online_users")
        assert a in [u["userId"] for u in online["users"]], online
        await a1.close()
        await b2.expect("user_offline", userId=a)
    finally:
        await cluster.close_clients()


async def test_pitch_frames_from_a_daemon_of_the_release_before_still_arrive(
    nodes: list[Connector], cluster: Cluster,
) -> None:
    """A rolling upgrade: a pitch frame published the way the previous release did (no
    ownerId) still reaches the watchers here."""
    import redis.asyncio as aioredis

    owner, fan = new_user(), new_user()
    pitch = 5000 + owner % 1000
    put_pitch(cluster.nodes[0], pitch, owner)
    watcher = await nodes[0](fan)
    await watch(pitch, watcher)
    frame = json.dumps({"type": "pitch_liked", "pitchId": pitch, "likeCount": 1,
                        "userId": 1, "username": "old", "timestamp": "2026-01-01T00:00:00.000Z"})
    change = {"pitch": pitch, "frame": frame, "owner": False, "exclude": None}
    client = aioredis.from_url(cluster.redis_url)
    try:
        await client.publish("pws:inv", "oldnode|\n" + json.dumps(change))
    finally:
        await client.aclose()
    got = await watcher.expect("pitch_liked", pitchId=pitch)
    assert got["username"] == "old"


async def test_pitch_typing_ends_after_the_pitch_changed_on_another_node(
    nodes: list[Connector], cluster: Cluster,
) -> None:
    """The owner types on a pitch's comments through one daemon; the backend changes the
    pitch through another; the owner's connection closes: the watcher still gets
    isTyping false (the daemon reads the changed pitch again instead of forgetting it)."""
    owner, fan = new_user(), new_user()
    pitch = 6000 + owner % 1000
    put_pitch(cluster.nodes[0], pitch, owner)
    watcher = await nodes[0](fan)
    await watch(pitch, watcher)
    boss = await nodes[1](owner)
    await boss.send({"type": "typing", "pitchId": pitch, "isTyping": True})
    await watcher.expect("user_typing", pitchId=pitch, userId=owner, isTyping=True)
    put_pitch(cluster.nodes[0], pitch, owner, title="Renamed")
    await ping(boss)
    await boss.close()
    await watcher.expect("user_typing", pitchId=pitch, userId=owner, isTyping=False)


async def test_a_read_lock_held_elsewhere_delays_but_does_not_stall(
    nodes: list[Connector], cluster: Cluster,
) -> None:
    """Another session holds the advisory lock that serialises a reader's marks (as a frozen
    daemon would): mark_read goes on without it after a bounded wait, the sender is told, and
    the database is not reported as failing."""
    import hashlib

    import asyncpg

    sender, reader = new_user(), new_user()
    s1 = await nodes[0](sender)
    r2 = await nodes[1](reader)
    cid = await conversation(s1, reader)
    hello = await r2.expect("new_message", conversationId=cid)
    digest = hashlib.blake2b(repr(("read", cid, reader)).encode(), digest_size=4).digest()
    holder = await asyncpg.connect(cluster.nodes[0].database_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", 0x7077_7301,
                             int.from_bytes(digest, "big", signed=True))
        await r2.send({"type": "mark_read", "messageId": hello["messageId"]})
        await s1.expect("message_read", messageId=hello["messageId"])
        status, body = await asyncio.to_thread(call, cluster.nodes[1], "GET", "/api/health")
        assert status == 200 and body["status"] == "healthy", body
    finally:
        await holder.close()
