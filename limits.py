"""Rate limiting: a token bucket per user and a flood detector per connection. No I/O."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; each accepted frame takes one."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> float:
        """Take a token. Returns 0 when granted, else the seconds until one is available."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class FloodGuard:
    """Counts frames dropped on one connection; ``drop()`` says when it is time to disconnect."""

    def __init__(
        self, max_dropped: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_dropped = max_dropped
        self.window = window
        self.clock = clock
        # Bounded: once it holds more than max_dropped stamps the connection is closed.
        self.stamps: deque[float] = deque(maxlen=max_dropped + 1)

    def drop(self) -> bool:
        """Record one dropped frame; True when more than max_dropped fell within the window."""
        now = self.clock()
        self.stamps.append(now)
        while self.stamps and self.stamps[0] < now - self.window:
            self.stamps.popleft()
        return len(self.stamps) > self.max_dropped
