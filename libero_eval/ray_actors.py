"""Ray actors: rollout workers (one LIBERO env each) and the policy actors (replicas), a thin transport
around the serving core (policies/serving): it builds the engine from typed configs, starts its `Batcher` at
start-up and stops it at shutdown, and runs every engine call (open, close, batches) on one engine thread,
so the engine never sees two calls at once.

Rollout workers never see the run directory: an episode's video and recorded observations are written to
the worker's own scratch directory and returned with its result as bytes; the driver alone writes the run
directory (no shared filesystem needed on a cluster).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch

from libero_eval.cluster import egl_devices, node_gpus, render_device_env
from libero_eval.episode import EpisodeConfig, PolicyUnavailable, run_episode
from libero_eval.execution import LatencyModel
from libero_eval.specs import EpisodeSpec, infra_error
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
        self.model_config = model
        self.core.start()  # Ray runs an async actor's __init__ inside its event loop

    async def describe(self) -> dict[str, Any]:
        """Where this replica runs and on what: the sweep prints it (actor logs stay on the nodes)."""
        module = getattr(self.engine, "model", None)
        device = str(next(module.parameters()).device) if isinstance(module, torch.nn.Module) else "none (no model)"
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(), "device": device,
                "threads": torch.get_num_threads(), "torch": torch.__version__,
                "cuda": torch.cuda.is_available(), "requested": self.model_config.device,
                "warmup_ms": round(self.core.warmup_ms, 1), **self._backend()}

    def _backend(self) -> dict[str, Any]:
        stages = getattr(self.engine, "stages", None)
        if stages is None or not hasattr(stages, "describe"):
            return {"backend": "none", "fallbacks": {}}
        info = stages.describe()
        return {"backend": info.get("backend", "?"), "fallbacks": info.get("fallbacks", {})}

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

    async def ping(self) -> int:
        """Answered by the engine thread (after the batch it computes, if any): a replica whose event loop
        answers but whose engine is stuck does not pass."""
        return await self.core.run(os.getpid)

    async def state(self) -> dict[str, int]:
        """Requests being computed now and open sessions (answered while a batch computes: the engine runs
        in its own thread)."""
        return {"in_flight": self.batcher.in_flight, "sessions": self.engine.session_count()}

    async def stats(self) -> dict[str, Any]:
        """Batching and utilisation, and the backend's fallbacks to eager so far (what it could not run)."""
        return {**self.core.stats(), "fallbacks": self._backend()["fallbacks"]}


