"""Prometheus text exposition (format 0.0.4) for a handful of counters, gauges, histograms."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.total}')
        lines.append(f"{name}_sum {self.sum:.6f}")
        lines.append(f"{name}_count {self.total}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self.frames_in: defaultdict[str, int] = defaultdict(int)
        self.frames_out: defaultdict[str, int] = defaultdict(int)
        self.errors: defaultdict[str, int] = defaultdict(int)
        self.messages_stored = 0
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def render(
        self, gauges: dict[str, tuple[str, float]], counters: dict[str, tuple[str, int]]
    ) -> str:
        lines: list[str] = []
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        for name, (help_text, count) in counters.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {count}"]
        lines += _labelled(
            "pitchey_frames_in_total", "Frames received, by wire type (invalid: not parsed).",
            "type", self.frames_in,
        )
        lines += _labelled(
            "pitchey_frames_out_total", "Frames sent, by type.", "type", self.frames_out
        )
        lines += _labelled("pitchey_errors_total", "Error replies, by code.", "code", self.errors)
        lines += [
            "# HELP pitchey_messages_stored_total Messages committed to the database.",
            "# TYPE pitchey_messages_stored_total counter",
            f"pitchey_messages_stored_total {self.messages_stored}",
        ]
        lines += self.commit_seconds.render(
            "pitchey_commit_seconds", "Time to commit one group-commit batch."
        )
        lines += self.batch_size.render(
            "pitchey_commit_batch_size", "Writes committed together in one transaction."
        )
        return "\n".join(lines) + "\n"


def _labelled(name: str, help_text: str, label: str, values: dict[str, int]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    for key in sorted(values):
        safe = key.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'{name}{{{label}="{safe}"}} {values[key]}')
    return lines
