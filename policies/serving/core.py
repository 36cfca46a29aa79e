"""`ServingCore`: the engine on one thread behind a `Batcher`. What every transport of the serving path
shares: the Ray policy actor (libero_eval/ray_actors.py) and `libero-eval serve`, openpi's websocket
protocol (libero_eval/serve.py). Concurrent sessions' requests are batched the same way in both.

    core = ServingCore(engine, variants, max_batch=8, batch_wait_ms=5)   # warms every variant up
    core.start()                                                          # inside a running event loop
    await core.open(session_id, label, seed)
    chunk = await core.infer(session_id, observation)
    await core.close(session_id)
    await core.stop()

Every engine call (open, close, batches) runs on the one engine thread, so the engine never sees two
calls at once; the event loop stays free to take requests while a batch computes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from policies.base import IMAGE_KEY, PROMPT_KEY, STATE_KEY, STEP_KEY, WRIST_IMAGE_KEY, ActionChunk
from policies.serving.batcher import Batcher
from policies.serving.engine import Engine, Request
from policies.serving.latency import LatencyProfile, RealtimeClock
from policies.serving.variants import PolicyVariant

log = logging.getLogger("libero_eval")

WARMUP_OBSERVATION = {
    IMAGE_KEY: np.zeros((224, 224, 3), dtype=np.uint8),
    WRIST_IMAGE_KEY: np.zeros((224, 224, 3), dtype=np.uint8),
    STATE_KEY: np.zeros(8, dtype=np.float32),
    PROMPT_KEY: "warm up",
}
# warm-up of RTC sessions: frames cost nothing, so the second query is guided with delay 0
WARMUP_CLOCK = RealtimeClock(LatencyProfile("warmup", 0.0, 0.0, 0.0, vjp_eval_ms=0.0), 20.0)


def warm_up(engine: Engine, variants: list[PolicyVariant]) -> float:
    """One throw-away inference per variant before the first real request, so that first-call costs
    (allocator, kernel selection, lazy init) are not billed to whichever variant happens to run first.
    Returns the milliseconds it took; nothing for an engine whose model is elsewhere (needs_warm_up False)."""
    t0 = time.perf_counter()
    if not getattr(engine, "needs_warm_up", True):
        return 0.0
    for variant in variants:
        session = f"__warmup__/{variant.label}"
        rtc = variant.execution.execution == "rtc"  # two queries: the second one guided
        engine.open(session, variant, 0, WARMUP_CLOCK if rtc else None)
        try:
            for step in (0, 5) if rtc else (None,):
                observation = {**WARMUP_OBSERVATION, **({} if step is None else {STEP_KEY: step})}
                (result,) = engine.infer_batch([Request(session, observation)])
                if isinstance(result, BaseException):
                    log.warning("warm-up of %s failed: %s", variant.label, result)
        finally:
            engine.close(session)
    return (time.perf_counter() - t0) * 1e3


class ServingCore:
    def __init__(self, engine: Engine, variants: list[PolicyVariant], max_batch: int, batch_wait_ms: float):
        self.engine = engine
        self.variants = {v.label: v for v in variants}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.warmup_ms = warm_up(engine, variants)
        self.batcher = Batcher(engine.infer_batch, max_batch, batch_wait_ms, self._executor)

    def start(self) -> None:
        """Start batching; call inside the event loop that will submit the requests."""
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self._executor.shutdown(wait=False)

    async def run(self, fn, *args):
        """`fn(*args)` on the engine thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self, session_id: str, label: str, seed: int, clock: RealtimeClock | None = None) -> None:
        await self.run(self.engine.open, session_id, self.variants[label], seed, clock)

    async def close(self, session_id: str) -> None:
        await self.run(self.engine.close, session_id)

    async def infer(self, session_id: str, observation: dict[str, Any]) -> ActionChunk:
        return await self.batcher.submit(Request(session_id, observation))

    def stats(self) -> dict[str, Any]:
        return {**self.batcher.stats(), "open_sessions": self.engine.session_count(), "warmup_ms": self.warmup_ms}
