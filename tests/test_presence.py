"""Presence among contacts (PROTOCOL.md 4.5): user_online, user_offline, online_users."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from conftest import (
    SCALE,
    TIMEOUT,
    Client,
    Connector,
    Daemon,
    conversation,
    eventually_db,
    make_token,
    new_user,
    now_iso,
    running,
)

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
GRACE = 1.0  # presence.offline_grace_seconds for the grace-period tests
PRESENCE_FIELDS = {"userId", "username", "userType", "isOnline", "lastSeen"}



async def online_users(client: Client) -> list[dict[str, Any]]:
    reply = await client.request({"type": "get_online_users"}, "online_users")
    assert ISO.match(reply["timestamp"])
    users: list[dict[str, Any]] = reply["users"]
    return users




async def test_second_tab_announces_nothing(connect_to: Connector) -> None:
    """A contact gets one user_online when a user opens a first and then a second tab."""
    a = await connect_to()
    b_id = new_user()
    await conversation(a, b_id)
    await connect_to(b_id)
    online = await a.expect("user_online", userId=b_id)
    assert online["username"] == f"user{b_id}"
    assert ISO.match(online["timestamp"])
    await connect_to(b_id)
    await a.quiet("user_online")


async def test_offline_only_after_last_tab(connect_to: Connector) -> None:
    """user_offline comes when the last of two tabs closes, not when the first one does."""
    a = await connect_to()
    b_id = new_user()
    await conversation(a, b_id)
    b1 = await connect_to(b_id)
    b2 = await connect_to(b_id)
    await a.expect("user_online", userId=b_id)
    await b1.close()
    await a.quiet("user_offline")
    assert [u["userId"] for u in await online_users(a)] == [b_id]
    await b2.close()
    offline = await a.expect("user_offline", userId=b_id)
    assert offline["username"] == f"user{b_id}"
    assert ISO.match(offline["lastSeen"])
    await a.quiet("user_online")


async def test_reconnect_within_grace_announces_nothing(tmp_path: Path) -> None:
    """Inside the grace period a user is still listed, and a reconnect announces nothing."""
    async with running(tmp_path, {"presence.offline_grace_seconds": GRACE}) as connect:
        a = await connect()
        b_id = new_user()
        await conversation(a, b_id)
        b = await connect(b_id)
        await a.expect("user_online", userId=b_id)
        await b.close()
        # Ask until the server reports B's lastSeen: it has seen the close, grace is running.
        deadline = asyncio.get_running_loop().time() + GRACE / 2
        while True:
            listed = await online_users(a)
            assert [u["userId"] for u in listed] == [b_id], "B left the list inside the grace"
            if listed[0]["lastSeen"] is not None:
                break
            assert asyncio.get_running_loop().time() < deadline, "server never saw B close"
            await asyncio.sleep(0.02)  # paces the asking (rate limit); lastSeen is the event
        assert listed[0]["isOnline"] is True
        assert ISO.match(listed[0]["lastSeen"])
        b = await connect(b_id)
        # The first grace period would have ended inside this window.
        await a.quiet("user_offline", within=GRACE + 0.5 * SCALE)
        await a.quiet("user_online", within=0.05)
        assert [u["userId"] for u in await online_users(a)] == [b_id]

        loop = asyncio.get_running_loop()
        closed_at = loop.time()
        await b.close()
        offline = await a.expect("user_offline", timeout=GRACE + TIMEOUT, userId=b_id)
        waited = loop.time() - closed_at
        assert waited >= GRACE * 0.95, f"user_offline after {waited:.3f}s, grace is {GRACE}s"
        assert ISO.match(offline["lastSeen"])
        await a.quiet("user_online", within=0.05)
        assert await online_users(a) == []


async def test_non_contacts_see_nothing(connect_to: Connector) -> None:
    """A user who shares no conversation gets neither user_online nor user_offline."""
    a = await connect_to()
    c_id = new_user()
    await conversation(a, c_id)  # C is A's contact, not B's
    c = await connect_to(c_id)
    await a.expect("user_online", userId=c_id)
    b_id = new_user()
    await conversation(a, b_id)
    b = await connect_to(b_id)
    await a.expect("user_online", userId=b_id)
    await c.quiet("user_online")
    await b.close()
    await a.expect("user_offline", userId=b_id)
    await c.quiet("user_offline")
    assert [u["userId"] for u in await online_users(c)] == [a.user_id]
    assert [u["userId"] for u in await online_users(a)] == [c_id]


async def test_online_users_lists_online_contacts_only(connect_to: Connector) -> None:
    """online_users lists online contacts with their fields, never the caller or others."""
    a_id = new_user()
    a1 = await connect_to(a_id, token=make_token(a_id, username="alice", userType="creator"))
    a2 = await connect_to(a_id, token=make_token(a_id, username="alice", userType="creator"))
    b_id, c_id, e_id = new_user(), new_user(), new_user()
    await conversation(a1, b_id)
    await conversation(a1, c_id)  # C never connects
    await conversation(a1, e_id)
    d = await connect_to()  # online, but shares nothing with A
    await connect_to(b_id, token=make_token(b_id, username="bob", userType="investor"))
    e = await connect_to(e_id)
    await a1.expect("user_online", userId=b_id)
    await a1.expect("user_online", userId=e_id)
    await e.close()
    await a1.expect("user_offline", userId=e_id)

    for tab in (a1, a2):
        users = await online_users(tab)
        assert [u["userId"] for u in users] == [b_id], users
        (bob,) = users
        assert set(bob) >= PRESENCE_FIELDS
        assert bob["username"] == "bob"
        assert bob["userType"] == "investor"
        assert bob["isOnline"] is True
        assert bob["lastSeen"] is None or ISO.match(bob["lastSeen"])
    assert await online_users(d) == []


async def test_new_conversation_makes_contacts(connect_to: Connector) -> None:
    """Two online users who just got a conversation list each other in online_users."""
    a = await connect_to()
    b = await connect_to()
    assert await online_users(a) == []
    await conversation(a, b.user_id)
    assert [u["userId"] for u in await online_users(a)] == [b.user_id]
    assert [u["userId"] for u in await online_users(b)] == [a.user_id]


async def test_last_seen_persisted(daemon: Daemon, connect_to: Connector) -> None:
    """After user_offline, the user's last_seen holds the lastSeen that was announced."""
    a = await connect_to()
    b_id = new_user()
    await conversation(a, b_id)
    b = await connect_to(b_id)
    await a.expect("user_online", userId=b_id)
    before = now_iso()
    await b.close()
    offline = await a.expect("user_offline", userId=b_id)
    last_seen = offline["lastSeen"]
    assert ISO.match(last_seen)
    assert before <= last_seen <= now_iso()
    # PostgreSQL: in ws_users, since the app's users table has no last_seen column.
    sql = ("SELECT last_seen FROM ws_users WHERE user_id = ?" if daemon.postgresql
           else "SELECT last_seen FROM users WHERE id = ?")
    await eventually_db(daemon, sql, (b_id,), [(last_seen,)])
    assert await online_users(a) == []
