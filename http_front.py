"""The front of the daemon's port: every connection starts here, before websockets sees it.

websockets' server refuses HTTP requests with a body, and the HTTP API takes POST on the same
port. So each accepted connection is a :class:`FrontConnection` (a websockets
``ServerConnection`` subclass, given to ``serve(create_connection=...)``) that holds back the
first bytes and feeds them to **h11**, a maintained HTTP/1.1 parser, until the request head is
complete. Then one of two things happens:

- a ``GET`` on the WebSocket path (or any ``Upgrade: websocket`` request): the connection is
  handed to websockets exactly as if it had just been accepted (``connection_made``), with the
  bytes already read replayed (``data_received``). From there websockets owns it: the
  handshake (``process_request``: 401/429/503), then frames, untouched by this module;
- anything else: h11 reads the body (bounded) and the request is answered here
  (``Front.respond``), keep-alive included, without websockets.

Bounds: the request head (``http.max_header_bytes``, 431 beyond), the body
(``server.max_message_bytes``, 413 beyond), the time to send a head
(``http.header_timeout_seconds``), and the connections not yet handed over or still being
answered (``http.max_in_progress``). Beyond that bound connections wait for a turn, unread
(a burst of reconnects after a restart is served, not refused), for at most the header timeout,
as long as descriptors are left for as many connections as may be in progress (``max_open``,
what the descriptor limit leaves for clients, counted over every listener: ``OpenCount``);
beyond those, or after that wait, 503.
Refusals are logged through a :class:`LogSummary`, a few lines a second per kind.
"""

from __future__ import annotations

import asyncio
import http
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import h11
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

log = logging.getLogger("pitchey.http")


@dataclass
class Answer:
    """An HTTP answer: status, headers (without Content-Length) and body."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    close: bool = False


@dataclass(frozen=True)
class HttpRequest:
    """A parsed request: method (upper case), target, header pairs (lower-case names), body."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The only value of header ``name``; None when absent. Raises DuplicateHeader when
        there are several (a request with two Authorization headers is refused, not guessed)."""
        values = self.all(name)
        if len(values) > 1:
            raise DuplicateHeader(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


class DuplicateHeader(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class LogSummary:
    """Logs at most ``per_second`` lines a second for each kind; the lines held back are
    counted and reported in one line when the second ends (a line of the next second)."""

    def __init__(self, logger: logging.Logger, per_second: int = 3,
                 clock: Callable[[], float] = time.monotonic, level: int = logging.INFO) -> None:
        self.logger = logger
        self.level = level
        self.per_second = per_second
        self.clock = clock
        # kind -> [window start, lines logged in it, lines suppressed in it]
        self.windows: dict[str, list[float]] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}

    def note(self, kind: str, message: str, *args: Any) -> None:
        now = self.clock()
        window = self.windows.get(kind)
        if window is not None and now - window[0] >= 1:
            self.flush(kind)  # may open the next second with its summary line
            window = self.windows.get(kind)
        if window is None:
            window = self.windows[kind] = [now, 0, 0]
        if window[1] < self.per_second:
            window[1] += 1
            self.logger.log(self.level, message, *args)
            return
        window[2] += 1
        if kind not in self.timers:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self.timers[kind] = loop.call_later(max(0.0, 1 - (now - window[0])),
                                                self.flush, kind)

    def flush(self, kind: str) -> None:
        timer = self.timers.pop(kind, None)
        if timer is not None:
            timer.cancel()
        window = self.windows.pop(kind, None)
        if window is not None and window[2]:
            self.logger.log(self.level, "%s: %d more like it in the last second, not logged",
                            kind, int(window[2]))
            # The summary is a line of the next second: a flood of one kind writes at most
            # per_second lines a second, summaries included.
            self.windows[kind] = [self.clock(), 1, 0]

    def close(self) -> None:
        for kind in list(self.timers):
            self.flush(kind)


Respond = Callable[["FrontConnection", HttpRequest], Awaitable[Answer]]
# (method, target, headers) -> whether the request is a WebSocket handshake to hand over.
IsWebSocket = Callable[[str, str, list[tuple[str, str]]], bool]
# The CORS headers of an answer to a request with these (lower-case name) headers.
Cors = Callable[[list[tuple[str, str]]], list[tuple[str, str]]]


class OpenCount:
    """Client connections open on every listener of the process (the main port and
    ``api.port``): each holds a descriptor, so the fronts of both count into one."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class Front:
    """Shared state of every front connection: limits, the responder, the ones in progress."""

    def __init__(
        self,
        respond: Respond,
        is_websocket: IsWebSocket,
        websocket_refusal: Callable[[list[tuple[str, str]]], Answer | None],
        *,
        max_header_bytes: int,
        max_body_bytes: int,
        max_in_progress: int,
        header_timeout: float,
        summary: LogSummary,
        max_open: int | None = None,
        opened: OpenCount | None = None,
        cors: Cors | None = None,
    ) -> None:
        self.respond = respond
        # The CORS headers for a request's headers, added to the errors written here.
        self.cors = cors
        self.is_websocket = is_websocket
        self.websocket_refusal = websocket_refusal
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.max_in_progress = max_in_progress
        # Client connections of every kind the descriptors allow (None: no descriptor bound;
        # then as many may wait as may be in progress).
        self.max_open = max_open
        # Client connections with a transport, WebSocket ones included, of every front that
        # shares this count.
        self.opened = opened if opened is not None else OpenCount()
        self.header_timeout = header_timeout
        self.summary = summary
        self.in_progress: set[FrontConnection] = set()
        # Accepted beyond max_in_progress, unread, in arrival order (a dict as ordered set).
        self.waiting: dict[FrontConnection, None] = {}
        self.refused = 0

    def may_wait(self) -> bool:
        """Whether one more connection may wait for a turn: while the descriptors still
        allow a whole in-progress set beyond every open connection, so that connections past
        the waiting ones are accepted and refused at once, not left in the accept queue."""
        if self.max_open is None:
            return len(self.waiting) < self.max_in_progress
        return self.opened.n + self.max_in_progress <= self.max_open

    def connection_class(self) -> type[FrontConnection]:
        """A FrontConnection class bound to this front, for ``serve(create_connection=)``."""
        front = self

        class Bound(FrontConnection):
            pass

        Bound.front = front
        return Bound

    def abort_all(self) -> None:
        """Shutdown: drop the connections that are not WebSocket connections."""
        for conn in [*self.in_progress, *self.waiting]:
            conn.abort()

    def next_turn(self) -> None:
        """A connection left the in-progress set: let the longest-waiting ones in."""
        while self.waiting and len(self.in_progress) < self.max_in_progress:
            conn = next(iter(self.waiting))
            del self.waiting[conn]
            conn._start()


