"""Ray actors: rollout workers (one LIBERO env each) and the policy actor, a thin transport around the
serving core (policies/serving): it builds the engine from typed configs, starts its `Batcher` at start-up
and stops it at shutdown, and runs every engine call (open, close, batches) on one engine thread, so the
engine never sees two calls at once.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import ray
import torch

from libero_eval.episode import EpisodeConfig, PolicyUnavailable, run_episode
from libero_eval.execution import LatencyModel
from libero_eval.specs import EpisodeSpec
from policies.base import ActionChunk, Policy
from policies.serving.core import ServingCore
from policies.serving.engine import SessionLost
from policies.serving.latency import RealtimeClock
from policies.serving.model import ModelConfig, make_engine
from policies.serving.variants import PolicyVariant
from tasks import registry
from tasks.env import EnvConfig, LiberoEnv

log = logging.getLogger("libero_eval")

@ray.remote
class PolicyActor:
    def __init__(self, model: ModelConfig, variants: list[PolicyVariant], max_batch: int, batch_wait_ms: float,
                 torch_threads: int | None = None, shadow: bool = False, replan_steps: int = 5,
                 placed_on_gpu: bool = False):
        if placed_on_gpu and model.device != "cpu" and not torch.cuda.is_available():
            raise RuntimeError(f"the policy actor was given a GPU but CUDA is not available in it (model.device: "
                               f"{model.device}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                               "a CUDA build of torch and a driver are needed on that node")
        # Global torch settings are set once here, at actor start-up, and logged.
        if torch_threads:
            torch.set_num_threads(torch_threads)
        log.info("policy actor: torch %s, %d threads, cuda=%s", torch.__version__, torch.get_num_threads(),
                 torch.cuda.is_available())
        self.core = ServingCore(make_engine(model, variants, shadow=shadow, executed_steps=replan_steps), variants,
                                max_batch, batch_wait_ms)
        self.engine, self.batcher = self.core.engine, self.core.batcher
        self.core.start()  # Ray runs an async actor's __init__ inside its event loop

    async def open(self, session_id: str, label: str, seed: int, clock: dict[str, Any] | None = None) -> None:
        """`clock` (RealtimeClock.to_dict()): execution rtc variants only."""
        await self.core.open(session_id, label, seed, None if clock is None else RealtimeClock.from_dict(clock))

    async def close(self, session_id: str) -> None:
        await self.core.close(session_id)

    async def close_stale(self, keep: list[str]) -> list[str]:
        return await self.core.run(self.engine.close_stale, set(keep))

    async def infer(self, session_id: str, observation: dict[str, Any]) -> ActionChunk:
        return await self.core.infer(session_id, observation)

    async def calibrate(self, repeats: int = 5) -> dict[str, Any] | None:
        """The serving model's latency profile at batch 1, measured on the engine thread (no batch runs
        meanwhile); None for a model-free actor."""
        profile = await self.core.run(self.engine.calibrate, repeats)
        return None if profile is None else profile.to_dict()

    async def shutdown(self) -> None:
        await self.core.stop()

    async def pid(self) -> int:
        return os.getpid()

    async def state(self) -> dict[str, int]:
        """Requests being computed now and open sessions (answered while a batch computes: the engine runs
        in its own thread)."""
        return {"in_flight": self.batcher.in_flight, "sessions": self.engine.session_count()}

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()


class RemotePolicy(Policy):
    """The Policy interface over the policy actor: what the episode loop in a rollout worker talks to.
    Infrastructure failures are told apart by exception type, through Ray's wrapping: the actor died or
    restarts, or it no longer holds the session (a restarted actor) -> PolicyUnavailable (retried)."""

    def __init__(self, actor, variant: PolicyVariant, clock: RealtimeClock | None = None):
        self.actor = actor
        self.variant = variant
        self.clock = clock  # execution rtc: sent with every session open (a restarted actor gets it again)
        self.name = variant.name
        self.needs_images, self.needs_privileged = variant.needs_images, variant.needs_privileged
        self._session: str | None = None

    def _call(self, method, *args):
        try:
            return ray.get(method.remote(*args))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise PolicyUnavailable(f"policy actor unavailable: {type(exc).__name__}: {exc}") from exc
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, SessionLost):
                raise PolicyUnavailable(f"policy session lost (the actor restarted?): {exc.cause}") from exc
            raise

    def reset(self, episode_id: str, seed: int) -> None:
        self._session = episode_id
        self._call(self.actor.open, episode_id, self.variant.label, seed,
                   None if self.clock is None else self.clock.to_dict())

    def infer(self, observation: dict[str, Any]) -> ActionChunk:
        return self._call(self.actor.infer, self._session, observation)

    def end_episode(self, episode_id: str) -> None:
        self._call(self.actor.close, episode_id)
        self._session = None

    def describe(self) -> dict[str, Any]:
        return self.variant.describe()


@ray.remote
class RolloutWorker:
    """Owns one LIBERO env (created here, inside the actor's own process: one EGL context per process),
    reused across episodes of the same task."""

    def __init__(self, env_config: EnvConfig, episode_config: EpisodeConfig, run_dir: str, policy_actor_name: str,
                 variants: list[PolicyVariant]):
        os.environ.setdefault("MUJOCO_GL", "egl")
        self.env_config = env_config
        self.settings = episode_config
        self.run_dir = run_dir
        # Looked up by name, not passed as a handle: constructor arguments must survive a restart.
        self.policy_actor = ray.get_actor(policy_actor_name)
        self.variants = {v.label: v for v in variants}
        self.env = None
        self.env_key: tuple[str, int] | None = None
        self.envs_created = 0

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec: EpisodeSpec, attempt: int, latency: LatencyModel | None = None) -> dict[str, Any]:
        key = (spec.suite, spec.task_id)
        if self.env_key != key:
            if self.env is not None:
                self.env.close()
                self.env = None
            self.env = LiberoEnv(registry.get_task(*key), self.env_config)  # raises: infrastructure
            self.env_key = key
            self.envs_created += 1
        variant = self.variants[spec.policy_label]
        clock = None
        if variant.execution.execution == "rtc":  # a modelled latency (PolicyVariant.make refuses measured)
            clock = RealtimeClock(latency, self.env.control_hz)
        policy = RemotePolicy(self.policy_actor, variant, clock)
        result = run_episode(spec, self.env, policy, self.settings, run_dir=self.run_dir,
                             execution=variant.execution, latency=latency)
        result.attempt = attempt
        result.env_stats["worker_pid"] = os.getpid()
        result.env_stats["envs_created"] = self.envs_created
        return result.to_dict()

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
