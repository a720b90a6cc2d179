"""A minimal WebSocket client for the load driver: an asyncio Protocol over raw frames.

Why not the websockets client: the driver gets one core of a two-core machine, the server the
other, and the driver must stay well below its core while it reads up to ~10^5 frames/s, or the
figure measures the driver. So this client does only what the benchmark needs:

* the opening handshake (RFC 6455 section 4.1), checking ``Sec-WebSocket-Accept``;
* unfragmented text frames in both directions (the servers under test never fragment the small
  frames they send), ping -> pong, close -> close;
* client frames are masked with the all-zero key. That is valid framing: the server still runs
  its unmasking over every payload, so it saves the server nothing; it only spares the driver a
  per-byte XOR. Payloads are handed to a callback as ``bytes``, unparsed: roles look at the
  ``{"type":"..."`` prefix (both servers put ``type`` first) and parse JSON only where they need
  a value.

Not a general-purpose client: no extensions, no fragmentation, no UTF-8 validation.

:class:`SocketIOConn` speaks Socket.IO v5 over Engine.IO v4's WebSocket transport on the same
frame code, for the python-socketio reference relay; roles see the same ``{"type":...}`` objects
from it as from a plain connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import socket
import struct
from collections import deque
from collections.abc import Callable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ZERO_MASK = b"\x00\x00\x00\x00"
MAX_HEAD = 65536

CONNECTED = b'{"type":"connected"'
# Socket.IO packets as Engine.IO MESSAGE packets ("4" + Socket.IO type), one per text frame.
SIO_OPEN = b"0{"  # Engine.IO OPEN, the server's first frame
SIO_PING, SIO_PONG = b"2", b"3"  # Engine.IO v4: the server pings, the client answers
SIO_CONNECT = b"40"  # CONNECT to the main namespace (client: + auth JSON; server: + {"sid":..})
SIO_CONNECT_ERROR = b"44"
SIO_EVENT = b'42["'
SIO_CONNECTED = b'42["connected",'
FRAME_TYPE = re.compile(rb'\{"type":\s*"([^"]+)"')


class HandshakeError(Exception):
    """The server refused the upgrade (``status`` is its HTTP status) or broke the protocol."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status} {detail}")
        self.status = status


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """One final client frame (masked with the zero key) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, 0x80 | n)) + ZERO_MASK + payload
    if n < 65536:
        return bytes((0x80 | opcode, 0xFE)) + struct.pack("!H", n) + ZERO_MASK + payload
    return bytes((0x80 | opcode, 0xFF)) + struct.pack("!Q", n) + ZERO_MASK + payload


class Conn(asyncio.Protocol):
    """One client connection. ``opened`` resolves when the server's first frame (``connected``)
    arrives; after that every text frame goes to ``handler(payload)``.

    Until a role sets ``handler``, frames are queued in ``inbox`` for :meth:`expect`.
    """

    def __init__(self, host: str, port: int, path: str) -> None:
        loop = asyncio.get_running_loop()
        self.key = base64.b64encode(os.urandom(16))
        self.accept = base64.b64encode(hashlib.sha1(self.key + GUID).digest())
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.upgraded = False
        self.handler: Callable[[bytes], None] = self._queue
        self.inbox: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.close_code: int | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(
                HandshakeError(0, f"connection lost before connected: {exc or 'EOF'}")
            )
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    self._fail(0, "response head too long")
                self.buf = data
                return
            head, data = data[:end], data[end + 4 :]
            if not head.startswith(b"HTTP/1.1 101"):
                status = int(head[9:12]) if head[9:12].isdigit() else 0
                self._fail(status, head.split(b"\r\n", 1)[0].decode("latin-1") + " " +
                           data[:200].decode("utf-8", "replace"))
                return
            if _header(head, b"sec-websocket-accept") != self.accept:
                self._fail(101, "bad Sec-WebSocket-Accept")
                return
            self.upgraded = True
        pos, n = 0, len(data)
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            opcode = data[pos] & 0x0F
            pos = end
            if opcode == 1:
                if self.opened.done():
                    self.handler(data[start:end])
                else:
                    self._first(data[start:end])
            elif opcode == 9:
                self.write(frame(data[start:end], 0xA))
            elif opcode == 8:
                payload = data[start:end]
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(frame(payload[:2], 0x8))
                    self.transport.close()
                return
        self.buf = data[pos:] if pos < n else b""

    # -- use -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, payload: bytes) -> None:
        """Send one text frame."""
        self.write(frame(payload))

    async def expect(self, prefix: bytes, limit: float) -> bytes:
        """The next queued frame starting with ``prefix`` (others are dropped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while True:
            while self.inbox:
                payload = self.inbox.popleft()
                if payload.startswith(prefix):
                    return payload
            if self.closed.done():
                raise ConnectionError(f"closed (code {self.close_code}) waiting for {prefix!r}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no frame starting {prefix!r} within {limit}s")
            self._waiter = loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, remaining)
            except TimeoutError:
                pass
            finally:
                self._waiter = None

    def abort(self) -> None:
        """Drop the connection with a TCP reset: no close handshake, no TIME_WAIT left behind
        (thousands of connections are opened per run)."""
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # -- internals -------------------------------------------------------------------------

    def _first(self, payload: bytes) -> None:
        if payload.startswith(CONNECTED):
            self.opened.set_result(None)
        else:
            text = payload[:200].decode("utf-8", "replace")
            self._fail(101, f"first frame is not connected: {text}")

    def _queue(self, payload: bytes) -> None:
        self.inbox.append(payload)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, status: int, detail: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(status, detail))
        if self.transport is not None:
            self.transport.close()


