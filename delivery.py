"""Delivery records: which durable events were written to a live connection.

The hub reports every tagged frame it writes (``hub.Recorder``); this log collects the reports
of one event-loop iteration into one ``Store.record_deliveries`` call, so a fan-out to 1,000
connections costs one write. ``settled(user)`` waits until the user's records queued so far
are committed, which is what a replay needs before it reads the backlog.
"""

from __future__ import annotations

import asyncio
import logging

from rows import Event, EventKind
from store import Store

log = logging.getLogger("pitchey.delivery")


class DeliveryLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.messages: dict[int, list[int]] = {}  # message id -> recipients written to
        self.reads: list[tuple[int, int]] = []  # (message id, reader id) notices written
        self.notifications: list[int] = []  # notification ids written to their user
        self.users: set[int] = set()
        # user id -> the commit carrying that user's latest delivery records
        self.in_flight: dict[int, asyncio.Future[None]] = {}
        self.scheduled = False

    def _schedule(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self._submit)

    def record(self, event: Event, recipient: int) -> None:
        """``event`` was written to a connection of ``recipient``."""
        self._schedule()
        kind, message_id, who = event
        match kind:
            case EventKind.MESSAGE:
                self.messages.setdefault(message_id, []).append(who)
            case EventKind.READ:
                self.reads.append((message_id, who))
            case EventKind.NOTIFICATION:
                self.notifications.append(message_id)
        self.users.add(recipient)

    def record_messages(self, message_id: int, recipients: list[int]) -> None:
        """One new_message was written to a connection of each of ``recipients``."""
        self._schedule()
        self.messages.setdefault(message_id, []).extend(recipients)
        self.users.update(recipients)

    def _submit(self) -> None:
        self.scheduled = False
        messages, self.messages = self.messages, {}
        reads, self.reads = self.reads, []
        notifications, self.notifications = self.notifications, []
        users, self.users = self.users, set()
        if not messages and not reads and not notifications:
            return
        future = self.store.record_deliveries(messages, reads, notifications)
        for user_id in users:
            self.in_flight[user_id] = future
        future.add_done_callback(lambda f: self._done(f, users))

    def _done(self, future: asyncio.Future[None], users: set[int]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("delivery records not stored", exc_info=future.exception())
        for user_id in users:
            if self.in_flight.get(user_id) is future:
                del self.in_flight[user_id]

    async def settled(self, user_id: int) -> None:
        if self.scheduled and user_id in self.users:
            self._submit()
        future = self.in_flight.get(user_id)
        if future is not None:
            await asyncio.wait([future])
