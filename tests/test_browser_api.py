"""A page on another origin, in Chromium, using only the HTTP API and the served client: it
lists a user's conversations, pages back through history, sends over HTTP while its socket is
down, and marks the conversation read (PROTOCOL.md section 8, CORS)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Connector, conversation, free_port, make_token, new_user, running
from playwright.async_api import Page, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: `apt-get install -y chromium` (CI installs it)",
)

# The page: helpers the test calls one step at a time. Everything runs in the browser, on
# the page's own origin, so every call is a cross-origin request that CORS must allow.
PAGE = """<!doctype html><meta charset="utf-8"><title>inbox</title>
<script type="module">
const api = (path, init = {}) => fetch(window.daemon + path, {
  ...init,
  headers: { Authorization: `Bearer ${window.token}`, 'Content-Type': 'application/json',
             ...(init.headers || {}) },
}).then(async (r) => ({ status: r.status, body: await r.json() }));
window.setup = async (daemon, token) => {
  window.daemon = daemon; window.token = token;
  const { PitcheyClient } = await import(`${daemon}/client/pitchey-ws.js`);
  window.client = new PitcheyClient({
    url: daemon.replace('http', 'ws') + '/api/messages/ws', token, reconnectBaseMs: 50,
  });
  await window.client.connect();
  return true;
};
window.inbox = async () => {
  const seen = [];
  let cursor = null;
  do {
    const query = cursor ? `?limit=1&before=${encodeURIComponent(cursor)}` : '?limit=1';
    const { status, body } = await api(`/api/messages/conversations${query}`);
    if (status !== 200) throw new Error(`inbox ${status}`);
    seen.push(...body.conversations);
    cursor = body.nextCursor;
  } while (cursor);
  return seen;
};
window.pageBack = async (conversationId) => {
  const pages = [];
  let before = null;
  for (;;) {
    const query = before ? `?limit=3&before=${before}` : '?limit=3';
    const { status, body } = await api(`/api/messages/${conversationId}/messages${query}`);
    if (status !== 200) throw new Error(`history ${status}`);
    pages.push(body.messages.map((m) => m.content));
    if (!body.hasMore) return pages;
    before = body.messages[0].id;
  }
};
window.socketDown = () => { window.client.close(); return true; };
window.sendOverHttp = (conversationId, content) => api('/api/messages/send', {
  method: 'POST', body: JSON.stringify({ conversationId, content, requestId: 'page-1' }),
});
window.markRead = (conversationId) => api(
  `/api/creator/conversations/${conversationId}/read`, { method: 'POST', body: '{}' });
</script>"""


@contextlib.contextmanager
def static_site(root: Path) -> Iterator[str]:
    """A plain HTTP server for ``root`` on another port (another origin)."""
    (root / "index.html").write_text(PAGE)
    port = free_port()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


async def call(page: Page, expression: str, *args: Any) -> Any:
    return await page.evaluate(expression, list(args) if len(args) > 1 else
                               (args[0] if args else None))


async def test_cross_origin_page_uses_the_http_api(tmp_path: Path) -> None:
    """Inbox (socket- and HTTP-made conversations), history paging, an HTTP send while the
    socket is down (received live once), and mark-read (the sender sees message_read)."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    with static_site(site_dir) as origin:
        daemon_dir = tmp_path / "daemon"
        daemon_dir.mkdir()
        async with running(daemon_dir, {"http.cors_origins": [origin]}) as connect:
            await scenario(connect, origin)


async def scenario(connect: Connector, origin: str) -> None:
    ann, bob, cat = new_user(), new_user(), new_user()
    b = await connect(bob, username="Bob")
    socket_made = await conversation(b, ann)  # made over the socket
    for i in range(7):
        await b.request({"type": "send_message", "conversationId": socket_made,
                         "content": f"b{i}"}, "message_sent")
    # Made over HTTP: Ann's first message to Cat, by receiverId.
    from test_http_api import call as http_call

    status, _, body = await asyncio.to_thread(
        http_call, connect.daemon.port, "POST", "/api/messages/send",
        {"receiverId": cat, "content": "hello Cat"}, token=make_token(ann, username="Ann"),
    )
    assert status == 201, body
    http_made = body["message"]["conversationId"]

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = await (await browser.new_context()).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(origin + "/index.html")
            await page.wait_for_function("typeof window.setup === 'function'")
            assert await page.evaluate(
                "([d, t]) => window.setup(d, t)",
                [connect.daemon.http, make_token(ann, username="Ann")],
            )
            inbox = await page.evaluate("() => window.inbox()")
            # Newest activity first: Ann's message to Cat came after Bob's seven.
            assert [c["id"] for c in inbox] == [http_made, socket_made]
            first = inbox[1]
            assert first["participants"][0]["id"] == bob and first["unreadCount"] == 7
            assert first["lastMessage"]["content"] == "b6"

            pages = await page.evaluate("(cid) => window.pageBack(cid)", socket_made)
            assert pages == [["b4", "b5", "b6"], ["b1", "b2", "b3"], ["b0"]]

            assert await page.evaluate("() => window.socketDown()")
            sent = await page.evaluate(
                "([cid, text]) => window.sendOverHttp(cid, text)", [socket_made, "from the page"]
            )
            assert sent["status"] == 201, sent
            got = await b.expect("new_message", content="from the page")
            assert got["senderId"] == ann and got["messageId"] == sent["body"]["message"]["id"]

            read = await page.evaluate("(cid) => window.markRead(cid)", socket_made)
            assert read == {"status": 200, "body": {"success": True, "read": 7}}
            notices = [await b.expect("message_read", readBy=ann) for _ in range(7)]
            assert sorted(n["messageId"] for n in notices) == sorted(
                {n["messageId"] for n in notices}
            )
            await b.absent("new_message")  # the HTTP send reached Bob once
            assert errors == []
        finally:
            await browser.close()
