"""The demo page in a real browser (Debian's chromium, driven by Playwright), two users, one daemon.

Set PITCHEY_SCREENSHOT=1 to write the screenshot to docs/demo.png (else it goes to a temp dir).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import ROOT, SCALE, Client, Daemon, make_token
from playwright.async_api import Browser, Dialog, Locator, Page, async_playwright, expect
from websockets.asyncio.client import connect

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 20_000 * SCALE  # generous: a loaded 2-core machine, and reconnect backoff
XSS = "<img src=x onerror=alert(1)>"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: `apt-get install -y chromium` (CI installs it)",
)


class Tab:
    """One browser context (its own storage) with one page, recording any JS dialog."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def message(self, text: str) -> Locator:
        """The message bubbles whose body is exactly ``text``."""
        return self.page.locator("#messages li").filter(
            has=self.page.locator(".body", has_text=re.compile(f"^{re.escape(text)}$"))
        )

    async def online(self) -> None:
        await expect(self.page.locator("#conn")).to_have_attribute(
            "data-state", "online", timeout=WAIT_MS
        )

    async def send(self, text: str) -> None:
        await self.page.locator("#text").fill(text)
        await self.page.locator("#text").press("Enter")


async def open_tab(browser: Browser, url: str) -> Tab:
    context = await browser.new_context(viewport={"width": 1100, "height": 680})
    page = await context.new_page()
    tab = Tab(page)
    await page.goto(url)
    return tab


async def test_two_users_chat_in_the_demo_page(tmp_path: Path) -> None:
    """Users 1 and 2 chat in conversation 1: history, unread, presence, typing, ticks,
    HTML shown as text, and a daemon restart with messages sent meanwhile."""
    daemon = Daemon(tmp_path)
    daemon.start("--demo")
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            try:
                await scenario(browser, daemon, tmp_path)
            finally:
                await browser.close()
    finally:
        if daemon.proc is not None:
            daemon.stop()


