"""The Redis backplane (``backplane.url = "redis://..."``): the contract of backplane.py.

Keys (prefix ``pws:``; one Redis, not Redis Cluster: the scripts touch keys they compute):

- ``u:{user}`` (pub/sub channel): frames for that user. A daemon subscribes to the channels of
  the users it holds, so it receives and parses only their traffic; Redis routes.
- ``inv`` (channel): cache invalidations, to every daemon (rare: membership and profile changes).
- ``node:{node}`` (string with a TTL of ``presence.node_ttl_seconds``): the node's heartbeat;
  ``nodes`` (set): every node that registered; ``nodeusers:{node}`` (set): its users.
- ``conns:{user}`` (hash node -> 1): the nodes holding a connection of the user;
  ``grace:{user}`` (string = the node owning the grace period, with a TTL); ``prof:{user}``
  (hash): username and userType, for presence answered by another node.
- ``rl:{user}`` (hash): the shared token bucket (tokens, stamp), updated by one Lua script.
- ``typing:{node}`` (hash ``c:{conversation}:{user}`` or ``p:{pitch}:{user}`` -> username):
  the typing states the node holds. Written when one begins and when it ends, never for a
  repeated start (the tracker coalesces those), in the publish loop's pipelines; claimed with
  the node's users, so that the claiming daemon announces their end.

Publishing never waits: frames go into a bounded queue (``backplane.max_outgoing``) drained by
one task in pipelines. While Redis is unreachable, local traffic goes on; frames for other
daemons are dropped and their users remembered (bounded), the rate limit falls back to the
local bucket, and presence changes are not shared. When Redis is back (reconnect with
exponential backoff), the node registers its users again, and its own connections and the users
whose frames it dropped get ``sync_required``: every message is in the database, ``sync``
recovers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from backplane import Invalidation, Leave, Node, Presence, Template, TypingState, TypingTopic
from limits import TokenBucket
from protocol import dumps, loads
from rows import EventKind

log = logging.getLogger("pitchey.backplane")

PREFIX = "pws:"
KINDS = {kind.value: kind for kind in EventKind}
TOPICS = {topic.value: topic for topic in TypingTopic}

JOIN = """
redis.call('HSET', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[4], 'n', ARGV[3], 't', ARGV[4])
if redis.call('DEL', KEYS[2]) == 1 then return 0 end
if redis.call('HLEN', KEYS[1]) == 1 then return 1 end
return 0
"""

# 0 elsewhere, 1 offline now, 2 in grace (owned by this node)
LEAVE = """
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) > 0 then
  redis.call('SREM', KEYS[3], ARGV[2])
  return 0
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
  return 2
