"""The React hooks (client/react.js) under real React in Chromium, against the real daemon.

The test pages (tests/react/app.jsx) are bundled once per session with esbuild from
client/node_modules (installed by `npm ci` from client/package-lock.json) and served by a small
static server on a port of their own, so every request to the daemon is cross-origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ROOT,
    SCALE,
    Client,
    Daemon,
    conversation,
    eventually_db,
    free_port,
    make_token,
    new_user,
)
from playwright.async_api import Browser, Page, async_playwright, expect
from websockets.asyncio.client import connect

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
CLIENT = ROOT / "client"
NPM = shutil.which("npm")
WAIT_MS = 15_000 * SCALE
XSS = "<img src=x onerror=alert(1)>"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing"),
    pytest.mark.skipif(NPM is None, reason="npm is not on PATH: the React tests need Node 20+"),
]

# Counts the sockets a page opens; __blockWs points new ones at a closed port (socket down,
# HTTP up).
INIT = """
(() => {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.__blockWs = false;
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(window.__blockWs ? 'ws://127.0.0.1:9/blocked' : url, protocols);
      window.__sockets.push(this);
    }
  };
  localStorage.setItem('authToken', %s);
})();
"""


def npm_ci() -> None:
    """client/node_modules from the lockfile, unless it is already what the lockfile says."""
    assert NPM is not None
    stamp = CLIENT / "node_modules" / ".package-lock.json"
    lock = CLIENT / "package-lock.json"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=CLIENT, check=True,
                   timeout=300 * SCALE, capture_output=True)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bundled test pages, served over HTTP; yields the origin."""
    npm_ci()
    out = tmp_path_factory.mktemp("react-site")
    subprocess.run(
        [str(CLIENT / "node_modules" / ".bin" / "esbuild"), str(ROOT / "tests/react/app.jsx"),
         "--bundle", "--format=esm", "--jsx=automatic", "--log-level=warning",
         f"--outfile={out / 'app.js'}"],
        check=True, timeout=120 * SCALE, capture_output=True,
        env={**os.environ, "NODE_PATH": str(CLIENT / "node_modules")},
    )
    (out / "index.html").write_text(
        '<!doctype html><meta charset="utf-8"><title>hooks</title>'
        '<div id="root"></div><script type="module" src="/app.js"></script>'
    )

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", free_port()), functools.partial(Quiet, directory=str(out))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def make_daemon(tmp: Path, origin: str) -> Daemon:
    return Daemon(tmp, {"http.cors_origins": [origin], "presence.offline_grace_seconds": 0,
                        "api.key": API_KEY})