async def scenario(browser: Browser, daemon: Daemon, tmp_path: Path) -> None:
    # Maya picks herself on the start page; Victor comes in by URL, as a second tab would.
    maya = await open_tab(browser, daemon.http + "/")
    await maya.page.get_by_role("button", name=re.compile("Maya Chen")).click()
    victor = await open_tab(browser, daemon.http + "/?user=2")
    await maya.online()
    await victor.online()

    # History and unread counts: conversation 1 is open for both; Maya has the group unread.
    await expect(maya.page.locator("#chat-title")).to_have_text("Victor Hale (investor)")
    await expect(maya.message("Loved the pitch deck. What budget range are you targeting?"))\
        .to_have_count(1)
    await expect(maya.page.locator('[data-conversation="3"] .badge')).to_have_text("1")
    await expect(maya.page.locator('[data-conversation="1"] .badge')).to_have_text("")

    # Victor opened the conversation, so Maya's seeded message shows read (✓✓).
    hello = maya.message(
        "Hi Victor! Thanks for looking at The Last Lighthouse. Happy to answer questions."
    )
    await expect(hello.locator(".ticks")).to_have_text("✓✓", timeout=WAIT_MS)

    # Presence: each sees the other online.
    online_dot = re.compile(r"\bonline\b")
    await expect(maya.page.locator('[data-conversation="1"] .dot[data-user="2"]'))\
        .to_have_class(online_dot, timeout=WAIT_MS)
    await expect(victor.page.locator('[data-conversation="1"] .dot[data-user="1"]'))\
        .to_have_class(online_dot, timeout=WAIT_MS)
    await expect(maya.page.locator('[data-conversation="2"] .dot[data-user="3"]'))\
        .not_to_have_class(online_dot)

    # Typing, then a message that Maya (conversation open) reads at once: ✓✓ for Victor.
    await victor.page.locator("#text").press_sequentially("Sounds good", delay=20)
    await expect(maya.page.locator("#typing")).to_have_text(
        "Victor Hale (investor) is typing…", timeout=WAIT_MS
    )
    await victor.page.locator("#text").press_sequentially(". Budget is 4.2M.")
    await victor.page.locator("#text").press("Enter")
    await expect(maya.message("Sounds good. Budget is 4.2M.")).to_have_count(1, timeout=WAIT_MS)
    await expect(maya.page.locator("#typing")).to_have_text("")
    await expect(victor.message("Sounds good. Budget is 4.2M.").locator(".ticks.read"))\
        .to_have_text("✓✓", timeout=WAIT_MS)

    # A message nobody has read yet shows one tick: Maya to the group (Northlight is away).
    await maya.page.locator('[data-conversation="3"]').click()
    await maya.send("Sharing the budget sheet with you both today.")
    await expect(maya.message("Sharing the budget sheet with you both today.").locator(".ticks"))\
        .to_have_text("✓", timeout=WAIT_MS)
    # Victor has conversation 1 open: the seeded welcome and this one are unread for him.
    await expect(victor.page.locator('[data-conversation="3"] .badge')).to_have_text("2")
    await maya.page.locator('[data-conversation="1"]').click()

    await maya.send("Great. Can we close by Friday?")
    await expect(victor.message("Great. Can we close by Friday?")).to_have_count(1)
    await maya.page.locator("#text").press_sequentially("Let me check", delay=20)
    await expect(victor.page.locator("#typing")).to_have_text(
        "Maya Chen (creator) is typing…", timeout=WAIT_MS
    )
    shot = ROOT / "docs" / "demo.png" if os.environ.get("PITCHEY_SCREENSHOT") == "1" \
        else tmp_path / "demo.png"
    await victor.page.screenshot(path=str(shot))
    await maya.page.locator("#text").fill("")

    # HTML in a message is shown as text: no element made from it, no script run.
    await maya.send(XSS)
    bubble = victor.message(XSS)
    await expect(bubble).to_have_count(1, timeout=WAIT_MS)
    assert await bubble.locator(".body").text_content() == XSS
    for tab in (maya, victor):
        await expect(tab.message(XSS)).to_have_count(1)
        assert await tab.page.locator("img").count() == 0
        assert tab.dialogs == []

    # Restart the daemon mid-conversation. Victor sends while it is down (queued in the
    # client); another device of Victor's sends as soon as it is back, before the tabs return.
    daemon.stop()
    for tab in (maya, victor):
        await expect(tab.page.locator("#conn")).to_have_attribute(
            "data-state", re.compile("reconnecting|connecting"), timeout=WAIT_MS
        )
    await victor.send("Sent while the server was down.")
    await expect(victor.message("Sent while the server was down.").locator(".ticks"))\
        .to_have_text("🕓")
    daemon.start("--demo")
    token = make_token(2, username="Victor Hale (investor)")
    async with connect(f"{daemon.url}?token={token}") as ws:
        phone = Client(ws, 2)
        await phone.expect("connected")
        await phone.request(
            {"type": "send_message", "conversationId": 1, "content": "Sent from my phone.",
             "requestId": "phone-1"},
            "message_sent",
        )
        await maya.online()
        await victor.online()
        for text in ("Sent while the server was down.", "Sent from my phone."):
            await expect(maya.message(text)).to_have_count(1, timeout=WAIT_MS)
            await expect(victor.message(text)).to_have_count(1, timeout=WAIT_MS)
        await expect(victor.message("Sent while the server was down.").locator(".ticks"))\
            .to_have_text(re.compile("^✓✓?$"), timeout=WAIT_MS)
        # Anything repeated would arrive before a message sent after both tabs are back.
        await phone.request(
            {"type": "send_message", "conversationId": 1, "content": "Last one.",
             "requestId": "phone-2"},
            "message_sent",
        )
        await expect(maya.message("Last one.")).to_have_count(1, timeout=WAIT_MS)
        await expect(victor.message("Last one.")).to_have_count(1, timeout=WAIT_MS)
        for tab in (maya, victor):
            for text in ("Sent while the server was down.", "Sent from my phone.",
                         "Sounds good. Budget is 4.2M."):
                assert await tab.message(text).count() == 1, text
    for tab in (maya, victor):
        assert tab.errors == [], tab.errors
        assert tab.dialogs == []
