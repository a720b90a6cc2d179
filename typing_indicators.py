"""Typing indicators: ephemeral, announced to the other participants' live connections only.

A user typing in a conversation has one entry here and a row in ``typing_indicators``. A
repeated ``typing_start`` only pushes the deadline back (no broadcast, no write); the state ends
with ``typing_stop``, a sent message, the deadline passing, or the user's last connection
closing, and each end announces ``isTyping: false`` exactly once.

With other daemons (PROTOCOL.md 13) each begin and end is also told to the backplane, so that
when this daemon dies, the daemon that claims it ends the states it held (``end_elsewhere``
there): their timers die with this process. Each begin and end is also told to the daemons
holding the typing user's other connections (on the user's own channel, so the traffic grows
with the user's daemons, not with all of them): a message sent, or a ``typing_stop``, through
another tab of the user on another daemon asks the one holding the state to end it
(``changed_elsewhere``), as a send through the same daemon does; so does a send by a user not
connected to this daemon at all (``POST /api/messages/send`` behind a load balancer).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import protocol as p
from backplane import TypingState, TypingTopic
from hub import Hub
from store import Store


class _Typing:
    __slots__ = ("deadline", "members", "timer")

    def __init__(self, deadline: float, members: frozenset[int], timer: asyncio.TimerHandle):
        self.deadline = deadline
        self.members = members
        self.timer = timer


# (topic id, user id, username, members, typing): a start or an end to announce, for trackers
# of something other than conversations (pitches: PROTOCOL.md 9).
Announce = Callable[[int, int, str | None, frozenset[int], bool], None]

# States held by other daemons that one daemon remembers (the oldest forgotten first): a
# forgotten one ends by its TTL on its own daemon, as before other daemons were told.
MAX_ELSEWHERE = 100_000


class TypingTracker:
    """Typing state keyed by (topic, user): a conversation by default; with ``announce``,
    any topic (a pitch, ``topic`` naming it to the backplane), announced by that callback
    instead of to the members and without the ``typing_indicators`` mirror (whose rows are
    conversations')."""

    def __init__(
        self, hub: Hub, store: Store, ttl_seconds: float, announce: Announce | None = None,
        topic: TypingTopic = TypingTopic.CONVERSATION,
    ) -> None:
        self.hub = hub
        self.store = store
        self.ttl = ttl_seconds
        self.announce = announce
        self.topic = topic
        self._state: dict[tuple[int, int], _Typing] = {}
        self._by_user: dict[int, set[int]] = {}
        # (topic id, user id) typing on another daemon, as that daemon told
        self._elsewhere: OrderedDict[tuple[int, int], None] = OrderedDict()

    def is_noop(self, conversation_id: int, user_id: int, typing: bool) -> bool:
        """True when the frame would change nothing users see (a coalesced repeat)."""
        return ((conversation_id, user_id) in self._state) == typing

    def end_elsewhere(self, conversation_id: int, user_id: int, username: str | None,
                      members: frozenset[int]) -> None:
        """A typing state a dead daemon held (backplane contract 7) ends: one isTyping false,
        and the mirror row with it; nothing when this daemon holds the same state, whose
        own end announces it."""
        self._elsewhere.pop((conversation_id, user_id), None)
        if (conversation_id, user_id) not in self._state:
            self._announce(conversation_id, user_id, username, members, False)

    def start(self, conversation_id: int, user_id: int, members: frozenset[int]) -> None:
        loop = asyncio.get_running_loop()
        key = (conversation_id, user_id)
        entry = self._state.get(key)
        deadline = loop.time() + self.ttl
        if entry is not None:
            entry.deadline = deadline  # the timer checks it and re-arms itself
            entry.members = members
            return
        timer = loop.call_at(deadline, self._expire, key)
        self._state[key] = _Typing(deadline, members, timer)
        self._by_user.setdefault(user_id, set()).add(conversation_id)
        username = self._username(user_id)
        self._share(conversation_id, user_id, username, True)
        self._announce(conversation_id, user_id, username, members, True)

    def stop(self, conversation_id: int, user_id: int) -> None:
        key = (conversation_id, user_id)
        if self.hub.shared and (key in self._elsewhere or user_id not in self.hub.users):
            # Held by another daemon (the user typed through another tab there, or is not
            # connected here at all): that one ends it.
            self._elsewhere.pop(key, None)
            self.hub.backplane.tell_user(user_id, self._change(conversation_id, user_id, "stop"))
        entry = self._state.pop(key, None)
        if entry is None:
            return
        entry.timer.cancel()
        convs = self._by_user.get(user_id)
        if convs is not None:
            convs.discard(conversation_id)
            if not convs:
                del self._by_user[user_id]
        username = self._username(user_id)
        self._share(conversation_id, user_id, username, False)
        self._announce(conversation_id, user_id, username, entry.members, False)

    def stop_user(self, user_id: int) -> None:
        for conversation_id in list(self._by_user.get(user_id, ())):
            self.stop(conversation_id, user_id)

    def cancel_all(self) -> None:
        """Shutdown: drop timers without announcing (connections are closing anyway)."""
        for entry in self._state.values():
            entry.timer.cancel()
        self._state.clear()
        self._by_user.clear()
        self._elsewhere.clear()

    def _expire(self, key: tuple[int, int]) -> None:
        entry = self._state.get(key)
        if entry is None:
            return
        loop = asyncio.get_running_loop()
        if entry.deadline > loop.time():
            entry.timer = loop.call_at(entry.deadline, self._expire, key)
            return
        self.stop(*key)

    def _username(self, user_id: int) -> str | None:
        user = self.hub.users.get(user_id)
        return user.username if user else None

    def _share(self, topic_id: int, user_id: int, username: str | None, typing: bool) -> None:
        if self.hub.shared:
            self.hub.backplane.typing(TypingState(self.topic, topic_id, user_id, username),
                                      typing)
            self.hub.backplane.tell_user(
                user_id, self._change(topic_id, user_id, "start" if typing else "end"))

    def _change(self, topic_id: int, user_id: int, what: str) -> dict[str, Any]:
        return {"typing": self.topic.value, "id": topic_id, "user": user_id, "what": what}

    def changed_elsewhere(self, change: dict[str, Any]) -> None:
        """Another daemon's word about a typing state (``_change``): it began or ended there,
        or it is asked to end here (a send or a stop went through that daemon)."""
        topic_id, user_id, what = change.get("id"), change.get("user"), change.get("what")
        if not isinstance(topic_id, int) or not isinstance(user_id, int):
            return
        key = (topic_id, user_id)
        if what == "start":
            self._elsewhere[key] = None
            self._elsewhere.move_to_end(key)
            while len(self._elsewhere) > MAX_ELSEWHERE:
                self._elsewhere.popitem(last=False)
        elif what == "end":
            self._elsewhere.pop(key, None)
        elif what == "stop" and key in self._state:
            self.stop(topic_id, user_id)

    def _announce(
        self, conversation_id: int, user_id: int, username: str | None,
        members: frozenset[int], typing: bool
    ) -> None:
        if self.announce is not None:
            self.announce(conversation_id, user_id, username, members, typing)
            return
        frame = p.user_typing(user_id, username, conversation_id, typing)
        self.hub.send_to([m for m in members if m != user_id], frame)
        self.store.set_typing_later(conversation_id, user_id, typing, p.now_iso())
