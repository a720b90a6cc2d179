"""The backplane: what daemons sharing one database tell each other (PROTOCOL.md 13).

Two implementations of one contract (STYLE.md habit 15):

- :class:`InProcess` (the default, ``backplane.url = ""``): one daemon, nothing to tell. Every
  method answers from this process alone; the hub skips the backplane entirely on its hot paths
  (``shared`` is False), so the single-daemon path costs nothing.
- ``backplane_redis.RedisBackplane`` (``backplane.url = "redis://..."``): per-user pub/sub
  channels, global presence with node heartbeats, a shared token bucket, cache invalidation.

The contract, which tests/test_backplane.py checks on the in-process twin and
tests/test_multinode.py on Redis with real daemons:

1. ``publish(users, text, event, origin)`` never waits and never raises: local delivery has
   already happened; the frame reaches every connection of ``users`` held by *other* daemons,
   at most once per connection, in the order published by this daemon. The daemon that writes
   a tagged frame to a socket records its delivery (``event``), except for ``origin``'s own
   connections (the sender's other tabs get an echo, not a delivery).
2. ``join`` is awaited before a user's first connection here replays its backlog; once it
   returns, every frame published for that user reaches this daemon. It answers whether the
   user just came online globally (0 -> 1 connections, and not back within a grace period).
3. ``leave`` answers ``OFFLINE`` (no connection anywhere: announce now), ``ELSEWHERE`` (still
   connected on another daemon: announce nothing) or ``GRACE`` (no connection anywhere, this
   daemon owns the grace period: call ``settle`` when it ends; ``settle`` answers whether to
   announce ``user_offline``, which is false when the user came back on any daemon meanwhile).
4. ``take(user, cost, local)`` is the user's token bucket across all daemons: 0 when granted,
   else seconds to wait. When the shared bucket cannot be reached, ``local`` decides (the
   limit is then per daemon, never absent).
5. ``online(users)`` answers which of ``users`` are online anywhere (a user inside the grace
   period counts as online), with their profile.
6. ``invalidate(change)`` reaches every other daemon's ``on_invalidate`` (conversation
   membership and profiles), best effort: caches also expire by LRU.
7. ``typing(state, on)`` never waits and never raises: it records that a typing state began
   (``on``) or ended on this daemon, which announces both itself. When a daemon dies, the one
   that claims it is given (``on_typing_gone``) every typing state the dead one held that no
   live daemon holds too, once across all daemons, to announce its end: the dead daemon's
   timers died with it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from limits import TokenBucket
from rows import EventKind

# (kind, id, who): as hub.EventTemplate (who None = "the user the frame is written to").
Template = tuple[EventKind, int, int | None]


class Leave(enum.Enum):
    OFFLINE = "offline"
    ELSEWHERE = "elsewhere"
    GRACE = "grace"


@dataclass(frozen=True, slots=True)
class Presence:
    """A user online somewhere: profile as last registered, ``connected`` false inside the
    grace period (then ``last_seen`` is when the last connection closed, when known)."""

    user_id: int
    username: str | None
    user_type: str | None
    connected: bool


class TypingTopic(enum.Enum):
    CONVERSATION = "c"
    PITCH = "p"


@dataclass(frozen=True, slots=True)
class TypingState:
    """A user typing in a conversation or on a pitch's comments, on one daemon; ``username``
    as that daemon knew it (the daemon announcing its end may never have held the user)."""

    topic: TypingTopic
    topic_id: int
    user_id: int
    username: str | None


class Node(Protocol):
    """What a backplane delivers into: the daemon's hub (and, for changes, the service)."""

    def deliver(self, user_id: int, text: str, event: Template | None,
                origin: int | None) -> None: ...

    def resync(self, reason: str) -> None: ...

    def back_online(self, user_ids: Iterable[int]) -> None:
        """These users, held here, were announced offline by another daemon while this one
        was taken for dead (frozen, cut off): announce them online again."""


# A change another daemon made: {"conversation": id, "members": [...], "removed": [...]} or
# {"profile": user id}.
Invalidation = dict[str, Any]


class Backplane(Protocol):
    shared: bool
    node_id: str

    async def start(self, node: Node, on_invalidate: Callable[[Invalidation], None]) -> None: ...

    async def stop(self) -> None: ...

    def publish(self, users: Iterable[int], text: str, event: Template | None,
                origin: int | None) -> None: ...

    async def join(self, user_id: int, username: str, user_type: str | None) -> bool: ...

    async def leave(self, user_id: int, grace_seconds: float) -> Leave: ...

    async def settle(self, user_id: int) -> bool: ...

    def forget(self, user_id: int) -> None: ...

    async def take(self, user_id: int, cost: float, local: TokenBucket) -> float: ...

    async def online(self, users: Iterable[int]) -> dict[int, Presence]: ...

    def invalidate(self, change: Invalidation) -> None: ...

    def tell_user(self, user_id: int, change: Invalidation) -> None:
        """``change`` to the other daemons that hold connections of ``user_id`` only (its
        ``on_invalidate`` there), in order with the user's frames."""

    def profile(self, user_id: int, username: str, user_type: str | None) -> None:
        """A user held here is shown by another name or type now: other daemons' answers
        about them (online users, departures) use it too."""

    def typing(self, state: TypingState, on: bool) -> None: ...


class InProcess:
    """One daemon: presence is the hub's, the bucket is the local one, nobody to tell.

    ``online`` cannot see the hub (which owns presence here); the service answers
    get_online_users from the hub directly when ``shared`` is False."""

    shared = False
    node_id = "local"

    async def start(self, node: Node, on_invalidate: Callable[[Invalidation], None]) -> None:
        return None

    async def stop(self) -> None:
        return None

    def publish(self, users: Iterable[int], text: str, event: Template | None,
                origin: int | None) -> None:
        return None

    async def join(self, user_id: int, username: str, user_type: str | None) -> bool:
        return True  # the hub calls this for a first local connection: first anywhere

    async def leave(self, user_id: int, grace_seconds: float) -> Leave:
        return Leave.GRACE if grace_seconds > 0 else Leave.OFFLINE

    async def settle(self, user_id: int) -> bool:
        return True

    def forget(self, user_id: int) -> None:
        return None

    async def take(self, user_id: int, cost: float, local: TokenBucket) -> float:
        return local.take(cost)

    async def online(self, users: Iterable[int]) -> dict[int, Presence]:
        return {}

    def invalidate(self, change: Invalidation) -> None:
        return None

    def tell_user(self, user_id: int, change: Invalidation) -> None:
        return None

    def profile(self, user_id: int, username: str, user_type: str | None) -> None:
        return None

    def typing(self, state: TypingState, on: bool) -> None:
        return None  # a dead daemon's typing states died with every connection they had


def open_backplane(url: str, **settings: Any) -> Backplane:
    """The in-process backplane for "", else Redis (imported only then)."""
    if not url:
        return InProcess()
    from backplane_redis import RedisBackplane

    return RedisBackplane(url, **settings)
