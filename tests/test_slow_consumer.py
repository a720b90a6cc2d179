"""Slow consumers (PROTOCOL.md section 7, code 1013; STYLE habit 6).

A group member stops reading its socket (a raw TCP client with a tiny receive buffer) while
two others chat with large messages. The active pair must not notice, the daemon's memory must
stay bounded, the stalled client is closed with 1013, and after reconnecting and syncing it
has every message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

from conftest import (
    SCALE,
    TIMEOUT,
    Client,
    Connector,
    Daemon,
    conversation,
    make_token,
    new_user,
    replay_then_sync,
)

MAX_PENDING = 65536
CONTENT = "z" * 9_000  # large-ish (under max_content_chars): a few frames fill the allowance
CLOSE_TIMEOUT = 2


class RawClient:
    """A WebSocket client on a bare socket: it reads only when told to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    async def open(cls, port: int, token: str, rcvbuf: int = 4096) -> RawClient:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Set before connecting, so the advertised window stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /api/messages/ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        raw = cls(sock)
        while b"\r\n\r\n" not in raw.buffer:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), TIMEOUT)
            assert chunk, "connection closed during the handshake"
            raw.buffer += chunk
        head, raw.buffer = raw.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        return raw

    def _frame(self) -> tuple[int, bytes] | None:
        """One complete server frame from the buffer (servers never mask), or None."""
        b = self.buffer
        if len(b) < 2:
            return None
        opcode, length, at = b[0] & 0x0F, b[1] & 0x7F, 2
        if length == 126:
            if len(b) < 4:
                return None
            length, at = struct.unpack("!H", b[2:4])[0], 4
        elif length == 127:
            if len(b) < 10:
                return None
            length, at = struct.unpack("!Q", b[2:10])[0], 10
        if len(b) < at + length:
            return None
        self.buffer = b[at + length:]
        return opcode, b[at:at + length]

    async def drain(self, timeout: float) -> tuple[list[dict[str, Any]], int | None]:
        """Read until the server's close frame or EOF: (text frames, close code or None)."""
        loop = asyncio.get_running_loop()
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                while (frame := self._frame()) is not None:
                    opcode, payload = frame
                    if opcode == 0x1:
                        frames.append(json.loads(payload))
                    elif opcode == 0x8:
                        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                        return frames, code
                try:
                    chunk = await loop.sock_recv(self.sock, 65536)
                except ConnectionError:
                    return frames, None
                if not chunk:
                    return frames, None
                self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


