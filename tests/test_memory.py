"""The periodic hand-back of freed heap memory (tunnel.memory)."""

from __future__ import annotations

import asyncio

from tunnel import memory


async def test_releaser_runs_on_schedule_until_stopped() -> None:
    assert memory._TRIM is not None, "glibc's malloc_trim not found on this Linux machine"
    releaser = memory.MemoryReleaser(period=0.01)
    releaser.start()
    first = releaser.timer
    await asyncio.sleep(0.1)
    assert releaser.timer is not None and releaser.timer is not first  # it ran and re-armed
    releaser.stop()
    assert releaser.timer is None
