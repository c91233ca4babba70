"""Logging setup (structlog) and rate-limited reporting of dropped packets.

Bad input from the network must never flood the log: each drop reason is logged at most once per
``interval`` seconds, with the number of drops of that reason since the last line. Reasons that are
normal protocol behaviour (dummy packets, NAT keepalives) are only counted.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog

from ipsecstack.errors import SILENT_REASONS


def configure(fmt: str = "console", level: str = "info") -> None:
    """Set up structlog: ``console`` for humans, ``json`` for machines."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer())
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class DropReporter:
    """Counts drops by reason and logs each reason at most once per ``interval`` seconds."""

    def __init__(self, log: Any, interval: float = 10.0, clock: Any = time.monotonic) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self.logged = 0

    def report(self, where: str, dropped: list[tuple[str, bytes]]) -> None:
        if not dropped:
            return
        now = self._clock()
        for reason, pkt in dropped:
            if reason in SILENT_REASONS:
                continue
            key = f"{where}:{reason}"
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                continue
            self._last[key] = now
            extra = self._suppressed.pop(key, 0)
            self.logged += 1
            # the packet's length only: never its bytes (they may be plaintext)
            self._log.warning("packet dropped", direction=where, reason=reason, length=len(pkt), suppressed=extra)
