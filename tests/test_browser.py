"""The demo page in a real browser (Debian's chromium, driven by Playwright), two users, one daemon.

Set PITCHEY_SCREENSHOT=1 to write the screenshot to docs/demo.png (else it goes to a temp dir;
the phone-width screenshot always goes to the temp dir).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, SCALE, Client, Daemon
from playwright.async_api import Browser, Dialog, Locator, Page, async_playwright, expect
from websockets.asyncio.client import connect

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WAIT_MS = 20_000 * SCALE  # generous: a loaded 2-core machine, and reconnect backoff
XSS = "<img src=x onerror=alert(1)>"
VICTOR = "Victor Hale (investor)"
ONLINE_DOT = re.compile(r"\bonline\b")
# Every text the page shows in #notice and #conn, recorded as it changes, so a raw network
# error that flashed by is caught too.
RECORD_STATUS = """
window.__status = [];
new MutationObserver(() => {
  for (const id of ['notice', 'conn']) {
    const text = document.getElementById(id)?.textContent;
    if (text && window.__status.at(-1) !== text) window.__status.push(text);
  }
}).observe(document, { subtree: true, childList: true, characterData: true });
"""
# Emoji, dingbats, arrows, geometric shapes and the like, in text or in ::before/::after.
ICON_CHARS = r"[\u2190-\u21ff\u2300-\u23ff\u2460-\u27bf\u2900-\u2bff\u{1f000}-\u{1faff}\ufe0f]"
FIND_ICONS = """(pattern) => {
  const re = new RegExp(pattern, 'u');
  const found = [];
  for (const node of document.querySelectorAll('*')) {
    for (const pseudo of ['::before', '::after']) {
      const content = getComputedStyle(node, pseudo).content;
      if (content && content !== 'none' && re.test(content)) {
        found.push(`${node.tagName}${pseudo} ${content}`);
      }
    }
  }
  if (re.test(document.body.innerText)) found.push(document.body.innerText.match(re)[0]);
  if (re.test(document.title)) found.push(document.title);
  return found;
}"""

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: `apt-get install -y chromium` (CI installs it)",
)


class Tab:
    """One browser context (its own storage) with one page, recording any JS dialog, page
    error, HTTP error answer and failed token request."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.bad_answers: list[str] = []
        self.token_failures = 0
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("response", lambda r: self.bad_answers.append(f"{r.status} {r.url}")
                if r.status >= 400 else None)
        page.on("requestfailed", self._failed)

    def _failed(self, request: object) -> None:
        if "/demo/token" in getattr(request, "url", ""):
            self.token_failures += 1

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def message(self, text: str) -> Locator:
        """The message bubbles whose body is exactly ``text``."""
        return self.page.locator("#messages li").filter(
            has=self.page.locator(".body", has_text=re.compile(f"^{re.escape(text)}$"))
        )

    def conversation(self, conversation_id: int) -> Locator:
        return self.page.locator(f'[data-conversation="{conversation_id}"]')

    async def online(self) -> None:
        await expect(self.page.locator("#conn")).to_have_attribute(
            "data-state", "online", timeout=WAIT_MS
        )

    async def send(self, text: str) -> None:
        await self.page.locator("#text").fill(text)
        await self.page.locator("#text").press("Enter")

    async def status_texts(self) -> list[str]:
        texts: list[str] = await self.page.evaluate("window.__status")
        return texts

    async def no_icon_glyphs(self) -> None:
        found = await self.page.evaluate(FIND_ICONS, ICON_CHARS)
        assert found == [], found


async def open_tab(browser: Browser, url: str, width: int = 1100, height: int = 680) -> Tab:
    context = await browser.new_context(viewport={"width": width, "height": height})
    await context.add_init_script(RECORD_STATUS)
    page = await context.new_page()
    tab = Tab(page)
    await page.goto(url)
    return tab


async def test_two_users_chat_in_the_demo_page(tmp_path: Path) -> None:
    """Users 1 and 2 chat in conversation 1: history, unread, presence, typing, ticks,
    HTML shown as text, and a daemon restart with messages sent meanwhile; the inbox from the
    server, the pitch panel, notifications, the Sign NDA button, and the page at phone width."""
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


def demo_token(daemon: Daemon, user_id: int) -> str:
    with urllib.request.urlopen(f"{daemon.http}/demo/token?userId={user_id}", timeout=5) as r:
        token: str = json.load(r)["token"]
    return token


