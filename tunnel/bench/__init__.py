"""The benchmark harness: ``python -m tunnel.bench``.

It compares, on loopback and on the same workloads, three paths to the same
servers: direct TCP, a plain two-hop uvloop byte relay (the Python limit for
this topology), and a tunnel pair in direct mode; some rows again with a
delaying hop (``tunnel.bench.delay``) in each path. Every side runs in its own
process: the servers, the hops, and the client (this process).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def rss_kib(proc: subprocess.Popen[bytes]) -> int:
    """A child process's resident set size, in KiB (0 once it has gone)."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) if match else 0
