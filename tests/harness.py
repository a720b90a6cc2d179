"""In-process harness: the daemon's real hub, service and handlers on a real temporary store,
with recording connections instead of sockets (in the spirit of Phoenix's ChannelTest).

Use it for logic; the subprocess suite (conftest.py) covers lifecycle, crashes and limits.
Every call goes through the same code a socket frame does (``Sessions.dispatch``), and the
frames a connection is sent are recorded in order, so a test reads them without waiting:
when ``await conn.send(...)`` returns, every frame that command caused has been written.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config as cfg  # noqa: E402
import protocol as p  # noqa: E402
from hub import Client, Hub  # noqa: E402
from pitchey_ws import App  # noqa: E402


class RecordingClient(Client):
    """A connection that records what it is sent instead of writing to a socket."""

    __slots__ = ("close_code", "frames")

    def __init__(self, user_id: int, hub: Hub) -> None:
        super().__init__(None, user_id, None, hub)
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None

    @property
    def is_open(self) -> bool:
        return not self.closing

    def write(self, text: str) -> None:
        self.frames.append(json.loads(text))

    def write_batch(self, texts: Sequence[str]) -> None:
        for text in texts:
            self.write(text)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def buffered(self) -> int:
        return 0

    async def _close(self, code: int, reason: str) -> None:
        self.close_code = code
        self.hub.detach(self)

    def take(self, kind: str) -> list[dict[str, Any]]:
        """Remove and return the recorded frames of type ``kind``."""
        taken = [f for f in self.frames if f["type"] == kind]
        self.frames = [f for f in self.frames if f["type"] != kind]
        return taken

    def only(self, kind: str) -> dict[str, Any]:
        """The one recorded frame of type ``kind`` (removed); fails if there are 0 or 2."""
        taken = self.take(kind)
        assert len(taken) == 1, f"{len(taken)} {kind} frames; recorded {self.frames}"
        return taken[0]


class Harness:
    def __init__(self, app: App) -> None:
        self.app = app

    async def connect(self, user_id: int, username: str | None = None) -> RecordingClient:
        """What ``Sessions.handle`` does for a new connection, up to the read loop."""
        sessions = self.app.sessions
        name = username or f"user{user_id}"
        client = RecordingClient(user_id, self.app.hub)
        await self.app.hub.attach(client, name, None)
        client.write(p.connected(user_id, name))
        await sessions.catch_up(client)
        return client

    async def send(self, client: RecordingClient, frame: dict[str, Any]) -> None:
        """One frame from ``client``, through the real dispatch and handler table."""
        await self.app.sessions.dispatch(client, json.dumps(frame))

    def disconnect(self, client: RecordingClient) -> None:
        self.app.hub.detach(client)


@asynccontextmanager
async def harness(tmp: Path, **sections: dict[str, Any]) -> AsyncIterator[Harness]:
    """An App on a temporary SQLite file, opened but not listening. ``sections`` override
    config, e.g. ``presence={"offline_grace_seconds": 0}``."""
    config = cfg.Config()
    config = config.replace("database", path=str(tmp / "harness.db"))
    config = config.replace("presence", offline_grace_seconds=0)
    for section, values in sections.items():
        config = config.replace(section, **values)
    app = App(config)
    await app.store.open()
    try:
        yield Harness(app)
    finally:
        app.typing.cancel_all()
        app.hub.flush_presence()
        await app.background.wait(1)
        await app.store.close()
