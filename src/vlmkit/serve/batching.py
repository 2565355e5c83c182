"""Micro-batching: requests of one kind for one model that arrive together share one model call.

A `Batcher` owns an asyncio queue and one worker task. The worker takes the first waiting
request, then keeps collecting for `window_s` (or until `max_batch` are in hand), groups what it
has by key (requests that must decode with the same settings share a key) and runs each group
through `run_batch(items) -> results` in the model's executor thread, so the event loop stays
free while the model works. Requests that queue up while a batch runs form the next batch, which
is where the throughput comes from under load. If a merged batch fails, its requests are retried
one by one, so one bad request fails alone.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any, Callable, Hashable


class Batcher:
    """Batches calls of `run_batch` (a list of items -> a list of results, same order)."""

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], executor: Executor, max_batch: int, window_s: float,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.run_batch, self.executor = run_batch, executor
        self.max_batch, self.window_s = max(1, max_batch), max(0.0, window_s)
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: Any, key: Hashable = ()) -> Any:
        """Queue `item` and wait for its result (or its exception)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # started on first use inside the server's loop (again, should the loop change)
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        self._queue.put_nowait((key, item, future))
        return await future

    async def _collect(self) -> list[tuple]:
        """The first waiting request and whatever joins it within the window, at most max_batch."""
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            groups: dict[Hashable, list[tuple]] = {}
            for key, item, future in batch:
                if not future.done():  # its request timed out or its client left: skip the work
                    groups.setdefault(key, []).append((item, future))
            for members in groups.values():
                await self._run(loop, members)

    async def _run(self, loop, members: list[tuple]) -> None:
        items = [item for item, _ in members]
        try:
            results = await loop.run_in_executor(self.executor, self.run_batch, items)
        except Exception as error:  # noqa: BLE001 - handed to the waiting requests, never lost
            if len(members) > 1:
                for member in members:  # find the request that failed; the others get their results
                    await self._run(loop, [member])
                return
            results, error_of_all = None, error
        else:
            error_of_all = None
        if self.on_batch is not None:
            self.on_batch(len(members))
        for index, (_, future) in enumerate(members):
            if future.done():
                continue
            if error_of_all is not None:
                future.set_exception(error_of_all)
            else:
                future.set_result(results[index])