end
redis.call('SREM', KEYS[3], ARGV[2])
return 1
"""

SETTLE = """
redis.call('SREM', KEYS[3], ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  if redis.call('HLEN', KEYS[1]) == 0 then return 1 end
end
return 0
"""

HEARTBEAT = """
local had = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return had
"""

# A dead node's users: drop its connections; return those now connected nowhere, and its
# typing states (field, username, ...) that no other registered node holds: a live node
# holding one announces its end itself, and a dead one is claimed in turn (after this one has
# left KEYS[1]), so each state is ended once.
CLAIM = """
local p, n = ARGV[1], ARGV[2]
if redis.call('EXISTS', p .. 'node:' .. n) == 1 then return {{}, {}} end
if redis.call('SREM', KEYS[1], n) == 0 then return {{}, {}} end
local gone = {}
for _, u in ipairs(redis.call('SMEMBERS', p .. 'nodeusers:' .. n)) do
  local c = p .. 'conns:' .. u
  redis.call('HDEL', c, n)
  if redis.call('HLEN', c) == 0 then
    local g = redis.call('GET', p .. 'grace:' .. u)
    if g == false or g == n then
      redis.call('DEL', p .. 'grace:' .. u)
      table.insert(gone, u)
    end
  end
end
redis.call('DEL', p .. 'nodeusers:' .. n)
local ended = {}
local typing = redis.call('HGETALL', p .. 'typing:' .. n)
if #typing > 0 then
  local others = redis.call('SMEMBERS', KEYS[1])
  for i = 1, #typing, 2 do
    local held = false
    for _, m in ipairs(others) do
      if redis.call('HEXISTS', p .. 'typing:' .. m, typing[i]) == 1 then
        held = true
        break
      end
    end
    if not held then
      table.insert(ended, typing[i])
      table.insert(ended, typing[i + 1])
    end
  end
  redis.call('DEL', p .. 'typing:' .. n)
end
return {gone, ended}
"""

# The token bucket of limits.TokenBucket, shared: Redis's clock, one script, atomic.
BUCKET = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 't', 's')
local tokens = tonumber(v[1]) or burst
local stamp = tonumber(v[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = (cost - tokens) / rate end
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens), 's', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.6f', wait)
"""


def _channel(user_id: int) -> str:
    return f"{PREFIX}u:{user_id}"


def _typing_field(state: TypingState) -> str:
    return f"{state.topic.value}:{state.topic_id}:{state.user_id}"


def _typing_states(flat: list[Any]) -> list[TypingState]:
    """CLAIM's (field, username, ...) as states; an unreadable field is logged and skipped."""
    out = []
    for raw_field, raw_name in zip(flat[::2], flat[1::2], strict=True):
        field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        try:
            topic, topic_id, user_id = field.split(":")
            out.append(TypingState(TOPICS[topic], int(topic_id), int(user_id), name or None))
        except (ValueError, KeyError):
            log.warning("unreadable typing state %r of a dead node", field)
    return out


class RedisBackplane:
    shared = True

    def __init__(
        self,
        url: str,
        *,
        node_ttl_seconds: float = 15,
        heartbeat_seconds: float = 5,
        frames_per_second: float = 30,
        frames_burst: int = 60,
        max_outgoing: int = 10000,
        max_batch: int = 256,
        reconnect_min_seconds: float = 0.1,
        reconnect_max_seconds: float = 5,
        load_contacts: Callable[[int], Any] | None = None,
        on_offline: Callable[[int, str], None] | None = None,
        on_typing_gone: Callable[[list[TypingState]], None] | None = None,
    ) -> None:
        self.url = url
        self.node_id = uuid.uuid4().hex[:12]
        self.ttl_ms = max(1, int(node_ttl_seconds * 1000))
        self.heartbeat = heartbeat_seconds
        # Dead nodes are looked for every `sweep` seconds, and a heartbeat keeps the node key
        # for node_ttl - sweep: a dead node's key expires at most that long after its death
        # (its last beat came before), and the next sweep claims it, so its users are
        # offline within node_ttl (PROTOCOL.md 13). A sweep is one SMEMBERS and an EXISTS per
        # node, cheap enough to run more often than the heartbeat. (With a heartbeat almost
        # as long as node_ttl, the key still outlives the gap to the next beat.)
        self.sweep_seconds = min(heartbeat_seconds, max(0.1, node_ttl_seconds / 30))
        self.beat_ttl_ms = max(1, int(max(node_ttl_seconds - self.sweep_seconds,
                                          min(node_ttl_seconds, 1.25 * heartbeat_seconds))
                                      * 1000))
        self.rate = frames_per_second
        self.burst = frames_burst
        self.max_outgoing = max_outgoing
        self.max_batch = max_batch
        self.backoff = (reconnect_min_seconds, reconnect_max_seconds)
        self.load_contacts = load_contacts
        self.on_offline = on_offline
        self.on_typing_gone = on_typing_gone
        # A short timeout: a Redis that stops answering must not hold up the daemon's own
        # work (joins wait on it; everything else is in the background).
        self.redis = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2,
                                       retry_on_timeout=False, retry=None)
        self._join = self.redis.register_script(JOIN)
        self._leave = self.redis.register_script(LEAVE)
        self._settle = self.redis.register_script(SETTLE)
        self._beat = self.redis.register_script(HEARTBEAT)
        self._claim = self.redis.register_script(CLAIM)
        self._bucket = self.redis.register_script(BUCKET)
        self.node: Node | None = None
        self.on_invalidate: Callable[[Invalidation], None] = lambda change: None
        self.outgoing: deque[tuple[str, str]] = deque()
        self.wakeup = asyncio.Event()
        self.up = False  # connected, subscribed, registered
        self.ever_up = False
        self.missed: set[int] = set()  # users whose frames were dropped while down
        self.missed_cap = max_outgoing
        self.users: dict[int, tuple[str, str | None]] = {}  # held here: profile
        self.pubsub: Any = None
        self.sub_waiters: dict[str, asyncio.Future[None]] = {}
        self.task: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.dropped = 0
        # Typing states held here (field -> username), and the changes the publish loop has
        # yet to write. Only that loop writes ``typing:{node}``, so its writes keep their
        # order; ``typing_rewrite`` (set when a session starts or the node was swept) has it
        # write the whole hash again instead, which subsumes the changes.
        self.typing_held: dict[str, str] = {}
        self.typing_changes: dict[str, str | None] = {}
        # Users held here whose shown profile changed: their prof hash, rewritten by the
        # publish loop (other daemons answer get_online_users and departures from it).
        self.profile_changes: set[int] = set()
        self.typing_rewrite = True

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, node: Node, on_invalidate: Callable[[Invalidation], None]) -> None:
        """Connect in the background: a daemon starts, and serves local traffic, whether or
        not Redis is up."""
        self.node = node
        self.on_invalidate = on_invalidate
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready = ready
        self.task = asyncio.create_task(self._supervise(), name="backplane")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ready), 3)

    async def stop(self) -> None:
        """Deregister this node (other daemons then announce its users' departures) and
        close."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.up or self.ever_up:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(f"{PREFIX}node:{self.node_id}")
                await self._claim(keys=[f"{PREFIX}nodes"], args=[PREFIX, self.node_id])
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()

    async def _supervise(self) -> None:
        delay = self.backoff[0]
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.up:
                    log.warning("redis backplane lost: %s; local traffic goes on", exc)
                else:
                    log.info("redis backplane unreachable: %s; retrying in %.1fs", exc, delay)
            finally:
                self.up = False
                self.typing_changes.clear()
                self.typing_rewrite = True
                for task in list(self.tasks):
                    task.cancel()
                self.tasks.clear()
                if self.pubsub is not None:
                    with contextlib.suppress(Exception):
                        await self.pubsub.aclose()
                    self.pubsub = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _session(self) -> None:
        """One connected stretch: subscribe, register, then read, publish and beat until an
        error ends it."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=False)
        self.pubsub = pubsub
        await pubsub.subscribe(f"{PREFIX}inv", *(_channel(u) for u in self.users))
        await self._beat(keys=[f"{PREFIX}node:{self.node_id}", f"{PREFIX}nodes"],
                         args=[self.beat_ttl_ms, self.node_id])
        await self._register_all()
        recovered = self.ever_up
        self.up = self.ever_up = True
        log.info("redis backplane connected as node %s", self.node_id)
        if not self._ready.done():
            self._ready.set_result(None)
        if recovered:
            self._recover()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished(task: asyncio.Task[Any]) -> None:
            if not done.done():
                if task.cancelled():
                    done.set_exception(RedisError("backplane task cancelled"))
                elif task.exception() is not None:
                    done.set_exception(task.exception())  # type: ignore[arg-type]

        for coro, name in ((self._read(pubsub), "backplane-read"),
                           (self._publish_loop(), "backplane-publish"),
                           (self._heartbeat_loop(), "backplane-heartbeat"),
                           (self._sweep_loop(), "backplane-sweep")):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(finished)
            self.tasks.add(task)
        await done

    def _recover(self) -> None:
        """Back after a loss: whoever may have missed frames is told to sync."""
        assert self.node is not None
        self.node.resync("backplane_reconnected")
        missed, self.missed = self.missed, set()
        if missed:
            from protocol import sync_required

            self.publish(missed, sync_required("backplane_reconnected"), None, None)

    async def _register_all(self) -> None:
        """Every user held here, again (Redis may have restarted empty, or swept us); the
        typing states too, by the publish loop."""
        self.typing_rewrite = True
        self.wakeup.set()
        if not self.users:
            return
        pipe = self.redis.pipeline(transaction=False)
        for uid, (name, kind) in self.users.items():
            pipe.hset(f"{PREFIX}conns:{uid}", self.node_id, 1)
            pipe.sadd(f"{PREFIX}nodeusers:{self.node_id}", uid)
            pipe.hset(f"{PREFIX}prof:{uid}", mapping={"n": name, "t": kind or ""})
        await pipe.execute()

    # -- reading ---------------------------------------------------------------------------

    async def _read(self, pubsub: Any) -> None:
        node = self.node
        assert node is not None
        own = self.node_id + "|"
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            if isinstance(channel, bytes):
                channel = channel.decode()
            if kind == "subscribe":
                waiter = self.sub_waiters.pop(channel, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                continue
            if kind != "message":
                continue
            data = message["data"]
            text = data.decode() if isinstance(data, bytes) else data
            if text.startswith(own):
                continue  # our own publish, delivered here already
            try:
                if channel == f"{PREFIX}inv":
                    self.on_invalidate(loads(text.split("\n", 1)[1]))
                    continue
                header, frame = text.split("\n", 1)
                _, k, i, w, o = header.split("|")
                if k == "t":  # a change for the daemons holding this user (tell_user)
                    self.on_invalidate(loads(frame))
                    continue
                event: Template | None = None
                if k:
                    event = (KINDS[k], int(i), int(w) if w else None)
                user_id = int(channel.rsplit(":", 1)[1])
                node.deliver(user_id, frame, event, int(o) if o else None)
            except (ValueError, KeyError, IndexError):
                log.warning("unreadable backplane message on %s", channel)

    # -- publishing ------------------------------------------------------------------------

    def publish(self, users: Iterable[int], text: str, event: Template | None,
                origin: int | None) -> None:
        if event is None:
            header = f"{self.node_id}||||{'' if origin is None else origin}\n"
        else:
            kind, eid, who = event
            header = (f"{self.node_id}|{kind.value}|{eid}|{'' if who is None else who}|"
                      f"{'' if origin is None else origin}\n")
        payload = header + text
        if not self.up:
            self._miss(users)
            return
        outgoing = self.outgoing
        for uid in users:
            if len(outgoing) >= self.max_outgoing:
                dropped = outgoing.popleft()
                self.dropped += 1
                self._miss((int(dropped[0].rsplit(":", 1)[1]),) if dropped[0] != f"{PREFIX}inv"
                           else ())
            outgoing.append((_channel(uid), payload))
        self.wakeup.set()

    def _miss(self, users: Iterable[int]) -> None:
        for uid in users:
            if len(self.missed) < self.missed_cap:
                self.missed.add(uid)

    async def _publish_loop(self) -> None:
        outgoing = self.outgoing
        while True:
            if (not outgoing and not self.typing_changes and not self.typing_rewrite
                    and not self.profile_changes):
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            batch = [outgoing.popleft() for _ in range(min(self.max_batch, len(outgoing)))]
            pipe = self.redis.pipeline(transaction=False)
            # Before the frames: a typing start other daemons have seen is one a claim of
            # this node would find. Lost with the session if the pipeline fails; the next
            # session writes the whole hash.
            self._write_typing(pipe)
            changed, self.profile_changes = self.profile_changes, set()
            for uid in changed:
                if uid in self.users:
                    name, kind = self.users[uid]
                    pipe.hset(f"{PREFIX}prof:{uid}", mapping={"n": name, "t": kind or ""})
            for channel, payload in batch:
                pipe.publish(channel, payload)
            try:
                await pipe.execute()
            except (RedisError, OSError):
                self._miss(int(c.rsplit(":", 1)[1]) for c, _ in batch if c != f"{PREFIX}inv")
                self._miss(int(c.rsplit(":", 1)[1]) for c, _ in outgoing
                           if c != f"{PREFIX}inv")
                outgoing.clear()
                raise

    def _write_typing(self, pipe: Any) -> None:
        key = f"{PREFIX}typing:{self.node_id}"
        if self.typing_rewrite:
            self.typing_rewrite = False
            self.typing_changes.clear()
            pipe.delete(key)
            if self.typing_held:
                pipe.hset(key, mapping=dict(self.typing_held))
            return
        if not self.typing_changes:
            return
        changes, self.typing_changes = self.typing_changes, {}
        begun = {field: name for field, name in changes.items() if name is not None}
        ended = [field for field, name in changes.items() if name is None]
        if begun:
            pipe.hset(key, mapping=begun)
        if ended:
            pipe.hdel(key, *ended)

    def typing(self, state: TypingState, on: bool) -> None:
        field = _typing_field(state)
        name: str | None = None
        if on:
            name = self.typing_held[field] = state.username or ""
        else:
            self.typing_held.pop(field, None)
        if not self.typing_rewrite:  # else the rewrite to come includes this change
            self.typing_changes[field] = name
            self.wakeup.set()

    def profile(self, user_id: int, username: str, user_type: str | None) -> None:
        if user_id in self.users and self.users[user_id] != (username, user_type):
            self.users[user_id] = (username, user_type)
            self.profile_changes.add(user_id)
            self.wakeup.set()

    def tell_user(self, user_id: int, change: Invalidation) -> None:
        if self.up and len(self.outgoing) < self.max_outgoing:
            self.outgoing.append((_channel(user_id), f"{self.node_id}|t|||\n{dumps(change)}"))
            self.wakeup.set()

    def invalidate(self, change: Invalidation) -> None:
        if self.up:
            self.outgoing.append((f"{PREFIX}inv", f"{self.node_id}|\n{dumps(change)}"))
            self.wakeup.set()

    # -- heartbeat and dead nodes ----------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            had = await self._beat(keys=[f"{PREFIX}node:{self.node_id}", f"{PREFIX}nodes"],
                                   args=[self.beat_ttl_ms, self.node_id])
            if not int(had):
                log.warning("node %s was taken for dead; registering its users again",
                            self.node_id)
                await self._register_again()

    async def _register_again(self) -> None:
        """This node was claimed as dead (frozen, or cut off past the TTL) but lives: its
        users are registered again, and those connected nowhere else, whom the claimer
        announced offline (it dropped this node's connections), are announced back."""
        held = list(self.users)
        counts: list[Any] = []
        if held:
            pipe = self.redis.pipeline(transaction=False)
            for uid in held:
                pipe.hlen(f"{PREFIX}conns:{uid}")
            counts = await pipe.execute()
        await self._register_all()
        if self.node is not None:
            self.node.back_online(uid for uid, n in zip(held, counts, strict=True) if not int(n))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds)
            await self._sweep()

    async def _sweep(self) -> None:
        """Claim nodes whose heartbeat expired; end their typing states (``on_typing_gone``)
        and announce their users' departures."""
        nodes = await self.redis.smembers(f"{PREFIX}nodes")
        for raw in nodes:
            other = raw.decode() if isinstance(raw, bytes) else raw
            if other == self.node_id:
                continue
            if await self.redis.exists(f"{PREFIX}node:{other}"):
                continue
            gone, typing = await self._claim(keys=[f"{PREFIX}nodes"], args=[PREFIX, other])
            if gone or typing:
                log.info("node %s is gone: %d users offline, %d typing states ended", other,
                         len(gone), len(typing) // 2)
            if typing and self.on_typing_gone is not None:
                self.on_typing_gone(_typing_states(typing))
            for raw_uid in gone:
                await self._announce_gone(int(raw_uid))

    async def _announce_gone(self, user_id: int) -> None:
        from protocol import now_iso, user_offline

        name = await self.redis.hget(f"{PREFIX}prof:{user_id}", "n")
        username = name.decode() if isinstance(name, bytes) else (name or f"User {user_id}")
        contacts: set[int] = set()
        if self.load_contacts is not None:
            contacts = await self.load_contacts(user_id)
        last_seen = now_iso()
        if self.on_offline is not None:
            self.on_offline(user_id, last_seen)
        frame = user_offline(user_id, username, last_seen)
        node = self.node
        assert node is not None
        for contact in contacts:
            node.deliver(contact, frame, None, None)
        self.publish(contacts, frame, None, None)

    # -- presence --------------------------------------------------------------------------

    def _keys(self, user_id: int) -> list[str]:
        return [f"{PREFIX}conns:{user_id}", f"{PREFIX}grace:{user_id}",
                f"{PREFIX}nodeusers:{self.node_id}", f"{PREFIX}prof:{user_id}"]

    async def join(self, user_id: int, username: str, user_type: str | None) -> bool:
        new = user_id not in self.users
        self.users[user_id] = (username, user_type)
        if not self.up:
            return new  # registered when Redis is back; announced by this node alone
        channel = _channel(user_id)
        try:
            if new:
                waiter = asyncio.get_running_loop().create_future()
                self.sub_waiters[channel] = waiter
                await self.pubsub.subscribe(channel)
                # Confirmed before the replay reads the backlog (contract 2).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, 2)
            first = await self._join(keys=self._keys(user_id),
                                     args=[self.node_id, user_id, username, user_type or ""])
            return bool(int(first))
        except (RedisError, OSError, AttributeError) as exc:
            log.info("backplane join of user %d failed: %s", user_id, exc)
            self.sub_waiters.pop(channel, None)
            return new

    async def leave(self, user_id: int, grace_seconds: float) -> Leave:
        if not self.up:
            return Leave.GRACE if grace_seconds > 0 else Leave.OFFLINE
        grace_ms = int(grace_seconds * 1000)
        try:
            outcome = int(await self._leave(
                keys=self._keys(user_id)[:3],
                args=[self.node_id, user_id, grace_ms + self.ttl_ms if grace_ms else 0]))
        except (RedisError, OSError) as exc:
            log.info("backplane leave of user %d failed: %s", user_id, exc)
            return Leave.GRACE if grace_seconds > 0 else Leave.OFFLINE
        return (Leave.ELSEWHERE, Leave.OFFLINE, Leave.GRACE)[outcome]

    async def settle(self, user_id: int) -> bool:
        if not self.up:
            return True
        try:
            return bool(int(await self._settle(keys=self._keys(user_id)[:3],
                                               args=[self.node_id, user_id])))
        except (RedisError, OSError):
            return True

    def forget(self, user_id: int) -> None:
        """The user is gone from this node: stop receiving their channel."""
        self.users.pop(user_id, None)
        if self.up and self.pubsub is not None:
            task = asyncio.create_task(self._unsubscribe(_channel(user_id)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _unsubscribe(self, channel: str) -> None:
        with contextlib.suppress(RedisError, OSError, AttributeError):
            await self.pubsub.unsubscribe(channel)

    async def online(self, users: Iterable[int]) -> dict[int, Presence]:
        wanted = list(users)
        if not wanted or not self.up:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for uid in wanted:
            pipe.hlen(f"{PREFIX}conns:{uid}")
            pipe.exists(f"{PREFIX}grace:{uid}")
            pipe.hmget(f"{PREFIX}prof:{uid}", "n", "t")
        try:
            answers = await pipe.execute()
        except (RedisError, OSError):
            return {}
        out: dict[int, Presence] = {}
        for index, uid in enumerate(wanted):
            conns, grace, (name, kind) = answers[3 * index: 3 * index + 3]
            if conns or grace:
                out[uid] = Presence(uid, name.decode() if name else None,
                                    kind.decode() if kind else None, bool(conns))
        return out

    # -- the shared token bucket -----------------------------------------------------------

    async def take(self, user_id: int, cost: float, local: TokenBucket) -> float:
        if not self.up:
            return local.take(cost)
        started = time.monotonic()
        try:
            wait = float(await self._bucket(keys=[f"{PREFIX}rl:{user_id}"],
                                            args=[self.rate, self.burst, cost]))
        except (RedisError, OSError, ValueError):
            return local.take(cost)
        if time.monotonic() - started > 1:
            log.warning("the shared rate limit took %.1fs", time.monotonic() - started)
        return wait
