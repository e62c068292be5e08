"""Counts of live per-connection objects, for telling a leak from fragmentation.

When a long-running process grows, three causes look alike from outside:
objects of ours that outlive their connection, proton objects that are
never freed, and a heap that fragments while the live set stays flat. The
counts here separate the first from the rest: every class that exists once
per connection (or per link, per request) is marked :func:`counted`, which
adds one to :data:`LIVE` when an instance is made and takes it off when the
instance is freed. After a burst of connections has ended, each count must
be back where it was. proton's own objects are counted by
:func:`tunnel.amqp.engine.proton_census`, and the heap by
:func:`tunnel.memory.heap`; ``/metrics`` shows all three.

The cost is one counter update when an object is made and one when it is
freed: nothing per byte or per event.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: Live instances by kind, for every class marked :func:`counted`.
LIVE: collections.Counter[str] = collections.Counter()


def counted(kind: str) -> Callable[[type[T]], type[T]]:
    """Count the live instances of the class under ``kind`` in :data:`LIVE`."""

    def mark(cls: type[T]) -> type[T]:
        assert "__del__" not in vars(cls), f"{cls.__name__} has a finalizer of its own"
        LIVE[kind] += 0  # listed from the start, at zero
        made = cls.__init__

        @functools.wraps(made)
        def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
            # Counted before the constructor runs: __del__ runs even if it raises.
            LIVE[kind] += 1
            made(self, *args, **kwargs)

        def uncount(self: Any) -> None:
            LIVE[kind] -= 1

        cls.__init__ = counting_init  # type: ignore[method-assign]
        cls.__del__ = uncount  # type: ignore[attr-defined]
        return cls

    return mark