_WS, _HEAD, _HTTP, _DONE = "ws", "head", "http", "done"


class FrontConnection(ServerConnection):
    """A websockets connection that starts as an HTTP/1.1 connection (module docstring)."""

    front: Front

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = _HEAD
        self.raw: asyncio.Transport | None = None
        self.head = bytearray()  # bytes of the request being read, until its head is complete
        self.parser = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.front.max_header_bytes
        )
        self.request_head: h11.Request | None = None
        self.body = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.head_due = 0.0  # loop time by which the first request head must be complete
        self.task: asyncio.Task[None] | None = None

    # -- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # A stream transport; not necessarily an asyncio.Transport subclass (uvloop's are not).
        self.raw = transport = cast(asyncio.Transport, base)
        front = self.front
        front.opened.n += 1
        # The first request head is due header_timeout after the accept, a wait included.
        self.head_due = asyncio.get_running_loop().time() + front.header_timeout
        if len(front.in_progress) < front.max_in_progress:
            self._start()
        elif front.may_wait():
            # Unread until its turn (front.next_turn), or refused when its head is due.
            transport.pause_reading()
            front.waiting[self] = None
            self.timer = asyncio.get_running_loop().call_at(self.head_due, self._refuse_busy)
        else:
            self._refuse_busy()

    def _start(self) -> None:
        self.front.in_progress.add(self)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_at(self.head_due, self._timed_out)
        if self.raw is not None and not self.raw.is_closing():
            self.raw.resume_reading()

    def _refuse_busy(self) -> None:
        front = self.front
        waited = self in front.waiting
        front.waiting.pop(self, None)
        self.timer = None
        transport = self.raw
        assert transport is not None
        front.refused += 1
        front.summary.note("busy", "refused a connection: %d requests in progress, %d waiting",
                           len(front.in_progress), len(front.waiting))
        self.mode = _DONE
        if transport.is_closing():
            return
        transport.write(_raw_answer(503, "busy", "Too many requests in progress"))
        # Half-close and discard what the client sends: closing with unread bytes would
        # reset the connection and lose the 503. The client's close (or the timer) ends it.
        if transport.can_write_eof():
            transport.write_eof()
        if waited:
            transport.resume_reading()
        asyncio.get_running_loop().call_later(1, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.mode == _WS:
            super().data_received(data)
            return
        if self.mode == _DONE:
            return
        if self.request_head is None:
            self.head += data  # the bytes of the request being read, kept for a hand-over
        self.parser.receive_data(data)
        self._advance()

    def eof_received(self) -> None:
        if self.mode == _WS:
            super().eof_received()
            return
        self.parser.receive_data(b"")
        if self.mode != _DONE:
            self._advance()
        # Returning None closes the transport.

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.opened.n -= 1
        if self.mode == _WS:
            super().connection_lost(exc)
            return
        self._forget()
        self.mode = _DONE
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        if self.mode == _WS:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self.mode == _WS:
            super().resume_writing()

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        # Once handed over, the connection counts as in progress until its handshake ends.
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self._forget()

    # -- the HTTP side ---------------------------------------------------------------------

    def abort(self) -> None:
        if self.mode == _WS:
            self.transport.abort()
        elif self.raw is not None:
            self.raw.abort()

    def _forget(self) -> None:
        front = self.front
        front.waiting.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self in front.in_progress:
            front.in_progress.discard(self)
            front.next_turn()

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(
            self.front.header_timeout, self._timed_out
        )

    def _timed_out(self) -> None:
        self.timer = None
        if self.mode == _HEAD and self.raw is not None:
            self.front.summary.note("timeout", "no complete request within %.0fs; closing",
                                    self.front.header_timeout)
            self.mode = _DONE
            self.raw.abort()

    def _advance(self) -> None:
        """Take the parser's events until it needs data or a request is being answered."""
        while self.mode == _HEAD:
            try:
                event = self.parser.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                kind = "header_too_large" if status == 431 else "bad_request"
                self.front.summary.note(kind, "bad HTTP request (%d): %s", status, exc)
                message = ("Request header is too large" if status == 431
                           else "Malformed HTTP request")
                self._send_error_and_close(status, kind, message)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if event is h11.PAUSED and self.request_head is None:
                    self._send_error_and_close(400, "bad_request", "Malformed HTTP request")
                return
            if isinstance(event, h11.Request):
                if not self._on_request(event):
                    return
                if self.parser.they_are_waiting_for_100_continue:
                    # The body is wanted (a too large one was refused above): say so now,
                    # or curl and others wait a second or more before they send it.
                    assert self.raw is not None
                    self.raw.write(self.parser.send(
                        h11.InformationalResponse(status_code=100, headers=[],
                                                  reason=b"Continue")) or b"")
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > self.front.max_body_bytes:
                    self._too_large()
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._start_answer()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _on_request(self, event: h11.Request) -> bool:
        """False when the request was handed over or refused and nothing more is to be read."""
        self.request_head = event
        method = event.method.decode("ascii", "replace").upper()
        target = event.target.decode("ascii", "replace")
        headers = _header_pairs(event)
        # h11 bounds a head that has not ended yet; one that arrived whole is measured here.
        size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if size > self.front.max_header_bytes:
            self.front.summary.note("header_too_large", "request head of %d bytes refused", size)
            self._send_error_and_close(431, "header_too_large", "Request header is too large")
            return False
        if self.front.is_websocket(method, target, headers):
            # Also after earlier requests on a kept-alive connection: clients pool their
            # connections (Node's fetch-based WebSocket reuses the one a health check used).
            too_long = _lines_too_long(event)
            if too_long:
                # websockets would refuse the line with a text page (414, or 400 for a
                # header). The query or Authorization that long is a token, refused as one
                # (PROTOCOL.md 2: 401 with JSON); any other line is a header too large.
                token = any(name in (b"", b"authorization") for name in too_long)
                status = 401 if token else 431
                self.front.summary.note("handshake_refused", "handshake refused: %d", status)
                body = ({"error": "invalid_token", "message": "Token is too long"} if token
                        else {"error": "header_too_large",
                              "message": "Request header is too large"})
                self._write(json_answer(status, body, close=True), method)
                return False
            refusal = self.front.websocket_refusal(headers)
            if refusal is not None:
                self.front.summary.note("handshake_refused", "handshake refused: %d",
                                        refusal.status)
                refusal.close = True
                self._write(refusal, method)  # a non-101 answer declines the upgrade
                return False
            self._hand_over()
            return False
        length = event_length(headers)
        if length is not None and length > self.front.max_body_bytes:
            self._too_large()
            return False
        return True

    def _hand_over(self) -> None:
        """Give the connection to websockets as if it had just been accepted."""
        assert self.raw is not None
        self.mode = _WS
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        replay = bytes(self.head)
        self.head = bytearray()
        # Nothing HTTP is read or written on it again: drop the parser and the request
        # (~2.7 KB together, for as long as the WebSocket connection lives).
        del self.parser
        self.request_head = None
        self.body = bytearray()
        super().connection_made(self.raw)
        super().data_received(replay)

    def _too_large(self) -> None:
        self.front.summary.note("body_too_large", "request body over %d bytes refused",
                                self.front.max_body_bytes)
        self._send_error_and_close(413, "too_large",
                                   f"Request body is over {self.front.max_body_bytes} bytes")

    def _start_answer(self) -> None:
        assert self.request_head is not None and self.raw is not None
        head = self.request_head
        request = HttpRequest(
            head.method.decode("ascii", "replace").upper(),
            head.target.decode("ascii", "replace"),
            _header_pairs(head),
            bytes(self.body),
        )
        self.mode = _HTTP
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.raw.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._answer(request))

    async def _answer(self, request: HttpRequest) -> None:
        try:
            answer = await self.front.respond(self, request)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.target.split("?")[0])
            answer = json_answer(500, {"error": "internal", "message": "Internal error"})
            if self.front.cors is not None:
                answer.headers.extend(self.front.cors(request.headers))
        finally:
            self.task = None
        if self.mode != _HTTP:
            return  # the connection went away meanwhile
        self._write(answer, request.method)
        if self.mode == _DONE:
            return
        if (self.parser.our_state is h11.DONE and self.parser.their_state is h11.DONE):
            self.parser.start_next_cycle()
            # What the client sent beyond the answered request is the next request's start.
            self.head = bytearray(self.parser.trailing_data[0])
            self.request_head = None
            self.body = bytearray()
            self.mode = _HEAD
            self._arm_timer()
            assert self.raw is not None
            self.raw.resume_reading()
            self._advance()  # a pipelined request may be buffered already
        else:
            self._close()

    def _write(self, answer: Answer, method: str) -> None:
        assert self.raw is not None
        headers = [(k, v) for k, v in answer.headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(answer.body))))
        if answer.close:
            headers.append(("Connection", "close"))
        out = self.parser.send(h11.Response(status_code=answer.status, headers=headers,
                                            reason=_reason(answer.status)))
        chunks = [out or b""]
        if method != "HEAD" and answer.body and answer.status not in (204, 304):
            chunks.append(self.parser.send(h11.Data(data=answer.body)) or b"")
        chunks.append(self.parser.send(h11.EndOfMessage()) or b"")
        self.raw.write(b"".join(chunks))
        if answer.close or self.parser.our_state is h11.MUST_CLOSE:
            self._close()

    def _send_error_and_close(self, status: int, code: str, message: str) -> None:
        assert self.raw is not None
        if self.parser.our_state is h11.SEND_RESPONSE:
            answer = json_answer(status, {"error": code, "message": message}, close=True)
            head = self.request_head
            if head is not None and self.front.cors is not None:
                answer.headers.extend(self.front.cors(_header_pairs(head)))
            self._write(answer, "GET")
        else:
            self.raw.write(_raw_answer(status, code, message))
            self._close()

    def _close(self) -> None:
        self.mode = _DONE
        self._forget()
        raw = self.raw
        if raw is None or raw.is_closing():
            return
        # A lingering close: half-close, discard what still comes (a body being refused), and
        # close on the client's EOF or after a second. Closing with unread bytes would reset
        # the connection, and the client could lose the answer (a 413, say).
        if raw.can_write_eof():
            raw.write_eof()
            asyncio.get_running_loop().call_later(1, raw.abort)
        else:
            raw.close()


