"""Fresh reads shared by every owner waiting at the same moment (the I1 fence, batched).

Why this module exists: before an irreversible act (a start) the owner of an instance must
decide on a *fresh* read -- one that began after it chose to re-read, never the watch cache
(owner_logic, invariant I1): the instance, its open Migration, the node's drain flag. Done
per instance that is three API calls per start; with 1000 instances arriving at once the
fence alone dominated the time to Running. The Migrations of a namespace and the node's
NodeHypervisor are the same for every owner waiting at that moment, so one read serves them
all -- provided it *began* after each of them asked. :class:`Coalesced` guarantees exactly
that: a caller joins the next read that has not started yet (never one already in flight,
whose answer may predate the caller's decision); while a read is in flight, new callers
queue for the one after it. Failures reach every caller of that read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalesced(Generic[T]):
    """One read per key at a time; callers share the next read that starts after they ask."""

    def __init__(self, fetch: Callable[[Hashable], Awaitable[T]]) -> None:
        self._fetch = fetch
        self._next: dict[Hashable, asyncio.Future[T]] = {}
        """Per key: the read that has not started yet (what a new caller joins)."""
        self._running: set[Hashable] = set()
        self.reads = 0
        """Reads made (tests and the bench compare this with the number of callers)."""

    async def get(self, key: Hashable = None) -> T:
        fut = self._next.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._next[key] = fut
            if key not in self._running:
                self._running.add(key)
                asyncio.get_running_loop().create_task(self._reads(key), name=f"fresh {key}")
        # shield: one caller being cancelled must not cancel the read the others wait for
        return await asyncio.shield(fut)

    async def _reads(self, key: Hashable) -> None:
        try:
            while (fut := self._next.pop(key, None)) is not None:
                # From here on, new callers create the next future: this read began after
                # every caller of ``fut`` asked.
                self.reads += 1
                try:
                    result = await self._fetch(key)
                except asyncio.CancelledError:
                    fut.cancel()
                    raise
                except Exception as exc:
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: no "never retrieved" noise if all left
                else:
                    fut.set_result(result)
        finally:
            self._running.discard(key)
            if key in self._next:  # cancelled with callers queued: fail them, do not hang
                self._next.pop(key).cancel()