async def scenario(browser: Browser, daemon: Daemon, tmp_path: Path) -> None:
    # Maya picks herself on the start page (only the picker shows until then); Victor comes in
    # by URL, as a second tab would.
    maya = await open_tab(browser, daemon.http + "/")
    await expect(maya.page.get_by_role("button", name=re.compile("Maya Chen"))).to_be_visible()
    for hidden in ("#app", "#chat", "#composer", "#conn", "#bell", "#tabs"):
        await expect(maya.page.locator(hidden)).to_be_hidden()
    assert (await maya.page.locator('link[rel="icon"]').get_attribute("href") or "")\
        .startswith("data:image/svg+xml,")
    await maya.page.get_by_role("button", name=re.compile("Maya Chen")).click()
    await expect(maya.page.locator("#picker")).to_be_hidden()
    victor = await open_tab(browser, daemon.http + "/?user=2")
    await maya.online()
    await victor.online()

    # The inbox comes from the server (get_conversations): Maya has all three seeded ones.
    for conversation_id in (1, 2, 3):
        await expect(maya.conversation(conversation_id)).to_have_count(1, timeout=WAIT_MS)
    await expect(victor.conversation(2)).to_have_count(0)
    await expect(maya.page.locator("#chat-title")).to_have_text("Choose a conversation")
    # History and unread counts before anything is opened: Maya has conversations 1 and 3
    # unread, then opens 1.
    await expect(maya.conversation(3).locator(".badge")).to_have_text("1", timeout=WAIT_MS)
    await expect(maya.conversation(1).locator(".badge")).to_have_text("1")
    for tab in (maya, victor):
        await tab.conversation(1).click()
    await expect(maya.page.locator("#chat-title")).to_have_text(VICTOR)
    await expect(maya.message("Loved the pitch deck. What budget range are you targeting?"))\
        .to_have_count(1)
    await expect(maya.conversation(3).locator(".badge")).to_have_text("1")
    await expect(maya.conversation(1).locator(".badge")).to_have_text("")

    # Victor opened the conversation, so Maya's seeded message shows read (two ticks).
    hello = maya.message(
        "Hi Victor! Thanks for looking at The Last Lighthouse. Happy to answer questions."
    )
    await expect(hello.locator(".ticks")).to_have_attribute("data-status", "read",
                                                            timeout=WAIT_MS)

    # Presence: each sees the other online.
    await expect(maya.page.locator('[data-conversation="1"] .dot[data-user="2"]'))\
        .to_have_class(ONLINE_DOT, timeout=WAIT_MS)
    await expect(victor.page.locator('[data-conversation="1"] .dot[data-user="1"]'))\
        .to_have_class(ONLINE_DOT, timeout=WAIT_MS)
    await expect(maya.page.locator('[data-conversation="2"] .dot[data-user="3"]'))\
        .not_to_have_class(ONLINE_DOT)

    # Typing, then a message that Maya (conversation open) reads at once: read for Victor.
    await victor.page.locator("#text").press_sequentially("Sounds good", delay=20)
    await expect(maya.page.locator("#typing")).to_have_text(
        f"{VICTOR} is typing…", timeout=WAIT_MS
    )
    await victor.page.locator("#text").press_sequentially(". Budget is 4.2M.")
    await victor.page.locator("#text").press("Enter")
    await expect(maya.message("Sounds good. Budget is 4.2M.")).to_have_count(1, timeout=WAIT_MS)
    await expect(maya.page.locator("#typing")).to_have_text("")
    await expect(victor.message("Sounds good. Budget is 4.2M.").locator(".ticks"))\
        .to_have_attribute("data-status", "read", timeout=WAIT_MS)

    # A message nobody has read yet shows one tick: Maya to the group (Northlight is away).
    await maya.conversation(3).click()
    await maya.send("Sharing the budget sheet with you both today.")
    await expect(maya.message("Sharing the budget sheet with you both today.").locator(".ticks"))\
        .to_have_attribute("data-status", "sent", timeout=WAIT_MS)
    # Victor has conversation 1 open: the seeded welcome and this one are unread for him.
    await expect(victor.conversation(3).locator(".badge")).to_have_text("2")
    await maya.conversation(1).click()

    await pitch_panel(maya, victor)

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

    # A conversation Victor creates elsewhere (a raw socket) shows up in Maya's list live,
    # and after a reload (from get_conversations), empty: "No messages yet".
    async with connect(f"{daemon.url}?token={demo_token(daemon, 2)}") as ws:
        other = Client(ws, 2)
        await other.expect("connected")
        created = await other.request(
            {"type": "create_conversation", "participantIds": [1, 3], "title": "Sequel rights",
             "requestId": "new-conv-1"},
            "conversation_created",
        )
    new_id = created["conversationId"]
    await expect(maya.conversation(new_id)).to_contain_text("Sequel rights", timeout=WAIT_MS)
    await maya.page.reload()
    await maya.online()
    await expect(maya.conversation(new_id)).to_contain_text("Sequel rights", timeout=WAIT_MS)
    await maya.conversation(new_id).click()
    await expect(maya.page.locator("#messages")).to_have_text("No messages yet — say hello")
    await maya.conversation(1).click()
    await expect(maya.message("Great. Can we close by Friday?")).to_have_count(1)

    # Restart the daemon mid-conversation. Victor sends while it is down (queued in the
    # client); another device of Victor's sends as soon as it is back, before the tabs return.
    # Meanwhile the page says it is reconnecting, never a raw fetch error.
    daemon.stop()
    for tab in (maya, victor):
        await expect(tab.page.locator("#conn")).to_have_attribute(
            "data-state", re.compile("reconnecting|connecting"), timeout=WAIT_MS
        )
    await victor.send("Sent while the server was down.")
    await expect(victor.message("Sent while the server was down.").locator(".ticks"))\
        .to_have_attribute("data-status", "sending")
    for tab in (maya, victor):
        async with asyncio.timeout(WAIT_MS / 1000):
            while tab.token_failures == 0:  # the page's token fetch failed: the outage is seen
                await tab.page.wait_for_event("requestfailed")
        await expect(tab.page.locator("#notice")).to_have_text(
            "Connection lost — reconnecting…")
        await expect(tab.page.locator("#conn")).to_contain_text(
            re.compile("Reconnecting…|Connecting…"))
    daemon.start("--demo")
    async with connect(f"{daemon.url}?token={demo_token(daemon, 2)}") as ws:
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
            .to_have_attribute("data-status", re.compile("^(sent|read)$"), timeout=WAIT_MS)
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
        await expect(tab.page.locator("#notice")).to_have_text("")
        texts = await tab.status_texts()
        assert any("reconnecting…" in t.lower() for t in texts), texts
        assert not [t for t in texts if re.search(r"fetch|network|error", t, re.I)], texts

    phone_tab = await phone_width(browser, daemon, tmp_path)
    for tab in (maya, victor, phone_tab):
        await tab.no_icon_glyphs()
        assert tab.errors == [], tab.errors
        assert tab.dialogs == []
        assert tab.bad_answers == [], tab.bad_answers  # no 404 for /favicon.ico, or anything


