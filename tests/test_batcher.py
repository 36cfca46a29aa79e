"""The serving core's Batcher: batches up to max_batch within batch_wait_ms, one future per request, each
resolved with its own result or its own exception; a failing or wrong-length handler fails its batch only."""
from __future__ import annotations

import asyncio
import threading

import pytest

from policies.serving.batcher import Batcher


def run(coro):
    return asyncio.run(coro)


async def _serve(batcher: Batcher, items, stagger_s: float = 0.0):
    batcher.start()
    try:
        tasks = []
        for item in items:
            tasks.append(asyncio.create_task(batcher.submit(item)))
            if stagger_s:
                await asyncio.sleep(stagger_s)
        return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await batcher.stop()


def test_collects_up_to_max_batch_and_answers_each_request_in_order():
    seen: list[list[int]] = []
    batcher = Batcher(lambda items: seen.append(list(items)) or [x * 10 for x in items], max_batch=3,
                      batch_wait_ms=50)
    assert run(_serve(batcher, range(7))) == [0, 10, 20, 30, 40, 50, 60]
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]
    assert batcher.stats()["batch_sizes"] == {1: 1, 3: 2} and batcher.stats()["requests"] == 7


def test_a_returned_exception_fails_only_its_own_request():
    def handle(items):
        return [ValueError(f"bad {x}") if x % 2 else x for x in items]

    out = run(_serve(Batcher(handle, max_batch=4, batch_wait_ms=20), range(4)))
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], ValueError) and str(out[1]) == "bad 1" and str(out[3]) == "bad 3"


def test_a_failing_handler_fails_its_batch_and_the_loop_keeps_serving():
    calls = []

    def handle(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("model pass failed")
        return list(items)

    batcher = Batcher(handle, max_batch=2, batch_wait_ms=20)
    out = run(_serve(batcher, range(3)))
    assert [type(o) for o in out[:2]] == [RuntimeError, RuntimeError] and out[2] == 2


def test_a_wrong_length_answer_fails_every_request_of_the_batch():
    out = run(_serve(Batcher(lambda items: items[:-1], max_batch=3, batch_wait_ms=20), range(3)))
    assert all(isinstance(o, RuntimeError) and "2 results for a batch of 3" in str(o) for o in out)


def test_waits_at_most_batch_wait_ms_and_runs_the_handler_in_the_executor():
    threads = set()

    def handle(items):
        threads.add(threading.current_thread().name)
        return list(items)

    batcher = Batcher(handle, max_batch=8, batch_wait_ms=0)
    assert run(_serve(batcher, range(3), stagger_s=0.02)) == [0, 1, 2]
    assert batcher.stats()["batches"] == 3  # nothing waited for a batch-mate
    assert threading.main_thread().name not in threads


def test_submit_before_start_and_bad_knobs_are_errors():
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Batcher(list, max_batch=0, batch_wait_ms=1)
    with pytest.raises(RuntimeError, match="before start"):
        run(Batcher(list, max_batch=1, batch_wait_ms=1).submit(1))


def test_stop_fails_every_request_it_did_not_answer():
    release = threading.Event()

    def handle(items):
        release.wait(5)
        return list(items)

    async def scenario():
        batcher = Batcher(handle, max_batch=1, batch_wait_ms=0)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        while batcher.in_flight == 0:  # the first request is being computed, two wait in the queue
            await asyncio.sleep(0.001)
        await batcher.stop()
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = run(scenario())
    assert all(isinstance(o, RuntimeError) and "stopped" in str(o) for o in out), out
