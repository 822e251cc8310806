"""At most one line a minute per kind for a library that logs each failed attempt.

OpenTelemetry's exporters log every failed export (and each retry of it): with the collector
down, a steady stream of warnings for as long as it stays down, unlike embedplex's own
refusals, logged at most once a second each. ``OncePerInterval`` lets one record of each kind
(logger, level, message template) through per interval and says, on the next one it lets
through, how many it held back. It sits on the root handler only while spans are exported
(``throttle_span_export_logs``): every other server pays nothing for it per log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

INTERVAL_S = 60.0


class OncePerInterval(logging.Filter):
    """Pass the first record of each kind from loggers under ``prefix``, then one per
    ``interval_s``; records of other loggers pass untouched."""

    def __init__(
        self,
        prefix: str = "opentelemetry",
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.interval_s = interval_s
        self.clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # kind -> (shown, held)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        seen = self._seen.get(kind)
        if seen is not None and now - seen[0] < self.interval_s:
            self._seen[kind] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg = (
                f"{record.getMessage()} ({seen[1]} more like it in the last "
                f"{now - seen[0]:.0f} s not logged)"
            )
            record.args = None
        self._seen[kind] = (now, 0)
        return True


def throttle_span_export_logs() -> None:
    """Put a ``OncePerInterval`` on the root logger's handlers (once each)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, OncePerInterval) for f in handler.filters):
            handler.addFilter(OncePerInterval())