@pytest.fixture(scope="module")
def daemon(site: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for this module's tests (distinct users), allowing the pages' origin."""
    d = make_daemon(tmp_path_factory.mktemp("react-daemon"), site)
    d.start()
    yield d
    if d.proc is not None:
        d.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            await b.close()


class Tab:
    """One browser context for one user, with the page's errors and dialogs recorded."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("dialog", self._dialog)

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def message(self, text: str) -> Any:
        return self.page.locator("#messages li").filter(
            has=self.page.locator(".body", has_text=re.compile(f"^{re.escape(text)}$"))
        )

    async def connected(self, value: bool = True) -> None:
        await expect(self.page.locator("#conn")).to_have_attribute(
            "data-connected", "true" if value else "false", timeout=WAIT_MS
        )

    async def sockets(self) -> int:
        return int(await self.page.evaluate("window.__sockets.length"))

    async def open_sockets(self) -> int:
        return int(await self.page.evaluate(
            "window.__sockets.filter(s => s.readyState <= 1).length"))

    async def send(self, text: str) -> None:
        await self.page.locator("#text").fill(text)
        await self.page.locator("#text").press("Enter")


async def open_tab(browser: Browser, site: str, daemon: Daemon, token: str,
                   mode: str = "messages", **query: Any) -> Tab:
    context = await browser.new_context()
    await context.add_init_script(INIT % json.dumps(token))
    page = await context.new_page()
    tab = Tab(page)
    params = {"mode": mode, "ws": daemon.url, "api": daemon.http, **query}
    await page.goto(site + "/?" + "&".join(f"{k}={v}" for k, v in params.items()))
    return tab


async def pair(daemon: Daemon) -> tuple[int, str, int, str, int]:
    """Two new users (Ann, Ben) and a conversation between them."""
    a, b = new_user(), new_user()
    ta, tb = make_token(a, username=f"Ann {a}"), make_token(b, username=f"Ben {b}")
    async with connect(f"{daemon.url}?token={tb}"):
        pass  # Ben's profile (his name) is known before Ann's conversation lists him
    async with connect(f"{daemon.url}?token={ta}") as ws:
        ann = Client(ws, a)
        await ann.expect("connected")
        cid = await conversation(ann, b)
    return a, ta, b, tb, cid


async def test_two_users_chat_through_use_messaging(
    daemon: Daemon, site: str, browser: Browser
) -> None:
    """Ann then Ben open the stand-in Messages page under StrictMode: presence both ways, own
    message shown once and acknowledged, typing, read, HTML as text in the toast, one socket."""
    a, ta, b, tb, cid = await pair(daemon)
    ann = await open_tab(browser, site, daemon, ta)
    await ann.connected()
    ben = await open_tab(browser, site, daemon, tb)
    await ben.connected()

    # Presence: Ben, who came second, learns Ann is online from online_users; Ann from user_online.
    for tab, other in ((ben, a), (ann, b)):
        await expect(tab.page.locator(f'.dot[data-user="{other}"]')).to_have_class(
            re.compile(r"\bonline\b"), timeout=WAIT_MS)
        await expect(tab.page.locator("#online-count")).to_have_text("1", timeout=WAIT_MS)

    await ann.page.locator(f'[data-conversation="{cid}"]').click()
    await ben.page.locator(f'[data-conversation="{cid}"]').click()

    # The sender's own message: shown at once, then acknowledged (message_sent) with its id.
    await ann.send("Hello Ben")
    mine = ann.message("Hello Ben")
    await expect(mine).to_have_count(1)
    await expect(mine).to_have_attribute("data-pending", "0", timeout=WAIT_MS)
    await expect(mine).to_have_attribute("data-id", re.compile(r"^\d+$"))
    await expect(ben.message("Hello Ben")).to_have_count(1, timeout=WAIT_MS)

    # Ben has the conversation open, so the page marks it read; Ann sees the receipt.
    await expect(mine).to_have_attribute("data-read", "1", timeout=WAIT_MS)
    # Ann's toast "Ben read your message" (her tab is visible): text only.
    receipt = ann.page.locator(".pitchey-ws-toast-title", has_text=f"Ben {b} read your message")
    await expect(receipt).to_have_count(1, timeout=WAIT_MS)

    # Typing.
    await ben.page.locator("#text").press_sequentially("Typing", delay=20)
    await expect(ann.page.locator("#typing")).to_have_text(f"Ben {b}", timeout=WAIT_MS)
    await ben.page.locator("#text").press("Enter")
    await expect(ann.message("Typing")).to_have_count(1, timeout=WAIT_MS)
    await expect(ann.page.locator("#typing")).to_have_text("", timeout=WAIT_MS)

    # HTML in a message: text in the message list and in Ben's toast; no element, no script.
    await ann.send(XSS)
    await expect(ben.message(XSS)).to_have_count(1, timeout=WAIT_MS)
    toast = ben.page.locator(".pitchey-ws-toast-body", has_text=XSS)
    await expect(toast).to_have_count(1, timeout=WAIT_MS)
    assert await toast.text_content() == XSS
    for tab in (ann, ben):
        assert await tab.page.locator("img").count() == 0
        assert tab.dialogs == []
        assert tab.errors == [], tab.errors
        # StrictMode mounted every hook twice; the tab still opened exactly one socket.
        assert await tab.sockets() == 1


async def test_one_socket_for_many_hooks_closed_after_the_last(
    daemon: Daemon, site: str, browser: Browser
) -> None:
    """useWebSocket twice, useMessaging three times and useNotifications in one StrictMode tab:
    one socket (the daemon counts one connection for the user); unmounting all closes it."""
    user = new_user()
    tab = await open_tab(browser, site, daemon, make_token(user, username="Solo"), mode="multi",
                         release=100)
    await tab.connected()
    await expect(tab.page.locator('.status[data-name="a"]')).to_have_text("true")
    await expect(tab.page.locator('.status[data-name="b"]')).to_have_text("true")
    assert await tab.sockets() == 1
    rows = daemon.get("/metrics")[2].decode()
    assert re.search(r"^pitchey_connections \d+", rows, re.M), rows
    await tab.page.evaluate("window.__unmount()")
    await expect(tab.page.locator("#unmounted")).to_have_count(1)
    await tab.page.wait_for_function("window.__sockets[0].readyState === 3", timeout=WAIT_MS)
    # Mounted again: a new connection, and only one.
    await tab.page.evaluate("window.__mount()")
    await tab.connected()
    assert await tab.sockets() == 2
    assert await tab.open_sockets() == 1
    assert tab.errors == [], tab.errors


async def test_offline_replay_and_history_in_current_messages(
    daemon: Daemon, site: str, browser: Browser
) -> None:
    """Messages sent to Ben while he was away arrive replayed (queued_message) before he picks
    the conversation; after join and the HTTP history they are still each shown once, in order."""
    a, ta, b, tb, cid = await pair(daemon)
    async with connect(f"{daemon.url}?token={ta}") as ws:
        ann = Client(ws, a)
        await ann.expect("connected")
        for i in range(3):
            await ann.request({"type": "send_message", "conversationId": cid,
                               "content": f"away {i}", "requestId": f"away-{a}-{i}"},
                              "message_sent")
    ben = await open_tab(browser, site, daemon, tb)
    await ben.connected()
    # Nothing selected yet: currentMessages holds what arrived (the replay).
    for i in range(3):
        await expect(ben.message(f"away {i}")).to_have_count(1, timeout=WAIT_MS)
    await expect(ben.page.locator(f'[data-conversation="{cid}"] .badge')).to_have_text("3")
    await ben.page.locator(f'[data-conversation="{cid}"]').click()
    await expect(ben.page.locator(f'[data-conversation="{cid}"] .badge')).to_have_text("")
    bodies = ben.page.locator("#messages li .body")
    await expect(bodies).to_have_text(["away 0", "away 1", "away 2"], timeout=WAIT_MS)
    # The page marked the conversation read over HTTP.
    await eventually_db(daemon, "SELECT COUNT(*) FROM message_read_receipts"
                        " WHERE user_id = ? AND read_at IS NULL", (b,), [(0,)])
    assert ben.errors == []


async def test_restart_mid_conversation_send_while_down_delivered_once(
    site: str, browser: Browser, tmp_path: Path
) -> None:
    """The daemon restarts mid-conversation; Ann sends while it is down; after it is back both
    tabs show the message exactly once, acknowledged, with one new socket each."""
    d = make_daemon(tmp_path, site)
    d.start()
    try:
        _a, ta, _b, tb, cid = await pair(d)
        ann = await open_tab(browser, site, d, ta, fallback=60000)
        ben = await open_tab(browser, site, d, tb)
        for tab in (ann, ben):
            await tab.connected()
            await tab.page.locator(f'[data-conversation="{cid}"]').click()
        await ann.send("before")
        await expect(ben.message("before")).to_have_count(1, timeout=WAIT_MS)

        await asyncio.to_thread(d.stop)
        await ann.connected(False)
        await ben.connected(False)
        # The page sends through the hook only when connected: use the hook as a component would.
        await ann.page.evaluate(
            f"() => {{ window.__messaging.sendChatMessage({cid}, 'while down')"
            ".catch(() => {}); }")
        await expect(ann.message("while down")).to_have_attribute("data-pending", "1")
        await asyncio.to_thread(d.start)
        for tab in (ann, ben):
            await tab.connected()
            await expect(tab.message("while down")).to_have_count(1, timeout=WAIT_MS)
        await expect(ann.message("while down")).to_have_attribute(
            "data-pending", "0", timeout=WAIT_MS)
        await ben.send("after")
        await expect(ann.message("after")).to_have_count(1, timeout=WAIT_MS)
        for tab in (ann, ben):
            assert await tab.message("while down").count() == 1
            assert await tab.message("before").count() == 1
            assert await tab.open_sockets() == 1
            assert tab.errors == [], tab.errors
        stored = d.query("SELECT COUNT(*) FROM messages WHERE content = 'while down'")
        assert stored == [(1,)]
    finally:
        if d.proc is not None:
            d.stop()


async def test_send_over_http_when_the_socket_stays_down(
    daemon: Daemon, site: str, browser: Browser
) -> None:
    """Ann's socket cannot reach the daemon (HTTP can): a hook send goes over POST
    /api/messages/send after the fallback delay, and the page's own disconnected path works."""
    _a, ta, _b, tb, cid = await pair(daemon)
    ben = await open_tab(browser, site, daemon, tb)
    await ben.connected()
    await ben.page.locator(f'[data-conversation="{cid}"]').click()
    ann = await open_tab(browser, site, daemon, ta, fallback=300)
    await ann.page.evaluate("window.__blockWs = true")
    # The first socket was made before the flag: close it for good by blocking reconnects.
    await ann.page.evaluate("window.__sockets.forEach(s => s.close())")
    await ann.connected(False)
    await expect(ann.page.locator(f'[data-conversation="{cid}"]')).to_have_count(1,
                                                                              timeout=WAIT_MS)
    await ann.page.locator(f'[data-conversation="{cid}"]').click()
    await ann.page.evaluate(
        f"() => {{ window.__messaging.sendChatMessage({cid}, 'by the hook over http')"
        ".catch(() => {}); }")
    await expect(ben.message("by the hook over http")).to_have_count(1, timeout=WAIT_MS)
    await expect(ann.message("by the hook over http")).to_have_attribute(
        "data-pending", "0", timeout=WAIT_MS)
    await ann.send("by the page over http")
    await expect(ben.message("by the page over http")).to_have_count(1, timeout=WAIT_MS)
    await expect(ann.message("by the page over http")).to_have_count(1)
    # The socket comes back: the queued hook send is answered with the same id, not stored again.
    await ann.page.evaluate("window.__blockWs = false")
    await ann.connected()
    await ben.send("back")
    await expect(ann.message("back")).to_have_count(1, timeout=WAIT_MS)
    assert await ann.message("by the hook over http").count() == 1
    assert daemon.query("SELECT COUNT(*) FROM messages WHERE content = 'by the hook over http'") \
        == [(1,)]


async def test_expired_token_refreshed_then_stops_without_a_fresh_one(
    daemon: Daemon, site: str, browser: Browser
) -> None:
    """4001 with a fresh token from getToken: reconnected. 4001 again with only the expired
    token left: the hooks stop (no endless retry) and say why."""
    user = new_user()
    short = make_token(user, username="Short", exp=3)
    tab = await open_tab(browser, site, daemon, short)
    await tab.page.evaluate(
        f"window.__nextTokens = [{json.dumps(make_token(user, username='Short', exp=7))}]")
    await tab.connected()
    await tab.page.wait_for_function("window.__sockets.length === 2", timeout=WAIT_MS)
    await tab.connected()
    # The second token expires too; getToken now gives the expired stored one: stop.
    await expect(tab.page.locator("#conn")).to_have_attribute("data-state", "closed",
                                                              timeout=WAIT_MS)
    count = await tab.sockets()
    assert count == 2
    error = await tab.page.evaluate("window.__messaging.error")
    assert error["code"] == "token_expired" and error["fatal"] is True
    assert tab.errors == []


async def test_refused_token_is_not_retried_forever(
    daemon: Daemon, site: str, browser: Browser
) -> None:
    """A token the daemon refuses (bad signature, not expired) gets a 401 from the HTTP probe
    after the first refused handshake: the hooks stop instead of retrying."""
    bad = make_token(new_user(), secret="not-the-secret-" + "x" * 40)
    tab = await open_tab(browser, site, daemon, bad)
    await expect(tab.page.locator("#conn")).to_have_attribute("data-state", "closed",
                                                              timeout=WAIT_MS)
    assert await tab.page.evaluate("window.__messaging.error.code") == "unauthorized"
    assert await tab.sockets() == 1


async def test_no_token_no_connection(daemon: Daemon, site: str, browser: Browser) -> None:
    """Without localStorage.authToken the hooks open no socket (the Pitchey rule)."""
    context = await browser.new_context()
    await context.add_init_script(INIT % "null")
    await context.add_init_script("localStorage.removeItem('authToken')")
    page = await context.new_page()
    await page.goto(f"{site}/?mode=multi&ws={daemon.url}&api={daemon.http}")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "idle")
    assert await page.evaluate("window.__sockets.length") == 0