def _header_pairs(head: h11.Request) -> list[tuple[str, str]]:
    """A request's headers as (lower-case name, value) text pairs."""
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers]


# The longest request or header line websockets reads (websockets.http11.MAX_LINE_LENGTH).
WS_MAX_LINE = 8192


def _lines_too_long(event: h11.Request) -> list[bytes]:
    """The lines of the request longer than websockets reads (CRLF included): b"" for the
    request line, else the header's lower-case name."""
    long = []
    if len(event.method) + len(event.target) + len(" HTTP/1.1\r\n") + 1 > WS_MAX_LINE:
        long.append(b"")
    long.extend(k.lower() for k, v in event.headers if len(k) + len(v) + 4 > WS_MAX_LINE)
    return long


def event_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name == "content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def json_answer(status: int, body: Any, headers: list[tuple[str, str]] | None = None,
                *, close: bool = False) -> Answer:
    import json

    return Answer(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                           *(headers or [])], json.dumps(body).encode(), close)


def _raw_answer(status: int, code: str, message: str) -> bytes:
    """A complete answer without a parser (the request could not be parsed)."""
    import json

    body = json.dumps({"error": code, "message": message}).encode()
    head = (f"HTTP/1.1 {status} {_reason(status).decode()}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def from_websockets(response: Response) -> Answer:
    """An Answer from a websockets Response (the routes that predate the front)."""
    headers = [(k, v) for k, v in response.headers.raw_items()
               if k.lower() not in ("connection", "content-length")]
    return Answer(response.status_code, headers, bytes(response.body or b""))


def to_websockets(request: HttpRequest) -> Request:
    return Request(request.target, Headers(request.headers))
