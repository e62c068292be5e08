"""A proton reactor listening on 127.0.0.1 in a background thread, for peers that play a router.

Threading: proton objects live in the reactor thread only. The test thread
reads immutable snapshots that the peer records (:meth:`events`,
:meth:`wait_until`) and acts through :meth:`call`, which runs a function in
the reactor thread by way of an ``EventInjector``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, Self, TypeVar

from proton.reactor import ApplicationEvent, Container, EventInjector

T = TypeVar("T")

_CALL_EVENT = "peer_call"


class ReactorThread:
    """Mixed into a proton handler: runs a Container with it as the handler."""

    container_id = "reactor-peer"

    def __init__(self) -> None:
        self.port = 0
        self._cond = threading.Condition()
        self._events: list[Any] = []
        self._calls: collections.deque[
            tuple[Callable[[Any], Any], concurrent.futures.Future[Any]]
        ] = collections.deque()
        self._container: Any = None
        self._acceptor: Any = None
        self._injector: Any = None
        self._thread: threading.Thread | None = None
        self.crashed: BaseException | None = None

    # -- lifecycle (test thread) ------------------------------------------------
    def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1 (``port``, or one the OS chooses), run the reactor thread.

        Returns the port.
        """
        container = Container(self)
        container.container_id = self.container_id
        self._acceptor = container.acceptor("127.0.0.1", str(port))
        # Acceptor keeps its listening socket as the delegate of its selectable.
        self.port = int(self._acceptor._selectable.getsockname()[1])
        self._injector = EventInjector()
        container.selectable(self._injector)
        self._container = container
        self._thread = threading.Thread(target=self._run, name=self.container_id, daemon=True)
        self._thread.start()
        return self.port

    def _run(self) -> None:
        try:
            self._container.run()
        except BaseException as exc:
            self.crashed = exc
            raise
        finally:
            with self._cond:
                self._cond.notify_all()

    def _check_alive(self) -> None:
        if self.crashed is not None:
            raise RuntimeError(f"the reactor thread crashed: {self.crashed!r}") from self.crashed

    def shut_down(self) -> None:
        """Reactor thread: close what the peer holds, so that the reactor can end."""
        self._acceptor.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Close everything the peer holds and let the reactor thread end."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            self.call(lambda peer: peer.shut_down(), timeout=timeout)
        self._injector.close()
        thread.join(timeout)
        if thread.is_alive():
            # The daemon never answered the close: stop the reactor outright.
            self._injector = None
            self._container.stop()
            thread.join(timeout)

    def call(self, fn: Callable[[Self], T], timeout: float = 5.0) -> T:
        """Run ``fn(self)`` in the reactor thread and return its result."""
        self._check_alive()
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the reactor thread is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.append((fn, future))
        self._injector.trigger(ApplicationEvent(_CALL_EVENT))
        return future.result(timeout)

    # -- observation (test thread) --------------------------------------------
    def events(self) -> list[Any]:
        with self._cond:
            return list(self._events)

    def wait_until(self, check: Callable[[list[Any]], bool], timeout: float = 10.0) -> None:
        """Wait until ``check(events)`` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check(self._events):
                self._check_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n  ".join(repr(e) for e in self._events)
                    raise TimeoutError(f"condition not met after {timeout}s; seen:\n  {seen}")
                self._cond.wait(left)

    # -- reactor thread -------------------------------------------------------------
    def _record(self, event: object) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def on_peer_call(self, _event: Any) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            try:
                future.set_result(fn(self))
            except Exception as exc:  # handed to the calling thread
                future.set_exception(exc)