async def pitch_panel(maya: Tab, victor: Tab) -> None:
    """Victor views, likes and comments on pitch 1; Maya (the owner) sees the counts and the
    comment live and gets the like and the comment as notifications; Victor signs the NDA
    and Maya gets nda_signed; marking read clears the badge in every tab of Maya's."""
    await maya.page.locator('[data-pitch="1"]').click()
    await expect(maya.page.locator("#pitch-title")).to_have_text("The Last Lighthouse")
    await expect(maya.page.locator("#pitch-likes")).to_have_text("0 likes")
    await expect(maya.page.locator("#no-comments")).to_be_visible()
    views = maya.page.locator("#pitch-views")
    await expect(views).to_have_text(re.compile(r"^\d+ views?$"))
    await expect(maya.page.locator("#notif-badge")).to_have_text("")
    await expect(maya.page.locator("#sign-nda")).to_be_hidden()  # only the investor signs

    await victor.page.locator('[data-pitch="1"]').click()
    await expect(victor.page.locator("#pitch-title")).to_have_text("The Last Lighthouse")
    await expect(victor.page.locator("#pitch-views")).to_have_text("2 views", timeout=WAIT_MS)
    await expect(views).to_have_text("2 views", timeout=WAIT_MS)

    await victor.page.locator("#like").click()
    for tab in (victor, maya):
        await expect(tab.page.locator("#pitch-likes")).to_have_text("1 like", timeout=WAIT_MS)
    await expect(victor.page.locator("#like")).to_have_attribute("aria-pressed", "true")
    await expect(victor.page.locator("#like")).to_have_text("Unlike")
    await expect(maya.page.locator("#like")).to_have_text("Like")
    await expect(maya.page.locator("#notif-badge")).to_have_text("1", timeout=WAIT_MS)

    comment = "Could the lighthouse keeper be older? <b>Love it</b>"
    await victor.page.locator("#comment-text").press_sequentially("Could the", delay=20)
    await expect(maya.page.locator("#pitch-typing")).to_have_text(
        f"{VICTOR} is typing a comment…", timeout=WAIT_MS
    )
    await victor.page.locator("#comment-text").press_sequentially(comment[len("Could the"):])
    await victor.page.locator("#comment-text").press("Enter")
    for tab in (victor, maya):
        item = tab.page.locator("#comments li").filter(has_text=VICTOR)
        await expect(item.locator(".body")).to_have_text(comment, timeout=WAIT_MS)
        assert await tab.page.locator("#comments b").count() == 0
    await expect(maya.page.locator("#pitch-typing")).to_have_text("")
    await expect(maya.page.locator("#notif-badge")).to_have_text("2", timeout=WAIT_MS)

    # The investor signs the NDA of the private pitch; the creator's tab is notified.
    await expect(victor.page.locator("#sign-nda")).to_have_text(
        "Sign NDA for Salt and Static (private)")
    await victor.page.locator("#sign-nda").click()
    await expect(victor.page.locator("#nda-status")).to_have_text(
        "Signed: the creator was notified.", timeout=WAIT_MS)
    await expect(maya.page.locator("#notif-badge")).to_have_text("3", timeout=WAIT_MS)
    await expect(victor.page.locator("#notif-badge")).to_have_text("")

    await maya.page.locator("#bell").click()
    items = maya.page.locator("#notif-list li")
    await expect(items).to_have_count(3)
    await expect(items.nth(0)).to_have_attribute("data-type", "nda_signed")
    await expect(items.nth(0)).to_contain_text(
        "Victor Hale (investor) signed the NDA for Salt and Static (private)")
    await expect(items.nth(1)).to_contain_text(f"{VICTOR} commented on The Last Lighthouse")
    await expect(items.nth(2)).to_contain_text(f"{VICTOR} liked The Last Lighthouse")
    await expect(maya.page.locator("#notif-list li.unread")).to_have_count(3)

    # A second tab of Maya's loads them with get_notifications; marking read syncs both.
    maya2 = await open_tab(maya.page.context.browser, maya.page.url)  # type: ignore[arg-type]
    await maya2.online()
    await expect(maya2.page.locator("#notif-badge")).to_have_text("3", timeout=WAIT_MS)
    await maya.page.locator("#mark-all").click()
    for tab in (maya, maya2):
        await expect(tab.page.locator("#notif-badge")).to_have_text("", timeout=WAIT_MS)
    await expect(maya.page.locator("#notif-list li.unread")).to_have_count(0)
    await maya2.page.context.close()
    await maya.page.locator("#bell").click()
    await expect(maya.page.locator("#notifications")).to_be_hidden()