async def metric(d: Daemon, name: str) -> float:
    status, _, body = await asyncio.to_thread(d.get, "/metrics")
    assert status == 200
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", body.decode(), re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def arrival(receiver: Client, content: str) -> tuple[int, float]:
    """Read until the new_message with this content; (its id, perf_counter at arrival)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            frame = json.loads(await receiver.ws.recv())
            if frame.get("type") == "new_message" and frame.get("content") == content:
                return frame["messageId"], time.perf_counter()
            receiver.seen.append(frame)


async def round_trip(sender: Client, receiver: Client, conv: int, tag: str) -> tuple[int, float]:
    """Send one message; (its id, seconds until the other member had new_message)."""
    content = f"{tag} {CONTENT}"
    started = time.perf_counter()
    await sender.send({"type": "send_message", "conversationId": conv,
                       "content": content, "requestId": tag})
    try:
        mid, arrived = await arrival(receiver, content)
    except TimeoutError:
        raise AssertionError(f"{tag}: no new_message within {TIMEOUT}s") from None
    ack = await sender.expect("message_sent", requestId=tag)
    assert ack["messageId"] == mid
    # Drop what the active pair does not need, so the buffers stay small.
    for c in (sender, receiver):
        c.seen = [f for f in c.seen if f.get("type") not in ("new_message", "message_sent")]
    return mid, arrived - started


async def collect_after_reconnect(client: Client) -> tuple[list[int], list[int]]:
    """(ids replayed on connect, ids from sync 0 to the end)."""
    replayed, synced = await replay_then_sync(client, lambda f: f["type"] != "queued_message")
    return [f["messageId"] for f in replayed], synced


async def test_stalled_reader_closed_1013_others_unaffected(tmp_path: Path) -> None:
    """A member that stops reading gets 1013; the pair stays fast, RSS bounded, nothing lost."""
    d = Daemon(tmp_path, {
        "server.max_pending_bytes": MAX_PENDING,
        # Long enough for the stalled client to come back and read its 1013 close frame.
        "server.close_timeout_seconds": 30 * SCALE,
        "limits.frames_per_second": 10000,
        "limits.frames_burst": 10000,
    })
    d.start()
    assert d.proc is not None
    pid = d.proc.pid
    connector = Connector(d)
    raw: RawClient | None = None
    try:
        a = await connector()
        b = await connector()
        slow_id = new_user()
        conv = await conversation(a, b.user_id, slow_id)
        await b.expect("conversation_created", conversationId=conv)
        raw = await RawClient.open(d.port, make_token(slow_id, username="slow"))
        # The stalled member is registered before the traffic starts.
        await a.expect("user_online", userId=slow_id)
        # Warm up allocator and caches so the RSS baseline is honest.
        warm = [(await round_trip(a, b, conv, f"warm-{i}"))[0] for i in range(20)]
        baseline = rss_kb(pid)
        peak = baseline
        latencies: list[float] = []
        ids: list[int] = []
        closed_after: int | None = None
        i = 0
        deadline = time.monotonic() + 20 * SCALE
        # Chat until the stalled reader is cut off, then as long again to show nothing degrades.
        while closed_after is None or i < 2 * closed_after:
            assert time.monotonic() < deadline, "the stalled client was never closed"
            sender, receiver = (a, b) if i % 2 == 0 else (b, a)
            mid, latency = await round_trip(sender, receiver, conv, f"m-{i}")
            ids.append(mid)
            latencies.append(latency)
            i += 1
            if i % 25 == 0:
                peak = max(peak, rss_kb(pid))
                closes = await metric(d, "pitchey_slow_consumer_closes_total")
                if closed_after is None and closes >= 1:
                    closed_after = i
        peak = max(peak, rss_kb(pid))
        assert closed_after is not None
        pushed = closed_after * len(CONTENT)
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        assert p99 < 0.2 * SCALE, f"p99 round trip {p99 * 1000:.1f} ms over {len(latencies)}"
        assert peak - baseline < 50 * 1024, f"RSS grew {(peak - baseline) / 1024:.1f} MB"

        # The stalled member now reads: what it was sent, then the 1013 close frame.
        frames, code = await raw.drain(TIMEOUT)
        assert code == 1013, (code, len(frames), pushed)
        live = [f["messageId"] for f in frames if f.get("type") == "new_message"]
        assert len(live) == len(set(live))
        assert set(live) <= set(warm) | set(ids)
        raw.close()
        raw = None

        # Reconnect and sync: every message is there.
        again = await connector(slow_id)
        replayed, synced = await collect_after_reconnect(again)
        assert set(warm) | set(ids) <= set(synced)
        # What reached no live connection after the cut-off is replayed without asking.
        after_cut = set(ids[closed_after:])
        assert after_cut <= set(replayed), sorted(after_cut - set(replayed))[:10]
        assert len(replayed) == len(set(replayed))
    finally:
        if raw is not None:
            raw.close()
        await connector.close_all()
        d.stop()


async def test_stalled_reader_is_dropped_after_close_timeout(tmp_path: Path) -> None:
    """A member that never reads again is disconnected within close_timeout after its 1013."""
    d = Daemon(tmp_path, {
        "server.max_pending_bytes": MAX_PENDING,
        "server.close_timeout_seconds": CLOSE_TIMEOUT,
        "limits.frames_per_second": 10000,
        "limits.frames_burst": 10000,
    })
    d.start()
    connector = Connector(d)
    raw: RawClient | None = None
    try:
        a = await connector()
        b = await connector()
        slow_id = new_user()
        conv = await conversation(a, b.user_id, slow_id)
        raw = await RawClient.open(d.port, make_token(slow_id, username="slow"))
        await a.expect("user_online", userId=slow_id)
        assert await metric(d, "pitchey_connections") == 3
        deadline = time.monotonic() + 20 * SCALE
        i = 0
        while await metric(d, "pitchey_slow_consumer_closes_total") < 1:
            assert time.monotonic() < deadline, "the stalled client was never closed"
            for _ in range(10):
                await round_trip(a, b, conv, f"n-{i}")
                i += 1
        cut = time.monotonic()
        # The server must give up on the closing handshake and drop the connection.
        while await metric(d, "pitchey_connections") > 2:
            waited = time.monotonic() - cut
            assert waited < (CLOSE_TIMEOUT + 2) * SCALE, (
                f"stalled connection still registered {waited:.1f}s after its 1013"
                f" (close_timeout_seconds = {CLOSE_TIMEOUT})"
            )
            await asyncio.sleep(0.05)  # polling pace for the gauge
        await a.expect("user_offline", userId=slow_id)
    finally:
        if raw is not None:
            raw.close()
        await connector.close_all()
        d.stop()
