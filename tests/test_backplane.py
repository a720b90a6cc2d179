"""The backplane contract (backplane.py) on both twins: the in-process one alone, and two
Redis backplanes on a real redis-server, with a recording node instead of a hub."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import TIMEOUT
from servers import RedisServer

from backplane import InProcess, Leave, TypingState, TypingTopic
from limits import TokenBucket
from rows import EventKind


class Recorder:
    """A node that records what the backplane delivers into it."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, str, Any, int | None]] = []
        self.resyncs: list[str] = []
        self.arrived = asyncio.Event()

    def deliver(self, user_id: int, text: str, event: Any, origin: int | None) -> None:
        self.frames.append((user_id, text, event, origin))
        self.arrived.set()

    def resync(self, reason: str) -> None:
        self.resyncs.append(reason)

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while len(self.frames) < count:
                self.arrived.clear()
                await self.arrived.wait()


async def test_in_process_twin() -> None:
    """In-process: every first connection is first anywhere, leaving is offline (or grace),
    the local bucket decides, nothing is published."""
    bp = InProcess()
    node = Recorder()
    await bp.start(node, lambda change: None)
    assert await bp.join(1, "a", None) is True
    assert await bp.leave(1, 0) is Leave.OFFLINE
    assert await bp.leave(1, 2) is Leave.GRACE
    assert await bp.settle(1) is True
    bucket = TokenBucket(1, 2)
    assert [await bp.take(1, 1, bucket) for _ in range(2)] == [0, 0]
    assert await bp.take(1, 1, bucket) > 0
    bp.publish([1], "{}", None, None)
    assert node.frames == []
    await bp.stop()


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[tuple[Any, Any, Recorder, Recorder]]:
    from backplane_redis import RedisBackplane

    one, two = (RedisBackplane(redis_server.url, frames_per_second=1, frames_burst=3)
                for _ in range(2))
    n1, n2 = Recorder(), Recorder()
    await one.start(n1, lambda change: None)
    await two.start(n2, lambda change: None)
    assert one.up and two.up
    yield one, two, n1, n2
    await one.stop()
    await two.stop()


async def test_redis_twin(pair: tuple[Any, Any, Recorder, Recorder]) -> None:
    """Redis: a frame reaches only the node holding the user, with its event; presence is
    global; the bucket is shared."""
    one, two, n1, n2 = pair
    assert await two.join(7, "seven", "creator") is True  # first anywhere
    assert await one.join(7, "seven", "creator") is False  # a second node: no announcement
    assert await two.join(8, "eight", None) is True
    one.publish([8], '{"type":"x"}', (EventKind.MESSAGE, 5, None), 9)
    await n2.wait(1)
    assert n2.frames == [(8, '{"type":"x"}', (EventKind.MESSAGE, 5, None), 9)]
    assert n1.frames == []  # its own publish is not delivered to itself
    online = await one.online([7, 8, 99])
    assert sorted(online) == [7, 8] and online[7].username == "seven"
    assert await one.leave(7, 0) is Leave.ELSEWHERE
    assert await two.leave(7, 0) is Leave.OFFLINE
    assert await two.leave(8, 1) is Leave.GRACE
    assert await one.join(8, "eight", None) is False  # back within grace, elsewhere
    assert await two.settle(8) is False  # so no user_offline
    local = TokenBucket(100, 100)
    waits = [await one.take(3, 1, local), await two.take(3, 1, local),
             await one.take(3, 1, local), await two.take(3, 1, local)]
    assert waits[:3] == [0, 0, 0] and waits[3] > 0


async def test_redis_twin_dead_node_typing(redis_server: RedisServer) -> None:
    """Redis: the typing states of a node that stops beating reach one live node's
    on_typing_gone, once, with the username; not a state that ended, nor one a live node
    also holds (contract 7)."""
    from backplane_redis import PREFIX, RedisBackplane

    ended: list[list[TypingState]] = []
    arrived = asyncio.Event()

    def record(states: list[TypingState]) -> None:
        ended.append(states)
        arrived.set()

    one, two, three = nodes = [
        RedisBackplane(redis_server.url, node_ttl_seconds=1, heartbeat_seconds=0.2,
                       on_typing_gone=record) for _ in range(3)]
    n2, n3 = Recorder(), Recorder()
    for bp, node in zip(nodes, (Recorder(), n2, n3), strict=True):
        await bp.start(node, lambda change: None)
        assert bp.up
    typing = TypingState(TypingTopic.CONVERSATION, 5, 7, "seven")
    pitch = TypingState(TypingTopic.PITCH, 41, 7, None)
    held = TypingState(TypingTopic.CONVERSATION, 6, 7, "seven")
    over = TypingState(TypingTopic.CONVERSATION, 5, 9, "nine")
    try:
        await two.join(70, "seventy", None)
        await three.join(71, "seventy-one", None)
        for state in (typing, pitch, held, over):
            one.typing(state, True)
        one.typing(over, False)
        one.publish([70], "{}", None, None)
        two.typing(held, True)
        two.publish([71], "{}", None, None)
        # A node writes its typing changes before the frames published after them.
        await n2.wait(1)
        await n3.wait(1)
        assert len(await one.redis.hgetall(f"{PREFIX}typing:{one.node_id}")) == 3
        # Killed: no deregistration, the heartbeat stops.
        assert one.task is not None
        one.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await one.task
        async with asyncio.timeout(TIMEOUT):
            await arrived.wait()
        await two._sweep()  # both survivors sweep again: the claim is not repeated
        await three._sweep()
        assert len(ended) == 1
        assert sorted(ended[0], key=lambda s: s.topic.value) == [typing, pitch]
        assert not await two.redis.exists(f"{PREFIX}typing:{one.node_id}")
    finally:
        await one.redis.aclose()
        await two.stop()
        await three.stop()