class SocketIOConn(Conn):
    """A Socket.IO v5 client on Engine.IO v4's WebSocket transport (no polling, no upgrade).

    After the upgrade the server sends Engine.IO OPEN (``0{"sid":..}``); the client answers with
    CONNECT to the main namespace carrying ``auth`` (``40{"token":..}``); the server accepts with
    ``40{"sid":..}`` (or refuses with ``44{..}``, a :class:`HandshakeError` with status 401) and
    the relay emits ``connected``. ``opened`` resolves when both have arrived, in either order.

    Events are ``42["name",{...}]``. Roles are the plain client's: they set ``handler`` and get
    each event's object (the relay emits the daemon's frame as it, ``type`` first), and
    :meth:`send` wraps a daemon-shaped frame into an event named by its ``type``. The server's
    Engine.IO ping ``2`` is answered ``3`` here. Not handled: acks, binary events, namespaces
    other than ``/``, events with more than one argument.
    """

    def __init__(self, host: str, port: int, path: str, auth: bytes) -> None:
        super().__init__(host, port, path)
        self.auth = auth
        self.accepted = self.greeted = False
        self._dispatch = self._packet  # bound once: the frame loop calls ``handler`` per frame

    # The frame loop calls ``self.handler(payload)`` for every text frame once opened; here that
    # is the Engine.IO/Socket.IO decoder, and what roles assign is the role it calls per event.
    @property  # type: ignore[override]
    def handler(self) -> Callable[[bytes], None]:
        return self._dispatch

    @handler.setter
    def handler(self, role: Callable[[bytes], None]) -> None:
        self.role = role

    def send(self, payload: bytes) -> None:
        """Send a daemon-shaped frame ``{"type":"X",...}`` as the event ``42["X",{...}]``."""
        match = FRAME_TYPE.match(payload)
        if match is None:
            raise ValueError(f"not a typed frame: {payload[:60]!r}")
        self.write(frame(SIO_EVENT + match.group(1) + b'",' + payload + b"]"))

    def _packet(self, payload: bytes) -> None:
        if payload.startswith(SIO_EVENT):
            # '42["name",{...}]' -> '{...}': names are plain words, so the first comma ends it.
            self.role(payload[payload.find(b",", 4) + 1 : -1])
        elif payload == SIO_PING:
            self.write(frame(SIO_PONG))

    def _first(self, payload: bytes) -> None:
        if payload == SIO_PING:
            self.write(frame(SIO_PONG))
        elif payload.startswith(SIO_OPEN):
            self.write(frame(SIO_CONNECT + self.auth))
        elif payload.startswith(SIO_CONNECT):
            self.accepted = True
        elif payload.startswith(SIO_CONNECTED):
            self.greeted = True
        elif payload.startswith(SIO_CONNECT_ERROR):
            self._fail(401, "CONNECT_ERROR " + payload[2:200].decode("utf-8", "replace"))
            return
        else:
            text = payload[:200].decode("utf-8", "replace")
            self._fail(101, f"unexpected packet before connected: {text}")
            return
        if self.accepted and self.greeted:
            self.opened.set_result(None)


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case) in a response head, or None."""
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip()
    return None


async def connect(host: str, port: int, path: str, limit: float,
                  sio_auth: bytes | None = None) -> Conn:
    """Open, upgrade, and wait for the server's ``connected`` frame. With ``sio_auth``, ``path``
    is a Socket.IO endpoint and ``sio_auth`` the JSON of the CONNECT packet's auth payload."""
    loop = asyncio.get_running_loop()
    conn = Conn(host, port, path) if sio_auth is None else SocketIOConn(host, port, path, sio_auth)

    async def run() -> None:
        await loop.create_connection(lambda: conn, host, port)
        await conn.opened

    try:
        await asyncio.wait_for(run(), limit)
    except BaseException:
        conn.abort()
        raise
    return conn
