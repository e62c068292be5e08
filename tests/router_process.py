"""``python tests/router_process.py PORT``: the stand-in skupper-router in a process of its own.

For what a router does that a thread in the test process cannot: be killed
(-9) and restarted on the same port, or frozen (SIGSTOP) and let go. It
prints ``listening on PORT`` once it accepts, and stops on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from skrouter_peer import SkRouterPeer


def main() -> None:
    peer = SkRouterPeer()
    port = peer.start(int(sys.argv[1]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"listening on {port}", flush=True)
    stop.wait()
    peer.stop()


if __name__ == "__main__":
    main()
