"""Bad input from the network: counted every time, logged once per source per interval.

A datagram that makes a decoder raise is the peer's problem, not a bug of
ours: it is dropped and counted, and logged at WARNING without a traceback,
at most once per source per ``interval`` (the next line says how many were
suppressed meanwhile). A flood of bad datagrams therefore costs a bounded
number of log lines, whatever it contains.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

#: Sources remembered at most (least recently logged forgotten first).
MAX_SOURCES = 1024
#: Longest exception text logged (the text may quote attacker bytes).
MAX_TEXT = 120


class BadInputLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        count: Callable[[str], None] | None = None,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._count = count
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()
        #: every report, by reason
        self.counts: dict[str, int] = {}

    def report(self, source: str, reason: str, error: BaseException | None = None) -> None:
        """Count one bad input from ``source``; log it unless that source was logged
        within the interval."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if self._count is not None:
            self._count(reason)
        now = self._clock()
        last = self._last.get(source)
        if last is not None and now - last[0] < self.interval:
            self._last[source] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        self._last[source] = (now, 0)
        self._last.move_to_end(source)
        while len(self._last) > MAX_SOURCES:
            self._last.popitem(last=False)
        what = "" if error is None else f": {type(error).__name__}: {str(error)[:MAX_TEXT]}"
        more = f" ({suppressed} more from it since the last line)" if suppressed else ""
        self.logger.warning("bad input from %s dropped (%s)%s%s", source, reason, what, more)
