"""One progress line per interval for long loops (works in logs, CI and forked workers alike)."""
from __future__ import annotations

import logging
import time


class Progress:
    """`p.update(n_items, n_tokens)` logs `label: items, tokens, tokens/s` at most every `every` s."""

    def __init__(self, label: str, log: logging.Logger, every: float = 10.0, total: int | None = None, unit: str = "lines"):
        self.label, self.log, self.every, self.total, self.unit = label, log, every, total, unit
        self.items = self.tokens = 0
        self.start = self.last = time.monotonic()

    def update(self, items: int, tokens: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line())

    def line(self) -> str:
        dt = max(time.monotonic() - self.start, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        rate = f", {self.tokens:,} tokens ({self.tokens / dt:,.0f} tokens/s)" if self.tokens else ""
        return f"{self.label}: {self.items:,}{of} {self.unit}{rate}, {dt:.0f} s"

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start


def format_duration(seconds: float) -> str:
    """`95` -> `1m35s`; under a minute, `42s`."""
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
