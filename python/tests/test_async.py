"""`AsyncFleet`: the same calls, awaited."""

from __future__ import annotations

import asyncio

import pytest

from fleetbox import AsyncFleet, JobFailed


def cube(x):
    return x ** 3


async def test_async_run_map_and_jobs(coordinator):
    async with AsyncFleet() as fleet:
        results = await asyncio.gather(*(fleet.run(f"print({i} * 2)") for i in range(4)))
        assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(4)]
        assert await fleet.map(cube, [1, 2, 3]) == [1, 8, 27]
        job = await fleet.submit({"name": "n", "code": "print(7)", "shards": {"count": 3}})
        assert await job.result(timeout=60) == [7, 7, 7]
        assert len(await job.shards()) == 3
        bad = await fleet.submit({"name": "x", "code": "import sys; sys.exit(1)", "shards": {"count": 1}, "max_attempts": 1})
        with pytest.raises(JobFailed):
            await bad.result(timeout=60)


async def test_async_sessions_keep_their_names(coordinator):
    from fleetbox import SessionLost

    async with AsyncFleet() as fleet:
        async with await fleet.session(timeout=10) as s:
            await s.run("total = 0")
            for i in range(3):
                await s.run(f"total += {i}")
            r = await s.run("print(total)")
            assert r.stdout == "3\n", r.report
        assert s.state == "closed"
        with pytest.raises(SessionLost):
            await s.run("print(total)")
