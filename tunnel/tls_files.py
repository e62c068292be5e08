"""TLS contexts that follow their files: a rotated certificate is used without a restart.

A Skupper site's certificates are a Kubernetes secret mounted as files. When
the secret is updated, the files change under the running process (the
kubelet swaps a symlink to a new directory). Each new AMQP connection, a
reconnect to the router or a connection the direct-mode listener accepts,
asks :meth:`ReloadingContext.current` for its context, which is built anew
when any of its files changed since the last build: another inode, size or
modification time. Connections already up keep the context they were made
with, as TLS has them do.

Files caught half-written, or a key that does not match its certificate,
do not load: the previous context stays in use and a warning names what
failed, once per change on disk. A later change is tried again.

The cost is a ``stat`` of each file (at most three) per new AMQP
connection; nothing per TCP connection.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import ConfigError

logger = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


class ReloadingContext:
    """An :class:`ssl.SSLContext` rebuilt by ``build`` whenever one of ``files`` changes."""

    def __init__(
        self, build: Callable[[], ssl.SSLContext], files: Iterable[Path | None], what: str
    ) -> None:
        self._build = build
        self._files = tuple(path for path in files if path is not None)
        #: What the files are for, in the log: "the router connection", say.
        self.what = what
        self._stamp = self._stamp_now()
        # At start a failure is the caller's: a ConfigError naming the file.
        self._context = build()
        self._refused: _Stamp | None = None

    def current(self) -> ssl.SSLContext:
        """The context for a new connection, rebuilt first if its files changed."""
        stamp = self._stamp_now()
        if stamp not in (self._stamp, self._refused):
            try:
                context = self._build()
            except (ConfigError, OSError) as exc:  # ssl.SSLError is an OSError
                self._refused = stamp
                logger.warning(
                    "TLS files for %s changed but do not load; still using the previous ones: %s",
                    self.what,
                    exc,
                )
            else:
                self._context, self._stamp, self._refused = context, stamp, None
                logger.info("TLS files for %s changed: new connections use them", self.what)
        return self._context

    def _stamp_now(self) -> _Stamp:
        stamps = []
        for path in self._files:
            try:
                found = path.stat()
            except OSError:
                stamps.append((0, 0, 0))  # gone for now: a change, tried when it is back
            else:
                stamps.append((found.st_ino, found.st_size, found.st_mtime_ns))
        return tuple(stamps)
