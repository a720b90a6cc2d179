"""Reference (a) for the benchmark: a bare chat relay on the websockets library.

It speaks the daemon's frame shapes for the part the benchmark drives -- ``connected`` on open,
``create_conversation`` -> ``conversation_created``, ``send_message`` -> ``message_sent`` to the
sender and ``new_message`` to every other connection of every participant, fanned out with
``websockets.broadcast`` -- with the same server options (no compression, same max frame size and
keepalive) and nothing else: the token's payload is read but its signature is not checked, no
rate limits, no validation, no database, no offline queue. What it reaches is the library's (and
Python's) limit for this protocol on this machine, the ceiling the daemon is compared with.

    python bench/relay.py --port 8765 [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import http
import json
import signal
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

WS_PATH = "/api/messages/ws"


def now_iso() -> str:
    moment = datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def encode(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"), ensure_ascii=False)


def unverified_claims(token: str) -> dict[str, Any]:
    """The JWT payload, signature NOT checked (this is a reference, not a server)."""
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


class Relay:
    def __init__(self) -> None:
        self.pending: dict[ServerConnection, tuple[int, str]] = {}
        self.connections: dict[int, list[ServerConnection]] = {}
        self.members: dict[int, tuple[int, ...]] = {}
        self.next_conversation = 1
        self.next_message = 1
        self.open = 0

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/api/health":
            body = json.dumps({"status": "healthy", "timestamp": now_iso(),
                               "connections": self.open})
            return ws.respond(http.HTTPStatus.OK, body)
        if url.path != WS_PATH:
            return ws.respond(http.HTTPStatus.NOT_FOUND, '{"error":"not_found"}')
        claims = unverified_claims((parse_qs(url.query).get("token") or [""])[0])
        user_id = claims.get("userId")
        if not isinstance(user_id, int):
            return ws.respond(http.HTTPStatus.UNAUTHORIZED, '{"error":"invalid_token"}')
        self.pending[ws] = (user_id, str(claims.get("username") or f"User {user_id}"))
        return None

    async def handler(self, ws: ServerConnection) -> None:
        user_id, username = self.pending.pop(ws)
        mine = self.connections.setdefault(user_id, [])
        mine.append(ws)
        self.open += 1
        try:
            await ws.send(encode("connected", userId=user_id, username=username,
                                 timestamp=now_iso()))
            async for text in ws:
                frame = json.loads(text)
                kind = frame.get("type")
                if kind == "send_message":
                    self.send_message(ws, user_id, username, frame)
                elif kind == "create_conversation":
                    self.create_conversation(ws, user_id, frame)
                elif kind == "ping":
                    broadcast([ws], encode("pong", timestamp=now_iso(), userId=user_id))
        except ConnectionClosed:
            pass
        finally:
            self.open -= 1
            mine.remove(ws)
            if not mine:
                del self.connections[user_id]

    def targets(self, members: tuple[int, ...], skip: ServerConnection) -> list[ServerConnection]:
        return [c for m in members for c in self.connections.get(m, ()) if c is not skip]

    def send_message(
        self, ws: ServerConnection, user_id: int, username: str, frame: dict[str, Any]
    ) -> None:
        cid = frame.get("conversationId")
        members = self.members.get(cid) if isinstance(cid, int) else None
        if members is None:
            broadcast([ws], encode("error", code="forbidden", message="unknown conversation"))
            return
        message_id = self.next_message
        self.next_message += 1
        fields = {
            "messageId": message_id,
            "conversationId": cid,
            "senderId": user_id,
            "senderName": username,
            "content": frame.get("content"),
            "attachments": [],
            "messageType": "text",
            "timestamp": now_iso(),
        }
        targets = self.targets(members, ws)
        broadcast(targets, encode("new_message", **fields, delivered=True))
        reply = {**fields, "delivered": bool(targets)}
        if "requestId" in frame:
            reply["requestId"] = frame["requestId"]
        broadcast([ws], encode("message_sent", **reply))

    def create_conversation(
        self, ws: ServerConnection, user_id: int, frame: dict[str, Any]
    ) -> None:
        ids = [user_id, *(i for i in frame.get("participantIds", ()) if i != user_id)]
        cid = self.next_conversation
        self.next_conversation += 1
        self.members[cid] = tuple(ids)
        fields = {"conversationId": cid, "title": frame.get("title"), "isGroup": len(ids) > 2,
                  "participantIds": sorted(ids), "createdBy": user_id}
        reply = dict(fields)
        if "requestId" in frame:
            reply["requestId"] = frame["requestId"]
        broadcast([ws], encode("conversation_created", **reply))
        broadcast(self.targets(self.members[cid], ws), encode("conversation_created", **fields))


async def main(host: str, port: int) -> None:
    relay = Relay()
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.cancel)
    async with serve(
        relay.handler, host, port, process_request=relay.process_request, compression=None,
        max_size=65536, ping_interval=20, ping_timeout=20, close_timeout=3,
    ) as server:
        with contextlib.suppress(asyncio.CancelledError):
            await stop
        server.close(close_connections=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(main(args.host, args.port))
    else:
        asyncio.run(main(args.host, args.port))
