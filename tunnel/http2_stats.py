"""Per-bridge counters of the HTTP/2 bridges, read by ``/metrics`` at scrape time."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

#: The status classes counted, and ``other`` for anything outside 1xx-5xx.
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


@dataclass(slots=True)
class Http2Stats:
    """Counted where the event happens; nothing per byte but two additions."""

    name: str
    requests: int = 0
    resets: int = 0
    #: Data bytes of requests carried (client to backend) and of responses.
    request_bytes: int = 0
    response_bytes: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)

    def count_status(self, status: int) -> None:
        kind = f"{status // 100}xx" if 100 <= status < 600 else "other"
        self.statuses[kind] += 1
