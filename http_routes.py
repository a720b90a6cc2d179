"""HTTP routes served before the WebSocket handshake: health, metrics, static files, demo.

``Routes.process_request`` is websockets' ``process_request`` hook: the WebSocket path goes to
the admission check (``connection.Sessions.admit``), every other path is answered here.
"""

from __future__ import annotations

import asyncio
import http
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

import protocol as p
from demo import Demo
from hub import Hub
from metrics import Metrics
from store import Store, StoreError

log = logging.getLogger("pitchey.http")

HERE = Path(__file__).resolve().parent
WS_PATH = "/api/messages/ws"
STATIC = {
    "/client/pitchey-ws.js": ("client/pitchey-ws.js", "text/javascript; charset=utf-8"),
    "/client/pitchey-ws.d.ts": ("client/pitchey-ws.d.ts", "text/plain; charset=utf-8"),
}
DEMO_STATIC = {
    "/": ("client/demo.html", "text/html; charset=utf-8"),
}

Admit = Callable[[ServerConnection, Request, str], Awaitable[Response | None]]


class Routes:
    def __init__(
        self, store: Store, hub: Hub, metrics: Metrics, admit: Admit,
        demo: Callable[[], Demo | None], demo_hosts: tuple[str, ...] = (),
    ) -> None:
        self.demo_hosts = demo_hosts
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self.admit = admit
        self.demo = demo

    async def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        path = url.path
        if path == WS_PATH:
            return await self.admit(ws, request, url.query)
        if path == "/api/health":
            return await self.health(ws)
        if path == "/metrics":
            return text_response(ws, 200, self.render_metrics(), "text/plain; version=0.0.4")
        if path in STATIC:
            return file_response(ws, *STATIC[path])
        demo = self.demo()
        if demo is not None and path.startswith("/demo/") and not self.demo_caller(request):
            # A page on another site, or one reached through a rebinding DNS name, must not
            # mint tokens of the demo users.
            return json_response(ws, 403, {"error": "host_not_allowed",
                                           "message": "Demo routes answer loopback hosts only"})
        if demo is not None:
            if path in DEMO_STATIC:
                return file_response(ws, *DEMO_STATIC[path])
            if path == "/demo/users":
                return json_response(ws, 200, {"users": demo.users_json()})
            if path == "/demo/token":
                return json_response(ws, *demo.token_response(parse_qs(url.query)))
        return json_response(ws, 404, {"error": "not_found", "message": "Not found"})

    def demo_caller(self, request: Request) -> bool:
        """A request for a demo route: its Host (and Origin, when sent) name a loopback host
        or one of ``server.demo_hosts``."""
        hosts = request.headers.get_all("Host")
        if len(hosts) != 1:
            return False
        names = [hosts[0], *(urlsplit(o).netloc for o in request.headers.get_all("Origin"))]
        return all(_host_allowed(n, self.demo_hosts) for n in names)

    async def health(self, ws: ServerConnection) -> Response:
        """200 when the database answers, its pages parse and it takes writes; otherwise 503
        with the reason (the store's error text: disk full, read-only, deleted, corrupt)."""
        reason: str | None = None
        try:
            if not await asyncio.wait_for(self.store.healthy(), 2):
                reason = "the database does not answer"
        except TimeoutError:
            reason = "the database did not answer within 2 s"
        except StoreError as exc:
            reason = str(exc)
        body: dict[str, Any] = {
            "status": "healthy" if reason is None else "unhealthy",
            "timestamp": p.now_iso(),
            "connections": self.hub.connections,
            "usersOnline": len(self.hub.users),
        }
        if reason is not None:
            body["reason"] = reason
        return json_response(ws, 200 if reason is None else 503, body)

    def render_metrics(self) -> str:
        gauges = {
            "pitchey_connections": ("Open WebSocket connections.", float(self.hub.connections)),
            "pitchey_users_online": (
                "Users online (including the offline grace period).",
                float(len(self.hub.users)),
            ),
            "pitchey_pending_outgoing_bytes": (
                "Bytes written but not yet sent, over all connections.",
                float(self.hub.pending_bytes()),
            ),
            "pitchey_write_queue": ("Writes waiting for the group-commit writer.",
                                    float(self.store.queued)),
        }
        counters = {
            "pitchey_slow_consumer_closes_total": (
                "Connections closed as slow consumers (1013).", self.hub.slow_consumer_closes
            ),
        }
        return self.metrics.render(gauges, counters)


def _host_allowed(netloc: str, extra: tuple[str, ...]) -> bool:
    """``netloc`` (host, host:port, [v6]:port) is a loopback host or one of ``extra``."""
    host = urlsplit(f"//{netloc}").hostname or ""
    if host == "localhost" or host.endswith(".localhost") or host in extra:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def text_response(ws: ServerConnection, status: int, body: str, content_type: str) -> Response:
    response = ws.respond(http.HTTPStatus(status), body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    return response


def json_response(ws: ServerConnection, status: int, body: Any) -> Response:
    return text_response(ws, status, json.dumps(body), "application/json")


def file_response(ws: ServerConnection, relative: str, content_type: str) -> Response:
    path = HERE / relative
    try:
        body = path.read_text(encoding="utf-8")
    except OSError:
        return json_response(ws, 404, {"error": "not_found", "message": "Not found"})
    response = text_response(ws, 200, body, content_type)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
