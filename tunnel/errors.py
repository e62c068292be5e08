"""Exception types.

``ConfigError`` is anything wrong with what the user gave us (specs, the
connection file, options); it always names the offending part and maps to
exit status 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class TunnelError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(TunnelError, ValueError):
    """A spec, option or connection file is invalid; the message says which part."""


class StartupError(TunnelError):
    """Something the process needs to start cannot be had (a port in use); exit status 1."""


@contextlib.contextmanager
def naming(what: str) -> Iterator[None]:
    """Turn an OSError inside into a :class:`StartupError` that says it was ``what``."""
    try:
        yield
    except OSError as exc:
        raise StartupError(f"{what}: {exc.strerror or exc}") from None
