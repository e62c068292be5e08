"""What is flowing: a record per TCP connection, for ``/flows``, the close log and ``tunnel flows``.

A record is made only when asked for (a scrape of ``/flows``) or once when a
connection closes, from what every connection keeps anyway (its byte counts
and which directions are open), so nothing here runs per chunk. The closed
ones are kept in one ring of :data:`RECENT` records for the whole process.

Each closed connection is logged once at INFO by the ``tunnel.flows`` logger,
with the record as the log record's ``flow`` attribute; ``--log-format json``
writes it as JSON fields (:class:`JsonFormatter`).

``tunnel flows --admin HOST:PORT`` renders ``/flows`` as a table that
refreshes, like ``top``; ``--once`` prints it once.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .stats import BridgeStats, Carried

logger = logging.getLogger(__name__)

#: Closed connections kept for ``/flows``, across all bridges.
RECENT = 100

Record = dict[str, Any]


def record(stats: BridgeStats, conn: Carried, started: float, now: float) -> Record:
    """The record of one connection, open or just closed."""
    return {
        "bridge": stats.name,
        "connection": conn.name,
        "client": conn.name.split("@", 1)[0],
        "far_end": stats.far_end,
        "dialect": conn.dialect,
        "to_peer": {"open": conn.write_open, "bytes": conn.bytes_in},
        "from_peer": {"open": conn.read_open, "bytes": conn.bytes_out},
        "age_s": round(now - started, 3),
    }


def refused_record(stats: BridgeStats, name: str) -> Record:
    """The record of a connection refused before it had a dialect."""
    return {
        "bridge": stats.name,
        "connection": name,
        "client": name.split("@", 1)[0],
        "far_end": stats.far_end,
        "dialect": "none",
        "to_peer": {"open": False, "bytes": 0},
        "from_peer": {"open": False, "bytes": 0},
        "age_s": 0.0,
    }


class FlowLog:
    """The last :data:`RECENT` closed connections, and their log lines."""

    def __init__(self) -> None:
        self.recent: collections.deque[Record] = collections.deque(maxlen=RECENT)

    def closed(self, flow: Record, reason: str) -> None:
        flow = {
            **flow,
            "reason": reason,
            "closed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        }
        self.recent.append(flow)
        logger.info(
            "flow closed (%s): %s %s <-> %s, %d bytes to it, %d from it, %.3fs",
            reason,
            flow["bridge"],
            flow["client"],
            flow["far_end"],
            flow["to_peer"]["bytes"],
            flow["from_peer"]["bytes"],
            flow["age_s"],
            extra={"flow": flow},
        )


#: The process's one log of closed connections.
FLOW_LOG = FlowLog()


def snapshot(bridges: Sequence[BridgeStats]) -> dict[str, list[Record]]:
    """What ``/flows`` answers: every open connection, and the recently closed ones."""
    now = time.monotonic()
    return {
        "open": [
            record(stats, conn, started, now)
            for stats in bridges
            for conn, started in list(stats.live.items())
        ],
        "closed": list(FLOW_LOG.recent),
    }


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and a flow's fields."""

    def format(self, entry: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(entry.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": entry.levelname,
            "logger": entry.name,
            "message": entry.getMessage(),
        }
        flow = getattr(entry, "flow", None)
        if flow is not None:
            out["flow"] = flow
        if entry.exc_info:
            out["exception"] = self.formatException(entry.exc_info)
        return json.dumps(out)


# -- tunnel flows ------------------------------------------------------------------
COLUMNS = ("bridge", "client", "far end", "dialect", "to", "from", "bytes to", "bytes from", "age")


def rows(flows: dict[str, list[Record]]) -> list[tuple[str, ...]]:
    """The table's rows: open connections first, then the recently closed, newest first."""

    def row(flow: Record, state: str | None) -> tuple[str, ...]:
        def way(side: Record) -> str:
            return state or ("open" if side["open"] else "ended")

        return (
            flow["bridge"],
            flow["client"],
            flow["far_end"],
            flow["dialect"],
            way(flow["to_peer"]),
            way(flow["from_peer"]),
            f"{flow['to_peer']['bytes']:,}",
            f"{flow['from_peer']['bytes']:,}",
            f"{flow['age_s']:.1f}s",
        )

    return [row(f, None) for f in flows["open"]] + [
        row(f, f["reason"]) for f in reversed(flows["closed"])
    ]


def render(flows: dict[str, list[Record]]) -> str:
    table = [COLUMNS, *rows(flows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]
    head = f"{len(flows['open'])} open, {len(flows['closed'])} recently closed"
    return "\n".join([head, *lines]) + "\n"


def fetch(admin: str) -> dict[str, list[Record]]:
    # Only the admin endpoint the user names, over plain HTTP, as the probes use it.
    with urllib.request.urlopen(f"http://{admin}/flows", timeout=10) as answer:
        flows: dict[str, list[Record]] = json.load(answer)
    return flows


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tunnel flows", description="Show the connections a tunnel carries, refreshed."
    )
    parser.add_argument(
        "--admin", required=True, metavar="HOST:PORT", help="the tunnel's --admin endpoint"
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="print the table once and exit")
    args = parser.parse_args(argv)
    if not 0.1 <= args.interval <= 3600:
        parser.error(f"--interval {args.interval}: expected 0.1 to 3600 seconds")
    try:
        while True:
            table = render(fetch(args.admin))
            if args.once:
                sys.stdout.write(table)
                return 0
            sys.stdout.write("\x1b[H\x1b[2J" + table)  # home and clear, as top does
            sys.stdout.flush()
            time.sleep(args.interval)
    except OSError as exc:
        print(f"tunnel flows: error: http://{args.admin}/flows: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
