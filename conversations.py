"""Conversation membership, cached in memory so the hot path reads no database.

The daemon is the only writer, so the cache is kept correct by updating it whenever this
process creates a conversation; entries are loaded on a miss and the least recently used are
dropped past ``capacity``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import store as st


class Conversations:
    def __init__(self, store: st.Store, capacity: int) -> None:
        self.store = store
        self.capacity = capacity
        self._rows: OrderedDict[int, st.ConversationRow] = OrderedDict()
        self._pairs: OrderedDict[tuple[int, int], int] = OrderedDict()
        # Pair lookups or creations under way, so two first messages share one conversation.
        self.pair_locks: dict[tuple[int, int], asyncio.Lock] = {}

    def cached(self, conversation_id: int) -> st.ConversationRow | None:
        """The conversation if it is in memory (no await: the send path's usual case)."""
        row = self._rows.get(conversation_id)
        if row is not None:
            self._rows.move_to_end(conversation_id)
        return row

    async def get(self, conversation_id: int) -> st.ConversationRow | None:
        row = self.cached(conversation_id)
        if row is not None:
            return row
        row = await self.store.conversation(conversation_id)
        if row is not None:
            self.put(row)
        return row

    async def member_of(self, conversation_id: int, user_id: int) -> st.ConversationRow | None:
        """The conversation if ``user_id`` is an active participant, else None."""
        row = await self.get(conversation_id)
        if row is None or user_id not in row.members:
            return None
        return row

    def cached_member(self, conversation_id: int, user_id: int) -> bool:
        """Known from memory alone that ``user_id`` is an active participant."""
        row = self._rows.get(conversation_id)
        return row is not None and user_id in row.members

    def put(self, row: st.ConversationRow) -> None:
        self._rows[row.id] = row
        self._rows.move_to_end(row.id)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    async def find_pair(self, a: int, b: int) -> int | None:
        key = (min(a, b), max(a, b))
        found = self._pairs.get(key)
        if found is not None:
            return found
        # Only the database knows which two-member conversation is the oldest, so pairs are
        # cached from its answer, never from a conversation that happens to be loaded.
        found = await self.store.find_pair(a, b)
        if found is not None:
            self._pairs[key] = found
            while len(self._pairs) > self.capacity:
                self._pairs.popitem(last=False)
        return found

    def pair_lock(self, a: int, b: int) -> asyncio.Lock:
        key = (min(a, b), max(a, b))
        lock = self.pair_locks.get(key)
        if lock is None:
            lock = self.pair_locks[key] = asyncio.Lock()
        return lock

    def release_pair_lock(self, a: int, b: int, lock: asyncio.Lock) -> None:
        key = (min(a, b), max(a, b))
        if self.pair_locks.get(key) is lock and not lock.locked():
            del self.pair_locks[key]
