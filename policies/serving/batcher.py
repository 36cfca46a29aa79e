"""`Batcher`: requests in, batches out, one future per request (after Ray Serve's `_BatchQueue`).

    batcher = Batcher(handle, max_batch=8, batch_wait_ms=5)   # handle(items) -> one result per item
    batcher.start()                                            # inside a running event loop
    result = await batcher.submit(item)
    await batcher.stop()

The loop takes the first waiting item, collects up to `max_batch` within `batch_wait_ms`, and calls
`handle` in the executor. Every future resolves with its own result, or its own exception when `handle`
returns one for it; a failing or wrong-length `handle` call fails every future of that batch.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import Executor
from typing import Any, Callable, Sequence


class Batcher:
    def __init__(self, handle: Callable[[list[Any]], Sequence[Any]], max_batch: int, batch_wait_ms: float,
                 executor: Executor | None = None) -> None:
        if max_batch < 1 or batch_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and batch_wait_ms >= 0, got {max_batch}, {batch_wait_ms}")
        self.handle, self.max_batch, self.wait_s, self.executor = handle, max_batch, batch_wait_ms / 1e3, executor
        self.sizes: Counter[int] = Counter()  # batch size -> batches served (bounded: at most max_batch keys)
        self.in_flight = 0  # requests inside the handler right now (0 between batches)
        self.busy_s = 0.0  # wall time inside the handler (the engine computing), for utilisation
        self.started_at: float | None = None
        self._current: list = []  # the batch being collected or computed
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self.started_at = time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Cancel the loop; every request still queued or in the batch being computed fails (no future is
        left pending)."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        waiting = list(self._current)
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for _, future, _ in waiting:
            if not future.done():
                future.set_exception(RuntimeError("the batcher stopped before this request was answered"))

    async def submit(self, item: Any) -> Any:
        if self._task is None:
            raise RuntimeError("Batcher.submit before start()")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future, time.perf_counter()))
        return await future

    async def _loop(self) -> None:
        while True:
            self._current = batch = [await self._queue.get()]
            deadline = time.perf_counter() + self.wait_s
            while len(batch) < self.max_batch and (remaining := deadline - time.perf_counter()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            self.in_flight = len(batch)
            t0 = time.perf_counter()
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self.handle, [item for item, _, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"handler returned {len(results)} results for a batch of {len(batch)}")
            except Exception as exc:  # the whole call failed: every request of the batch gets the error
                results = [exc] * len(batch)
            finally:
                self.in_flight = 0
                self.busy_s += time.perf_counter() - t0
            self.sizes[len(batch)] += 1
            for (_, future, _), result in zip(batch, results):
                if future.done():  # the caller went away
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def stats(self) -> dict[str, Any]:
        batches = sum(self.sizes.values())
        requests = sum(size * n for size, n in self.sizes.items())
        up = time.perf_counter() - self.started_at if self.started_at is not None else 0.0
        return {"requests": requests, "batches": batches, "mean_batch_size": requests / batches if batches else 0.0,
                "max_batch_size": max(self.sizes, default=0), "batch_sizes": dict(sorted(self.sizes.items())),
                "busy_s": round(self.busy_s, 3), "uptime_s": round(up, 3),
                "busy_fraction": round(self.busy_s / up, 4) if up > 0 else 0.0}
