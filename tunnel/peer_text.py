"""Logging what peers send: escaped, shortened and rate-limited.

A peer chooses link names, detach descriptions, close conditions, HTTP
headers and the bytes of garbage connections. Logged as they come, a newline
in one of them forges a log line, and a peer that fails on purpose a
thousand times a second floods the log. So:

- :func:`printable` is applied to every peer-supplied string we log: control
  characters (and backslashes, so the escaping cannot itself be forged) come
  out as ``\\xNN``, and the text is cut at :data:`MAX_LOGGED` characters.
- :class:`LogLimiter` says a (peer, reason) pair once, then only counts it;
  the counts are on ``/metrics`` as ``tunnel_log_suppressed_total`` by reason.
  It remembers at most :data:`MAX_KEYS` pairs; past that a new pair is
  counted under its reason without being logged, so memory stays bounded
  whatever the number of peers.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

#: The most characters of one peer-supplied string that reach the log.
MAX_LOGGED = 200
#: The most (peer, reason) pairs a limiter remembers.
MAX_KEYS = 4096

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def printable(text: object, limit: int = MAX_LOGGED) -> str:
    """``text`` as one safe log token: control characters escaped, at most ``limit`` long."""
    if text is None:
        return "None"
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("latin-1")
    value = _UNSAFE.sub(_escape, str(text))
    if len(value) > limit:
        return f"{value[:limit]}...({len(value) - limit} more)"
    return value


class LogLimiter:
    """Logs each (peer, reason) once, and counts the repeats."""

    def __init__(self, logger: logging.Logger, max_keys: int = MAX_KEYS) -> None:
        self.logger = logger
        self.max_keys = max_keys
        self.said: set[tuple[str, str]] = set()
        #: Messages not logged because they repeated, by reason.
        self.suppressed: Counter[str] = Counter()

    def log(
        self,
        level: int,
        peer: str,
        reason: str,
        message: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Log ``message`` unless ``peer`` was already told off for ``reason``; True if logged."""
        key = (peer, reason)
        if key in self.said or len(self.said) >= self.max_keys:
            self.suppressed[reason] += 1
            return False
        self.said.add(key)
        self.logger.log(
            level, message + " (repeats are counted, not logged)", *args, exc_info=exc_info
        )
        return True

    def forget(self, peer: str) -> None:
        """``peer`` has gone: a later peer with its name is told afresh."""
        self.said = {key for key in self.said if key[0] != peer}


#: The process's limiter for peer-caused failures; its counts are on /metrics.
PEER_LOG = LogLimiter(logging.getLogger("tunnel.peers"))