async def phone_width(browser: Browser, daemon: Daemon, tmp_path: Path) -> Tab:
    """At 390 px the list, a chat and the pitch panel each fill the screen in turn, with no
    horizontal scroll."""
    tab = await open_tab(browser, daemon.http + "/", 390, 844)

    async def fits() -> None:
        width = await tab.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width

    await expect(tab.page.locator("#picker")).to_be_visible()
    await fits()
    await tab.page.get_by_role("button", name=re.compile("Victor Hale")).click()
    await tab.online()
    await expect(tab.conversation(1)).to_be_visible(timeout=WAIT_MS)
    await expect(tab.page.locator("#chat")).to_be_hidden()
    await fits()
    await tab.conversation(1).click()
    await expect(tab.page.locator("#conversations-pane")).to_be_hidden()
    await expect(tab.message("Last one.")).to_be_visible(timeout=WAIT_MS)
    await fits()
    await tab.page.screenshot(path=str(tmp_path / "demo-390-chat.png"))
    await tab.page.locator("#chat .back").click()
    await expect(tab.conversation(1)).to_be_visible()
    await tab.page.locator("#tab-pitches").click()
    await tab.page.locator('[data-pitch="1"]').click()
    await expect(tab.page.locator("#comments li")).to_have_count(1, timeout=WAIT_MS)
    await expect(tab.page.locator("#chat")).to_be_hidden()
    await fits()
    await tab.page.locator("#bell").click()
    await expect(tab.page.locator("#notifications")).to_be_visible()
    await fits()
    await tab.page.screenshot(path=str(tmp_path / "demo-390-pitch.png"))
    return tab
