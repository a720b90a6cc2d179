"""Lifecycle: live token expiry and refresh_token (PROTOCOL.md section 2), graceful shutdown.

Expiry is measured against the token's ``exp`` with the wall clock, which is what the server
uses; ``make_token`` rounds ``exp`` down to whole seconds, so it lies 1 to 2 seconds ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
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
)
from websockets.exceptions import ConnectionClosed

# Close must come within about a second of exp (the contract); never before it.
LATE = 1.0 * SCALE
EARLY = 0.05


def token_exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


async def closed_at(client: Client, timeout: float) -> tuple[int | None, float]:
    """Wait for the server to close; the close code and the wall-clock time it arrived."""
    code = await client.closed(timeout)
    return code, time.time()


def assert_closed_near(code: int | None, when: float, exp: float) -> None:
    assert code == 4001, code
    assert when >= exp - EARLY, f"closed {exp - when:.3f}s before exp"
    assert when <= exp + LATE, f"closed {when - exp:.3f}s after exp"


async def test_live_connection_closed_4001_at_exp(connect_to: Connector) -> None:
    """A connection whose token expires is closed with 4001 within a second after exp."""
    uid = new_user()
    token = make_token(uid, username="exp", exp=2)
    exp = token_exp(token)
    c = await connect_to(uid, token=token)
    await c.request({"type": "ping"}, "pong")
    code, when = await closed_at(c, exp - time.time() + TIMEOUT)
    assert_closed_near(code, when, exp)


async def test_refresh_extends_then_new_exp_enforced(connect_to: Connector) -> None:
    """refresh_token with a later token keeps the socket past the old exp; the new exp holds."""
    uid = new_user()
    old = make_token(uid, username="refresh", exp=2)
    new = make_token(uid, username="refresh", exp=4)
    old_exp, new_exp = token_exp(old), token_exp(new)
    assert new_exp >= old_exp + 2
    c = await connect_to(uid, token=old)
    reply = await c.request({"type": "refresh_token", "token": new}, "token_refreshed")
    expected = datetime.fromtimestamp(new_exp, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert reply["expiresAt"] == expected
    # Past the old expiry plus the allowed lateness, the connection still answers.
    with contextlib.suppress(TimeoutError):
        code = await c.closed(old_exp + LATE + 0.2 - time.time())
        raise AssertionError(f"closed with {code} before the refreshed exp")
    assert time.time() < new_exp, "test too slow to tell the expiries apart"
    await c.request({"type": "ping"}, "pong")
    code, when = await closed_at(c, new_exp - time.time() + TIMEOUT)
    assert_closed_near(code, when, new_exp)


def refused_tokens(uid: int) -> dict[str, str]:
    return {
        "other_user": make_token(new_user(), exp=3600),
        "expired": make_token(uid, exp=-30),
        "garbage": "not-a-jwt",
        "bad_signature": make_token(uid, exp=3600, secret="another-secret-0123456789abcdef-xyz"),
        "alg_none": jwt.encode({"userId": uid, "exp": int(time.time()) + 3600}, None,
                               algorithm="none"),
    }


async def refused_case(connect_to: Connector, case: str) -> None:
    uid = new_user()
    token = make_token(uid, username="refused", exp=2)
    exp = token_exp(token)
    c = await connect_to(uid, token=token)
    err = await c.request({"type": "refresh_token", "token": refused_tokens(uid)[case]}, "error")
    assert err["code"] == "forbidden", (case, err)
    assert not [f for f in c.seen if f.get("type") == "token_refreshed"], case
    code, when = await closed_at(c, exp - time.time() + TIMEOUT)
    try:
        assert_closed_near(code, when, exp)
    except AssertionError as exc:
        raise AssertionError(f"{case}: {exc}") from None


async def test_refused_refresh_keeps_old_expiry(connect_to: Connector) -> None:
    """Refresh with another user's, expired, bad or unsigned token: forbidden, 4001 at exp."""
    # The cases run side by side on their own connections, so they share one expiry wait.
    cases = ["other_user", "expired", "garbage", "bad_signature", "alg_none"]
    await asyncio.gather(*(refused_case(connect_to, case) for case in cases))


# -- graceful shutdown ---------------------------------------------------------------------


