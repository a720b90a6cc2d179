"""Rate limiting: a token bucket per user and a flood detector per connection. No I/O."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; each accepted request takes its cost (one for
    a frame; a fraction for a cheap frame; the recipient count for a delivery budget)."""

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def take(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens. Returns 0 when granted, else the seconds until that many are
        available (nothing is taken then). A cost above ``burst`` is never granted."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def refund(self, cost: float) -> None:
        """Give back what ``take`` granted for work that then did not happen."""
        self.tokens = min(self.burst, self.tokens + cost)


class FloodGuard:
    """Counts frames dropped on one connection; ``drop()`` says when it is time to disconnect."""

    __slots__ = ("clock", "max_dropped", "stamps", "window")

    def __init__(
        self, max_dropped: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_dropped = max_dropped
        self.window = window
        self.clock = clock
        # Bounded: once it holds more than max_dropped stamps the connection is closed. Made
        # at the first drop: a deque costs ~700 bytes, and most connections never drop one.
        self.stamps: deque[float] | None = None

    def drop(self) -> bool:
        """Record one dropped frame; True when more than max_dropped fell within the window."""
        now = self.clock()
        if self.stamps is None:
            self.stamps = deque(maxlen=self.max_dropped + 1)
        stamps = self.stamps
        stamps.append(now)
        while stamps and stamps[0] < now - self.window:
            stamps.popleft()
        return len(stamps) > self.max_dropped
