"""Ray actors: rollout workers (one LIBERO env each) and the shared policy actor (model + sessions).

The policy actor's batching loop is small on purpose: requests queue up; the loop takes the first, waits
at most `batch_wait_ms` for up to `max_batch` more, runs them as one engine call on a single engine thread
(open/close go through the same thread, so the engine never sees two calls at once), and resolves every
request's future — with its result or its own exception.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from policies.base import ActionChunk, Policy
from libero_eval.policy_factory import policy_inputs
from policies.engine import PolicyVariant, Request

log = logging.getLogger("libero_eval")


class PolicyUnavailable(RuntimeError):
    """The policy actor could not be reached (died, restarting): infrastructure, retried."""


@ray.remote
class PolicyActor:
    def __init__(self, model: dict[str, Any], variants: list[PolicyVariant], max_batch: int, batch_wait_ms: float,
                 torch_threads: int | None = None, shadow: bool = False, replan_steps: int = 5):
        import torch

        from libero_eval.policy_factory import make_engine

        # Global torch settings are set once here, at actor start-up, and logged.
        if torch_threads:
            torch.set_num_threads(torch_threads)
        log.info("policy actor: torch %s, %d threads, cuda=%s", torch.__version__, torch.get_num_threads(),
                 torch.cuda.is_available())
        self.engine = make_engine(model, variants, shadow=shadow, replan_steps=replan_steps)
        self.variants = {v.label: v for v in variants}
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._queue: asyncio.Queue | None = None
        self._loop_task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []
        self.requests = 0
        self.warmup_ms = self._warm_up(variants)

    def _warm_up(self, variants: list[PolicyVariant]) -> float:
        """One throw-away inference per variant before the first real request, so that first-call costs
        (allocator, kernel selection, lazy init) are not billed to whichever variant happens to run first."""
        import numpy as np

        observation = {
            "observation/image": np.zeros((224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": np.zeros((224, 224, 3), dtype=np.uint8),
            "observation/state": np.zeros(8, dtype=np.float32),
            "prompt": "warm up",
        }
        t0 = time.perf_counter()
        for variant in variants:
            session = f"__warmup__/{variant.label}"
            self.engine.open(session, variant, 0)
            try:
                results = self.engine.infer_batch([Request(session, dict(observation))])
                if isinstance(results[0], BaseException):
                    log.warning("warm-up of %s failed: %s", variant.label, results[0])
            finally:
                self.engine.close(session)
        return (time.perf_counter() - t0) * 1e3

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self, session_id: str, label: str, seed: int) -> None:
        await self._run(self.engine.open, session_id, self.variants[label], seed)

    async def close(self, session_id: str) -> None:
        await self._run(self.engine.close, session_id)

    async def close_stale(self, keep: list[str]) -> list[str]:
        return await self._run(self.engine.close_stale, set(keep))

    async def infer(self, session_id: str, observation: dict[str, Any]) -> ActionChunk:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((Request(session_id, observation), future))
        return await future

    async def _batch_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = time.perf_counter() + self.batch_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            started = time.perf_counter()
            requests = [req for req, _ in batch]
            try:
                results = await self._run(self.engine.infer_batch, requests)
                if len(results) != len(batch):
                    raise RuntimeError(f"engine returned {len(results)} results for a batch of {len(batch)}")
            except Exception as exc:  # a failed batch fails every request in it
                results = [exc] * len(batch)
            self.batch_sizes.append(len(batch))
            self.requests += len(batch)
            for (req, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    result.record.extra["batch_size"] = len(batch)
                    result.record.extra["queue_wait_ms"] = round((started - req.enqueued_at) * 1e3, 3)
                    future.set_result(result)

    async def stats(self) -> dict[str, Any]:
        sizes = self.batch_sizes
        return {
            "requests": self.requests,
            "batches": len(sizes),
            "mean_batch_size": sum(sizes) / len(sizes) if sizes else 0.0,
            "max_batch_size": max(sizes) if sizes else 0,
            "open_sessions": len(self.engine.sessions()),
            "warmup_ms": self.warmup_ms,
        }

    async def describe(self, label: str) -> dict[str, Any]:
        v = self.variants[label]
        return {"label": v.label, "name": v.name, **v.param_dict}


class RemotePolicy(Policy):
    """The Policy interface over the policy actor: what the episode loop in a rollout worker talks to."""

    def __init__(self, actor, variant_label: str, description: dict[str, Any]):
        self.actor = actor
        self.label = variant_label
        self.name = description.get("name", variant_label)
        self.needs_images, self.needs_privileged = policy_inputs(self.name)
        self._description = description
        self._session: str | None = None

    def _call(self, method, *args):
        try:
            return ray.get(method.remote(*args))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise PolicyUnavailable(f"policy actor unavailable: {type(exc).__name__}: {exc}") from exc

    def reset(self, episode_id: str, seed: int) -> None:
        self._session = episode_id
        self._call(self.actor.open, episode_id, self.label, seed)

    def infer(self, observation: dict[str, Any]) -> ActionChunk:
        return self._call(self.actor.infer, self._session, observation)

    def end_episode(self, episode_id: str) -> None:
        self._call(self.actor.close, episode_id)
        self._session = None

    def describe(self) -> dict[str, Any]:
        return dict(self._description)


@ray.remote
class RolloutWorker:
    """Owns one LIBERO env (created here, inside the actor's own process: one EGL context per process),
    reused across episodes of the same task."""

    def __init__(self, env_settings: dict[str, Any], episode_settings: dict[str, Any], run_dir: str,
                 policy_actor_name: str, descriptions: dict[str, dict[str, Any]]):
        os.environ.setdefault("MUJOCO_GL", "egl")
        from libero_eval.episode import EpisodeSettings
        from tasks.env import EnvConfig

        self.env_config = EnvConfig(**env_settings)
        self.settings = EpisodeSettings(**episode_settings)
        self.run_dir = run_dir
        # Looked up by name, not passed as a handle: constructor arguments must survive a restart.
        self.policy_actor = ray.get_actor(policy_actor_name)
        self.descriptions = descriptions
        self.env = None
        self.env_key: tuple[str, int] | None = None
        self.envs_created = 0

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec: dict[str, Any], attempt: int) -> dict[str, Any]:
        from libero_eval.episode import run_episode
        from libero_eval.specs import EpisodeSpec
        from tasks import registry
        from tasks.env import LiberoEnv

        spec = EpisodeSpec(**spec)
        key = (spec.suite, spec.task_id)
        if self.env_key != key:
            if self.env is not None:
                self.env.close()
                self.env = None
            self.env = LiberoEnv(registry.get_task(*key), self.env_config)  # raises: infrastructure
            self.env_key = key
            self.envs_created += 1
        policy = RemotePolicy(self.policy_actor, spec.policy_label, self.descriptions[spec.policy_label])
        result = run_episode(spec, self.env, policy, self.settings, run_dir=self.run_dir)
        result.attempt = attempt
        if result.status == "error" and result.error and result.error.startswith(("PolicyUnavailable", "SessionLost")):
            result.reason = "policy_unavailable"  # the policy actor died or restarted: infrastructure
        result.env_stats["worker_pid"] = os.getpid()
        result.env_stats["envs_created"] = self.envs_created
        return result.to_dict()

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
