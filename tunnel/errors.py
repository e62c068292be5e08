"""Exception types.

``ConfigError`` is anything wrong with what the user gave us (specs, the
connection file, options); it always names the offending part and maps to
exit status 2.
"""

from __future__ import annotations


class TunnelError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(TunnelError, ValueError):
    """A spec, option or connection file is invalid; the message says which part."""
