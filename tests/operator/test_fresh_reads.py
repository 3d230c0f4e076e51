"""fresh_reads.Coalesced: shared reads that each began after every one of their callers asked
(the I1 fence's freshness, batched), failures delivered to all, one cancelled caller not
cancelling the read the others wait for."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import pytest

from kubehv.operator import fresh_reads


class Source:
    """A store whose value changes; every read returns (read number, value when it began)."""

    def __init__(self) -> None:
        self.value = 0
        self.began: list[float] = []
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def read(self, key: Hashable) -> tuple[int, int, Hashable]:
        self.began.append(asyncio.get_running_loop().time())
        seen = self.value
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return len(self.began), seen, key


def test_callers_share_only_reads_that_began_after_they_asked() -> None:
    async def scenario() -> None:
        src = Source()
        reads = fresh_reads.Coalesced(src.read)
        first = [asyncio.create_task(reads.get("ns")) for _ in range(5)]
        await asyncio.sleep(0)  # the read starts; the five share it
        await asyncio.sleep(0)
        assert len(src.began) == 1
        src.value = 1  # a write lands while read 1 is in flight
        late = [asyncio.create_task(reads.get("ns")) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(src.began) == 1, "a late caller must not start a read beside the first"
        src.release.set()
        got_first = await asyncio.gather(*first)
        got_late = await asyncio.gather(*late)
        assert set(got_first) == {(1, 0, "ns")}
        # The late callers asked after the write: they get read 2, which saw it.
        assert set(got_late) == {(2, 1, "ns")}
        assert reads.reads == 2
        other = await reads.get("other")  # keys are independent
        assert other == (3, 1, "other")

    asyncio.run(scenario())


def test_a_failed_read_fails_all_its_callers_and_the_next_read_is_new() -> None:
    async def scenario() -> None:
        src = Source()
        reads = fresh_reads.Coalesced(src.read)
        src.fail = RuntimeError("apiserver down")
        waiting = [asyncio.create_task(reads.get()) for _ in range(3)]
        await asyncio.sleep(0)
        src.release.set()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        src.fail = None
        assert await reads.get() == (2, 0, None)

    asyncio.run(scenario())


def test_one_cancelled_caller_leaves_the_read_to_the_others() -> None:
    async def scenario() -> None:
        src = Source()
        reads = fresh_reads.Coalesced(src.read)
        a = asyncio.create_task(reads.get())
        b = asyncio.create_task(reads.get())
        await asyncio.sleep(0)
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        src.release.set()
        assert await b == (1, 0, None)

    asyncio.run(scenario())
