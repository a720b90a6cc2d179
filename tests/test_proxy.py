"""deploy/nginx.conf, as documented, in front of the real daemon: a chat goes through it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
from conftest import TIMEOUT, Client, Daemon, conversation, eventually, make_token, new_user
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

if TYPE_CHECKING:
    from servers import NginxServer



@pytest.fixture(scope="module")
def proxy(daemon: Daemon) -> Iterator[NginxServer]:
    """nginx with deploy/nginx.conf proxying to this module's daemon."""
    import servers  # registered by pytest_plugins in conftest.py

    try:
        nginx = servers.NginxServer(daemon.port)
    except servers.ServerUnavailable as exc:
        servers.skip_or_fail("nginx", exc)
    try:
        # Installed but not starting means the documented config is broken: a failure.
        nginx.start()
        yield nginx
    finally:
        nginx.cleanup()


class Clients:
    """WebSocket clients through the proxy, closed after the test."""

    def __init__(self, proxy: NginxServer) -> None:
        self.proxy = proxy
        self.opened: list[Client] = []

    async def __call__(self, user_id: int, token: str | None = None) -> Client:
        token = token or make_token(user_id, username=f"user{user_id}")
        ws = await connect(f"{self.proxy.ws_url}?token={token}", open_timeout=TIMEOUT)
        client = Client(ws, user_id)
        self.opened.append(client)
        await client.expect("connected", userId=user_id)
        return client


@pytest.fixture
async def through(proxy: NginxServer) -> AsyncIterator[Clients]:
    clients = Clients(proxy)
    yield clients
    for client in clients.opened:
        await client.close()


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_health_through_the_proxy(proxy: NginxServer) -> None:
    """GET /api/health answers through nginx (its Server header, without a version)."""
    status, headers, body = get(proxy.http + "/api/health")
    assert status == 200
    assert headers["Server"] == "nginx"  # server_tokens off; the daemon's own header is gone
    assert headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert data["status"] == "healthy" and data["timestamp"].endswith("Z")


async def test_chat_through_the_proxy(proxy: NginxServer, through: Clients) -> None:
    """Two users on the proxy's ws:// URL: one sends, the other gets new_message exactly once."""
    alice, bob = new_user(), new_user()
    a = await through(alice)
    b = await through(bob)
    assert a.ws.response is not None and a.ws.response.headers["Server"] == "nginx"
    conversation_id = await conversation(a, bob)
    await a.send({"type": "send_message", "conversationId": conversation_id,
                  "content": "Hello through nginx", "requestId": "proxy-1"})
    sent = await a.expect("message_sent", requestId="proxy-1")
    assert sent["delivered"] is True and sent["conversationId"] == conversation_id
    got = await b.expect("new_message", messageId=sent["messageId"])
    assert got["content"] == "Hello through nginx"
    assert (got["senderId"], got["conversationId"]) == (alice, conversation_id)
    await b.quiet("new_message")
    # And back the other way, on the same upgraded connections.
    await b.send({"type": "send_message", "conversationId": conversation_id, "content": "Hi"})
    reply = await b.expect("message_sent")
    assert (await a.expect("new_message", messageId=reply["messageId"]))["senderId"] == bob


async def test_refused_token_is_401_through_the_proxy(proxy: NginxServer) -> None:
    """The daemon's 401 for a bad token reaches the client through nginx unchanged."""
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{proxy.ws_url}?token=not-a-jwt", open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body or b"{}")["error"]


async def test_access_log_has_no_token(proxy: NginxServer, through: Clients) -> None:
    """The documented log format records the WebSocket path and status, never the ?token=."""
    def websocket_lines() -> list[str]:
        marker = '"GET /api/messages/ws HTTP/1.1" 101 '
        return [line for line in proxy.access_log.read_text().splitlines() if marker in line]

    before = len(websocket_lines())
    user = new_user()
    token = make_token(user, username="logged")
    client = await through(user, token)
    await client.request({"type": "ping"}, "pong")
    await client.close()
    # nginx writes a WebSocket's line when the proxied connection ends.
    await eventually(lambda: len(websocket_lines()) > before)
    text = proxy.access_log.read_text()
    assert token not in text and "token=" not in text