def wal_size(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def check_db(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    return conn


async def send_until_signal(
    d: Daemon, sender: Client, conv: int, sig: int, prefix: str
) -> tuple[list[dict[str, Any]], float]:
    """Keep sends in flight, signal the daemon right after the 5th ack; all acks seen."""
    for i in range(40):
        await sender.send({"type": "send_message", "conversationId": conv,
                           "content": f"{prefix}{i}", "requestId": f"{prefix}{i}"})
    acks: list[dict[str, Any]] = []
    assert d.proc is not None
    proc = d.proc
    signalled = 0.0
    with contextlib.suppress(ConnectionClosed):
        while True:
            frame = await sender.recv()
            if frame.get("type") == "message_sent":
                acks.append(frame)
                if len(acks) == 5:
                    proc.send_signal(sig)
                    signalled = time.monotonic()
    assert signalled, "the daemon never acknowledged 5 messages"
    return acks, signalled


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_graceful_shutdown(fresh_daemon: Daemon, sig: int) -> None:
    """On SIGTERM/SIGINT every client gets 1012, the daemon exits 0, and every ack is stored."""
    d = fresh_daemon
    d.start()
    connector = Connector(d)
    try:
        a = await connector()
        b = await connector()
        c = await connector()
        b2 = await connector(b.user_id)  # a second tab
        conv = await conversation(a, b.user_id, c.user_id)
        acks, signalled = await send_until_signal(d, a, conv, sig, f"gs{sig}-")
        codes = await asyncio.gather(*(x.closed() for x in (a, b, c, b2)))
        assert codes == [1012, 1012, 1012, 1012]
        assert d.proc is not None
        exit_code = await asyncio.to_thread(d.proc.wait, 10 * SCALE)
        elapsed = time.monotonic() - signalled
        d.proc = None
    finally:
        await connector.close_all()
    assert exit_code == 0, d.log_text()[-3000:]
    assert elapsed < 5 * SCALE, f"exit took {elapsed:.1f}s"
    # The writer checkpointed and closed: nothing is left in the WAL.
    assert wal_size(d.db) == 0
    conn = check_db(d.db)
    try:
        stored = dict(conn.execute(
            "SELECT request_id, id FROM messages WHERE sender_id = ?", (a.user_id,)
        ).fetchall())
        for ack in acks:
            assert stored.get(ack["requestId"]) == ack["messageId"], ack
        # Whatever was stored, acknowledged or not, is whole: one receipt per other member.
        for message_id in stored.values():
            receipts = conn.execute(
                "SELECT user_id FROM message_read_receipts WHERE message_id = ? ORDER BY user_id",
                (message_id,),
            ).fetchall()
            assert receipts == sorted([(b.user_id,), (c.user_id,)])
    finally:
        conn.close()


async def test_ack_just_before_sigterm_is_stored(fresh_daemon: Daemon) -> None:
    """A message acknowledged immediately before SIGTERM survives the shutdown."""
    d = fresh_daemon
    d.start()
    connector = Connector(d)
    try:
        a = await connector()
        b = await connector()
        conv = await conversation(a, b.user_id)
        ack = await a.request({"type": "send_message", "conversationId": conv,
                               "content": "last words", "requestId": "last"}, "message_sent")
        exit_code = await asyncio.to_thread(d.stop, signal.SIGTERM)
        assert await a.closed() == 1012
    finally:
        await connector.close_all()
    assert exit_code == 0
    conn = check_db(d.db)
    try:
        rows = conn.execute(
            "SELECT id, content FROM messages WHERE request_id = 'last'"
        ).fetchall()
        assert rows == [(ack["messageId"], "last words")]
    finally:
        conn.close()


async def stop_with_a_stuck_client(d: Daemon) -> tuple[int, float]:
    """SIGTERM while a raw socket that completed the handshake never reads nor answers a
    close: the exit code and the seconds the exit took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    token = make_token(new_user(), exp=3600)
    writer.write(
        (f"GET /api/messages/ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{d.port}\r\n"
         "Upgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
         ).encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    try:
        started = time.monotonic()
        exit_code = await asyncio.to_thread(d.stop, signal.SIGTERM)
        return exit_code, time.monotonic() - started
    finally:
        writer.close()
        if d.proc is not None:
            d.kill()


async def test_shutdown_with_unresponsive_client_exits_in_time(tmp_path: Path) -> None:
    """A client that never answers the closing handshake does not hold up the exit."""
    close_timeout, shutdown_timeout = 1, 2
    d = Daemon(tmp_path, {"server.close_timeout_seconds": close_timeout,
                          "server.shutdown_timeout_seconds": shutdown_timeout})
    d.start()
    exit_code, elapsed = await stop_with_a_stuck_client(d)
    assert exit_code == 0
    assert elapsed < (shutdown_timeout + 2) * SCALE, f"exit took {elapsed:.1f}s"
    check_db(d.db).close()



async def test_shutdown_drops_what_remains_at_the_deadline(tmp_path: Path) -> None:
    """Past shutdown_timeout the daemon drops lingering connections with one counted ERROR."""
    d = Daemon(tmp_path, {"server.close_timeout_seconds": 30,
                          "server.shutdown_timeout_seconds": 1})
    d.start()
    exit_code, elapsed = await stop_with_a_stuck_client(d)
    assert exit_code == 0
    assert elapsed < 4 * SCALE, f"exit took {elapsed:.1f}s: the 30 s close timeout was awaited"
    errors = [line for line in d.log_text().splitlines() if " ERROR " in line]
    assert len(errors) == 1, errors
    assert "1 connections still open and " in errors[0] and "after 1.0s" in errors[0], errors


async def test_connection_lines_are_bounded_and_counted(tmp_path: Path) -> None:
    """A burst of connections logs at most CONNECTION_LINES "connected" lines a second; the
    rest are counted in a summary line, so lines plus counts add up to every connection (the
    open and close of 15,000 clients must not write 30,000 lines)."""
    from connection import CONNECTION_LINES

    burst = 6 * CONNECTION_LINES
    d = Daemon(tmp_path)
    d.start()
    try:
        connector = Connector(d)
        await asyncio.gather(*(connector() for _ in range(burst)))
        await connector.close_all()
    finally:
        assert d.stop() == 0  # flushes the counts of the last second
    text = d.log_text()
    for kind, line in (("opened", " connected ("), ("closed", " disconnected (code ")):
        logged = sum(line in row for row in text.splitlines())
        held = [int(n) for n in re.findall(
            rf"connections {kind}: (\d+) more like it in the last second", text)]
        assert logged + sum(held) == burst, (kind, logged, held)
        assert logged < burst, f"all {burst} connections {kind} logged one line each"
