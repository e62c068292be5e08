"""tunnel: carry TCP connections over AMQP 1.0, wire-compatible with skupper-proxy."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
