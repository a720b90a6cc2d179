"""Conversation membership, cached in memory so the hot path reads no database.

On SQLite the daemon is the only writer, so the cache is kept correct by updating it whenever
this process creates or changes a conversation (other daemons' changes arrive as
invalidations); entries are loaded on a miss and the least recently used are dropped past
``capacity``. On a database the Pitchey app writes too (PostgreSQL), the app may add or remove
participants behind the daemon's back: there an entry is read again once it is ``ttl`` seconds
old, and a user the cache says is not a member is looked up again before being refused.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from rows import ConversationRow
from store import Store

V = TypeVar("V")

# How long a row read from a database another program writes (the Pitchey app's, PostgreSQL)
# is trusted before it is read again: the longest the app's removal of a participant, or of a
# pitch's visibility, can go unseen.
SHARED_ROWS_SECONDS = 2.0


class RowCache(Generic[V]):
    """Rows by id in memory, least recently used dropped past ``capacity``; with ``ttl``, an
    entry older than that many seconds is no longer ``fresh`` (read it again). Conversations
    here, and the service's pitches."""

    def __init__(self, capacity: int, ttl: float | None = None) -> None:
        self.capacity = capacity
        self.ttl = ttl
        # id -> (row, monotonic time it was read), least recently used first
        self._rows: OrderedDict[int, tuple[V, float]] = OrderedDict()

    def fresh(self, key: int) -> V | None:
        """The row if it is in memory and still trusted."""
        entry = self._rows.get(key)
        if entry is None:
            return None
        if self.ttl is not None and time.monotonic() - entry[1] > self.ttl:
            return None
        self._rows.move_to_end(key)
        return entry[0]

    def known(self, key: int) -> V | None:
        """The row if it is in memory, however old (for frames about it, not for access)."""
        entry = self._rows.get(key)
        return entry[0] if entry is not None else None

    def put(self, key: int, row: V) -> None:
        self._rows[key] = (row, time.monotonic())
        self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def pop(self, key: int) -> None:
        self._rows.pop(key, None)


class Conversations:
    def __init__(self, store: Store, capacity: int, ttl: float | None = None,
                 on_load: Callable[[frozenset[int]], None] | None = None) -> None:
        """``ttl``: seconds an entry is trusted (None: until evicted or changed here).
        ``on_load``: told the members of every row read from the database (where the app
        makes conversations, their members become each other's contacts when one is used)."""
        self.store = store
        self.on_load = on_load
        self.capacity = capacity
        self._rows: RowCache[ConversationRow] = RowCache(capacity, ttl)
        # (low, high) user pair -> their direct conversation's id
        self._pairs: OrderedDict[tuple[int, int], int] = OrderedDict()

    def cached(self, conversation_id: int) -> ConversationRow | None:
        """The conversation if it is in memory and still trusted (no await: the send path's
        usual case)."""
        return self._rows.fresh(conversation_id)

    async def get(self, conversation_id: int) -> ConversationRow | None:
        row = self.cached(conversation_id)
        if row is not None:
            return row
        return await self._load(conversation_id)

    async def _load(self, conversation_id: int) -> ConversationRow | None:
        row = await self.store.conversation(conversation_id)
        if row is not None:
            self.put(row)
            if self.on_load is not None:
                self.on_load(row.members)
        else:
            self._rows.pop(conversation_id)
        return row

    async def member_of(self, conversation_id: int, user_id: int) -> ConversationRow | None:
        """The conversation if ``user_id`` is an active participant, else None. Where another
        program writes the database, a refusal is checked against the database first."""
        row = self.cached(conversation_id)
        if row is not None and user_id in row.members:
            return row
        if row is None or self._rows.ttl is not None:
            row = await self._load(conversation_id)
        if row is None or user_id not in row.members:
            return None
        return row

    def cached_member(self, conversation_id: int, user_id: int) -> bool:
        """Known from memory alone that ``user_id`` is an active participant."""
        row = self.cached(conversation_id)
        return row is not None and user_id in row.members

    def put(self, row: ConversationRow) -> None:
        self._rows.put(row.id, row)

    async def direct(self, a: int, b: int, now: str) -> ConversationRow:
        """The direct conversation of a and b (made by the store if missing)."""
        key = (min(a, b), max(a, b))
        found = self._pairs.get(key)
        if found is not None:
            row = await self.get(found)
            if row is not None and _is_direct(row, key):
                return row
        row = await self.store.direct_conversation(a, b, now)
        self.put(row)
        self._remember_pair(key, row.id)
        return row

    async def existing_direct(self, a: int, b: int) -> ConversationRow | None:
        """The direct conversation of a and b if they have one; None, and nothing made, if
        not (``conversations.create_policy = "backend"``)."""
        key = (min(a, b), max(a, b))
        found = self._pairs.get(key)
        row = await self.get(found) if found is not None else None
        if row is None or not _is_direct(row, key):
            found = await self.store.find_direct(a, b)
            if found is None:
                return None
            row = await self.get(found)
        if row is not None:
            self._remember_pair(key, row.id)
        return row

    def _remember_pair(self, key: tuple[int, int], conversation_id: int) -> None:
        self._pairs[key] = conversation_id
        self._pairs.move_to_end(key)
        while len(self._pairs) > self.capacity:
            self._pairs.popitem(last=False)

    def knows_pair(self, a: int, b: int) -> bool:
        return (min(a, b), max(a, b)) in self._pairs

    def forget(self, conversation_id: int) -> None:
        """Another daemon changed it: read it again on next use."""
        self._rows.pop(conversation_id)
        self.forget_pairs(conversation_id)

    def forget_pairs(self, conversation_id: int) -> None:
        """The conversation's members changed (the backend's API): it is no longer the direct
        conversation of any pair (the store drops its key too)."""
        for key in [k for k, v in self._pairs.items() if v == conversation_id]:
            del self._pairs[key]


def _is_direct(row: ConversationRow, pair: tuple[int, int]) -> bool:
    """``row`` still is the direct conversation of ``pair``: not a group, and its active
    participants are exactly the two (where the Pitchey app writes the database it may have
    added or removed someone since the pair was recorded)."""
    return not row.is_group and row.members == frozenset(pair)
