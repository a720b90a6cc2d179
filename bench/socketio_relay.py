"""Reference (c) for the benchmark: the same chat relay as ``bench/relay.py``, on python-socketio.

What a Python user would pick instead of a bare WebSocket server: python-socketio's
``AsyncServer`` on aiohttp, with the WebSocket transport only (no long-polling, no upgrade).
It relays the same logical events as the bare relay, each emitted as a Socket.IO event whose
name is the frame's ``type`` and whose one argument is the object the daemon would send
(``42["new_message",{"type":"new_message",...}]``): ``connected`` after the namespace CONNECT,
``create_conversation`` -> ``conversation_created``, ``send_message`` -> ``message_sent`` to the
sender and ``new_message`` to every other connection of every participant, ``ping`` -> ``pong``.

Idiomatic Socket.IO: every connection joins the room ``user:<id>`` and a message is emitted
once to the rooms of the conversation's members, skipping the sender's own connection; the
token comes in the CONNECT packet's ``auth`` (``{"token": ...}``, or ``?token=`` in the URL),
its payload read but its signature not checked. No compression (the driver offers none), frames
up to 64 KiB (``max_http_buffer_size``), Engine.IO pings every 20 s, a listen backlog of 4,096
(the daemon's). No database, no checks, no limits: the library's cost for this protocol, beside
the bare relay's.

    python bench/socketio_relay.py --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any
from urllib.parse import parse_qs

import socketio
from aiohttp import web
from relay import now_iso, unverified_claims

BACKLOG = 4096


def frame(kind: str, **fields: Any) -> dict[str, Any]:
    """The daemon's frame as a dict, ``type`` first."""
    return {"type": kind, **fields}


class SocketIORelay:
    def __init__(self) -> None:
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp", transports=["websocket"], allow_upgrades=False,
            http_compression=False, max_http_buffer_size=65536, ping_interval=20,
            ping_timeout=20,
        )
        self.users: dict[str, tuple[int, str]] = {}  # sid -> (userId, username)
        self.per_user: dict[int, int] = {}  # userId -> open connections
        self.members: dict[int, tuple[int, ...]] = {}
        self.next_conversation = 1
        self.next_message = 1
        for name in ("connect", "disconnect", "send_message", "create_conversation", "ping"):
            self.sio.on(name, getattr(self, name))

    async def connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        if not isinstance(token, str):
            token = (parse_qs(environ.get("QUERY_STRING", "")).get("token") or [""])[0]
        claims = unverified_claims(token)
        user_id = claims.get("userId")
        if not isinstance(user_id, int):
            raise socketio.exceptions.ConnectionRefusedError("invalid_token")
        username = str(claims.get("username") or f"User {user_id}")
        self.users[sid] = (user_id, username)
        self.per_user[user_id] = self.per_user.get(user_id, 0) + 1
        await self.sio.enter_room(sid, f"user:{user_id}")
        # The namespace's CONNECT reply goes out when this handler returns: greet after it.
        self.sio.start_background_task(
            self.sio.emit, "connected",
            frame("connected", userId=user_id, username=username, timestamp=now_iso()), to=sid)

    async def disconnect(self, sid: str, reason: str = "") -> None:
        user = self.users.pop(sid, None)
        if user is None:
            return
        left = self.per_user[user[0]] - 1
        if left:
            self.per_user[user[0]] = left
        else:
            del self.per_user[user[0]]

    def others_online(self, members: tuple[int, ...], sender: int) -> bool:
        """Whether any connection besides the sending one belongs to a member."""
        return any(self.per_user.get(m, 0) > (m == sender) for m in members)

    async def send_message(self, sid: str, data: Any) -> None:
        user_id, username = self.users[sid]
        cid = data.get("conversationId") if isinstance(data, dict) else None
        members = self.members.get(cid) if isinstance(cid, int) else None
        if members is None:
            await self.sio.emit("error", frame("error", code="forbidden",
                                               message="unknown conversation"), to=sid)
            return
        message_id = self.next_message
        self.next_message += 1
        fields = {
            "messageId": message_id,
            "conversationId": cid,
            "senderId": user_id,
            "senderName": username,
            "content": data.get("content"),
            "attachments": [],
            "messageType": "text",
            "timestamp": now_iso(),
        }
        delivered = self.others_online(members, user_id)
        if delivered:
            await self.sio.emit("new_message", frame("new_message", **fields, delivered=True),
                                to=[f"user:{m}" for m in members], skip_sid=sid)
        reply = frame("message_sent", **fields, delivered=delivered)
        if "requestId" in data:
            reply["requestId"] = data["requestId"]
        await self.sio.emit("message_sent", reply, to=sid)

    async def create_conversation(self, sid: str, data: Any) -> None:
        user_id = self.users[sid][0]
        data = data if isinstance(data, dict) else {}
        ids = [user_id, *(i for i in data.get("participantIds", ()) if i != user_id)]
        cid = self.next_conversation
        self.next_conversation += 1
        self.members[cid] = tuple(ids)
        fields = {"conversationId": cid, "title": data.get("title"), "isGroup": len(ids) > 2,
                  "participantIds": sorted(ids), "createdBy": user_id}
        reply = frame("conversation_created", **fields)
        if "requestId" in data:
            reply["requestId"] = data["requestId"]
        await self.sio.emit("conversation_created", reply, to=sid)
        await self.sio.emit("conversation_created", frame("conversation_created", **fields),
                            to=[f"user:{m}" for m in ids], skip_sid=sid)

    async def ping(self, sid: str, data: Any = None) -> None:
        await self.sio.emit("pong", frame("pong", timestamp=now_iso(),
                                          userId=self.users[sid][0]), to=sid)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy", "timestamp": now_iso(),
                                  "connections": len(self.users)})


async def main(host: str, port: int) -> None:
    relay = SocketIORelay()
    app = web.Application()
    relay.sio.attach(app)
    app.router.add_get("/api/health", relay.health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # The daemon's server.backlog: with aiohttp's 128 a 5,000-handshake storm drops SYNs and
    # then times TCP's retransmissions (p99 ~30 s), not the library.
    await web.TCPSite(runner, host, port, backlog=BACKLOG).start()
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await stop
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