class RemotePolicy(Policy):
    """The Policy interface over the policy actor: what the episode loop in a rollout worker talks to.
    Infrastructure failures are told apart by exception type, through Ray's wrapping: the actor died or
    restarts, or it no longer holds the session (a restarted actor) -> PolicyUnavailable (retried)."""

    def __init__(self, actor, variant: PolicyVariant, clock: RealtimeClock | None = None,
                 timeout_s: float | None = None):
        self.actor = actor
        self.timeout_s = timeout_s  # a call unanswered this long: the replica is unavailable (never wait forever)
        self.variant = variant
        self.clock = clock  # execution rtc: sent with every session open (a restarted actor gets it again)
        self.name = variant.name
        self.needs_images, self.needs_privileged = variant.needs_images, variant.needs_privileged
        self._session: str | None = None

    def _call(self, method, *args):
        try:
            return ray.get(method.remote(*args), timeout=self.timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            raise PolicyUnavailable(f"policy actor unavailable: {type(exc).__name__}: {exc}") from exc
        except ray.exceptions.GetTimeoutError as exc:
            raise PolicyUnavailable(f"policy actor did not answer within {self.timeout_s:g} s "
                                    "(ray.policy_timeout_s)") from exc
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


SCRATCH_ROOT = Path(tempfile.gettempdir()) / f"libero-eval-scratch-{os.getuid()}"  # per user: not shared


@ray.remote(concurrency_groups={"info": 1})
class RolloutWorker:
    """Owns one LIBERO env (created here, inside the actor's own process: one EGL context per process),
    reused across episodes of the same task. Episode files go to a scratch directory of this process and
    come back as bytes with the result; scratch directories of dead workers on this node are removed.
    Episodes run one at a time, in the order they were handed out (the driver queues the next one here);
    `pid` and `describe` answer on their own thread, never behind queued episodes."""

    def __init__(self, env_config: EnvConfig, episode_config: EpisodeConfig, policy_actor_names: list[str],
                 variants: list[PolicyVariant], index: int = 0, policy_timeout_s: float | None = None,
                 render_index: int | None = None):
        os.environ.setdefault("MUJOCO_GL", "egl")
        # before the first EGL context: which device this worker renders on (env.render_device); the driver
        # gives a worker it pinned to a node its place there, else the sweep-wide index spreads the GPUs
        env_vars, self.render_device = render_device_env(env_config.render_device, node_gpus(),
                                                         index if render_index is None else render_index, egl_devices())
        os.environ.update(env_vars)
        self.env_config = env_config
        self.settings = episode_config
        self.index = index
        self.scratch = _fresh_scratch()
        # Looked up by name, not passed as handles: constructor arguments must survive a restart.
        self.policy_actor_names = list(policy_actor_names)
        self.policy_actors: dict[int, Any] = {}
        self.policy_timeout_s = policy_timeout_s
        self.variants = {v.label: v for v in variants}
        self.env = None
        self.env_key: tuple[str, int] | None = None
        self.envs_created = 0

    @ray.method(concurrency_group="info")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="info")
    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "pid": os.getpid(), "host": socket.gethostname(),
                "node_ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "render_device": self.render_device}

    def _replica(self, k: int):
        if k not in self.policy_actors:
            self.policy_actors[k] = ray.get_actor(self.policy_actor_names[k])
        return self.policy_actors[k]

    def run(self, spec: EpisodeSpec, attempt: int, latency: LatencyModel | None = None,
            replica: int = 0) -> tuple[dict[str, Any], dict[str, bytes]]:
        """One episode on policy replica `replica`: (its result, its files: run-directory-relative path ->
        bytes). The scratch directory is empty again afterwards."""
        key = (spec.suite, spec.task_id)
        if self.env_key != key:
            if self.env is not None:
                self.env.close()
                self.env = None
            self.env_key = None  # until the new env exists
            self.env = LiberoEnv(registry.get_task(*key), self.env_config)  # raises: infrastructure
            self.env_key = key
            self.envs_created += 1
        variant = self.variants[spec.policy_label]
        clock = None
        if variant.execution.execution == "rtc":  # a modelled latency (PolicyVariant.make refuses measured)
            clock = RealtimeClock(latency, self.env.control_hz)
        try:
            actor = self._replica(replica)
        except ValueError as exc:  # the replica is gone for good (out of restarts): not this episode's fault
            return infra_error(spec, "policy_unavailable", exc, attempt).to_dict(), {}
        policy = RemotePolicy(actor, variant, clock, self.policy_timeout_s)
        try:
            result = run_episode(spec, self.env, policy, self.settings, run_dir=self.scratch,
                                 execution=variant.execution, latency=latency)
            files = {str(p.relative_to(self.scratch)): p.read_bytes()
                     for p in sorted(self.scratch.rglob("*")) if p.is_file()}
        finally:
            _empty(self.scratch)
        result.attempt = attempt
        result.env_stats["worker_pid"] = os.getpid()
        result.env_stats["worker"] = self.index
        result.env_stats["replica"] = replica
        result.env_stats["node"] = ray.get_runtime_context().get_node_id()[:12]
        result.env_stats["envs_created"] = self.envs_created
        return result.to_dict(), files

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        shutil.rmtree(self.scratch, ignore_errors=True)


def _fresh_scratch() -> Path:
    """This process's scratch directory, <tmp>/libero-eval-scratch-<uid>/<pid>, after removing those of processes
    that no longer run (a killed worker's partial files)."""
    SCRATCH_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in SCRATCH_ROOT.iterdir():
        if old.name.isdigit() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    path = SCRATCH_ROOT / str(os.getpid())
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _empty(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