async def test_toasts_can_be_switched_off(daemon: Daemon, site: str, browser: Browser) -> None:
    """notifications: false: no toast for a new message."""
    a, ta, _b, tb, cid = await pair(daemon)
    ben = await open_tab(browser, site, daemon, tb, notify=0)
    await ben.connected()
    async with connect(f"{daemon.url}?token={ta}") as ws:
        ann = Client(ws, a)
        await ann.expect("connected")
        await ann.request({"type": "send_message", "conversationId": cid, "content": "quiet",
                           "requestId": f"q-{a}"}, "message_sent")
    await expect(ben.message("quiet")).to_have_count(1, timeout=WAIT_MS)
    assert await ben.page.locator(".pitchey-ws-toast").count() == 0


API_KEY = "react-test-api-key-" + "0" * 32


def backend(daemon: Daemon, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A call of the backend's API with its key (PROTOCOL.md section 11)."""
    request = urllib.request.Request(
        daemon.http + path, data=json.dumps(body).encode(), method=method,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5 * SCALE) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


def publish(daemon: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    return backend(daemon, "POST", "/api/publish", body)


async def test_pitch_page_with_two_watchers(daemon: Daemon, site: str, browser: Browser) -> None:
    """Two users watch pitch 1 through usePitchUpdates: counts start from get_pitch_activity,
    a view, a like, a comment and typing reach the other watcher."""
    a, b = new_user(), new_user()
    await asyncio.to_thread(backend, daemon, "PUT", "/api/pitches/1", {
        "ownerId": new_user(), "title": "The Last Lighthouse", "visibility": "public"})
    one = await open_tab(browser, site, daemon, make_token(a, username="Ada"), mode="pitch",
                         pitch=1)
    await one.page.wait_for_function(
        "window.__pitch && (window.__pitch.loaded || window.__pitch.error)", timeout=WAIT_MS)
    assert await one.page.evaluate("window.__pitch.error") is None
    views = int(await one.page.locator("#views").inner_text())
    two = await open_tab(browser, site, daemon, make_token(b, username="Bo"), mode="pitch",
                         pitch=1)
    await two.page.wait_for_function("window.__pitch.loaded", timeout=WAIT_MS)
    await expect(one.page.locator("#views")).to_have_text(str(views + 1), timeout=WAIT_MS)
    await two.page.evaluate("window.__pitch.trackLike()")
    await expect(one.page.locator("#likes")).not_to_have_text("0", timeout=WAIT_MS)
    await two.page.evaluate("window.__pitch.setTyping(true)")
    await expect(one.page.locator("#pitch-typing")).to_have_text("Bo", timeout=WAIT_MS)
    await two.page.evaluate("window.__pitch.sendComment('Great pitch')")
    await expect(one.page.locator(".comment", has_text="Great pitch")).to_have_count(
        1, timeout=WAIT_MS)


async def test_nda_signed_shown_by_use_notifications(
    site: str, browser: Browser, tmp_path: Path
) -> None:
    """A durable nda_signed published for the user appears in useNotifications with its pitchId."""
    daemon = Daemon(tmp_path, {"http.cors_origins": [site], "api.key": API_KEY})
    daemon.start()
    try:
        await nda_scenario(daemon, site, browser)
    finally:
        if daemon.proc is not None:
            daemon.stop()


async def nda_scenario(daemon: Daemon, site: str, browser: Browser) -> None:
    user = new_user()
    tab = await open_tab(browser, site, daemon, make_token(user, username="Owner"), mode="notify")
    await tab.page.wait_for_function("window.__sockets.length === 1")
    await asyncio.to_thread(publish, daemon, {
        "users": [user], "event": {"type": "nda_signed", "pitchId": 3, "signedBy": "Victor"}})
    item = tab.page.locator('#notifications li[data-type="nda_signed"]')
    await expect(item).to_have_count(1, timeout=WAIT_MS)
    await expect(item).to_have_attribute("data-pitch", "3")


def test_package_version_is_the_daemon_version() -> None:
    """client/package.json carries pyproject.toml's version."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package = json.loads((CLIENT / "package.json").read_text())
    assert package["version"] == pyproject["project"]["version"]
    assert set(package["exports"]) >= {".", "./react"}
    assert list(package.get("dependencies", {})) == []
    assert "react" in package["peerDependencies"]


def test_npm_pack_installs_and_bundles(tmp_path: Path, site: str) -> None:
    """`npm pack` gives a tarball a fresh project installs (with react) and esbuild bundles,
    importing both `pitchey-ws` and `pitchey-ws/react`; Node imports the client too."""
    assert NPM is not None
    packed = subprocess.run(
        [NPM, "pack", "--json", "--pack-destination", str(tmp_path)], cwd=CLIENT, check=True,
        capture_output=True, text=True, timeout=120 * SCALE,
    )
    info = json.loads(packed.stdout)[0]
    names = {f["path"] for f in info["files"]}
    assert names == {"package.json", "pitchey-ws.js", "pitchey-ws.d.ts", "react.js",
                     "react.d.ts"}, names
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "app", "private": True,
                                                  "type": "module"}))
    react = json.loads((CLIENT / "package.json").read_text())["devDependencies"]["react"]
    subprocess.run(
        [NPM, "install", "--no-audit", "--no-fund", str(tmp_path / info["filename"]),
         f"react@{react}"],
        cwd=app, check=True, capture_output=True, timeout=300 * SCALE,
    )
    (app / "main.js").write_text(
        "import { PitcheyClient } from 'pitchey-ws';\n"
        "import { useMessaging, useWebSocket, usePitchUpdates, useNotifications } "
        "from 'pitchey-ws/react';\n"
        "console.log(typeof PitcheyClient, typeof useMessaging, typeof useWebSocket,"
        " typeof usePitchUpdates, typeof useNotifications);\n"
    )
    subprocess.run(
        [str(CLIENT / "node_modules" / ".bin" / "esbuild"), "main.js", "--bundle",
         "--format=esm", "--outfile=out.js", "--log-level=warning"],
        cwd=app, check=True, capture_output=True, timeout=120 * SCALE,
    )
    with contextlib.suppress(FileNotFoundError):
        run = subprocess.run(["node", "out.js"], cwd=app, capture_output=True, text=True,
                             timeout=60 * SCALE, check=True)
        assert run.stdout.split() == ["function"] * 5
    assert (app / "node_modules" / "pitchey-ws" / "react.d.ts").exists()
