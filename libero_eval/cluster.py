"""Where a sweep's actors run: starting or joining Ray, the code shipped to the nodes, what the policy
replicas reserve, how many rollout workers the cluster can place, and where each worker renders.

Everything here is decided from the cluster's resources (`ray.cluster_resources()`), never from the
driver's own devices: the driver of a cluster sweep usually runs on a head node without a GPU.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from libero_eval.config import ConfigError, SweepConfig
from tasks.env import RENDER_DEVICES

log = logging.getLogger("libero_eval")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# never shipped to the nodes: environments, results, caches, version control (Ray's gitignore-style patterns)
SHIP_EXCLUDES = [".git", ".venv", "/venv", "/runs", "/data", "/wandb", "__pycache__", "*.egg-info", ".pytest_cache",
                 ".grimp_cache", ".import_linter_cache", "/build", "/dist", "/.gl", "/tests/artifacts",
                 "/benchmarks/results"]
# Mesa's EGL vendor file: with it alone, libglvnd loads no GPU vendor and EGL renders on the CPU (llvmpipe)
MESA_EGL_VENDOR_FILES = ("/usr/share/glvnd/egl_vendor.d/50_mesa.json", "/etc/glvnd/egl_vendor.d/50_mesa.json")

_STARTED_LOCALLY = False
_JOINED: tuple[str, bool] | None = None  # (address, code shipped) of the cluster this process joined


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a sweep asks of the cluster: policy replicas (each with `replica_options`) and rollout workers."""

    replicas: int
    replica_options: dict[str, float]
    workers: int
    cpus_per_worker: float
    lines: tuple[str, ...]  # what was chosen and why, printed at the sweep's start

    @property
    def cpus(self) -> float:
        return self.replicas * self.replica_options.get("num_cpus", 0.0) + self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.replicas * self.replica_options.get("num_gpus", 0.0)


def policy_placement(config: SweepConfig, cluster: dict[str, float]) -> tuple[dict[str, float], str]:
    """Ray resources for one policy replica, from the cluster's resources and `model.device`, and a line
    saying what was chosen. ConfigError when `cuda` is asked of a cluster without a GPU."""
    r, device = config.ray, config.model.device
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    have = f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs"
    on_cpu = {"num_cpus": r.policy_actor_cpus}
    if config.model.kind == "openpi_server":
        return on_cpu, f"policy actor: a relay to {config.model.url} on CPU (the model is the server's)"
    if all(v.model_free for v in config.variants()):
        return on_cpu, "policy actor: model-free variants only, on CPU"
    if device == "cpu":
        return on_cpu, f"policy actor: CPU (model.device: cpu; {have})"
    if gpus >= 1:
        return {"num_gpus": 1, "num_cpus": 1}, f"policy actor: one GPU each (model.device: {device}; {have})"
    if device == "cuda":
        raise ConfigError(f"model.device: cuda, but {have}: start the cluster with GPUs, or use model.device: "
                          "auto or cpu")
    return on_cpu, f"policy actor: CPU (model.device: auto and {have})"


def plan_cluster(config: SweepConfig, cluster: dict[str, float], episodes: int,
                 nodes: list[dict] | None = None) -> Plan:
    """Replicas and workers for `episodes` episodes on a cluster with `cluster`'s resources (`nodes`:
    `ray.nodes()`, for `env.render_device: gpu`, whose workers only GPU nodes take).

    Replicas: `ray.policy_replicas` (auto: one per GPU when they take GPUs, else one). Workers:
    `ray.num_workers`, fewer when the cluster cannot place them all beside the replicas (a resume on a
    smaller cluster runs with what fits, and says so), never more than the episodes. ConfigError when not
    even one worker fits, or the replicas do not."""
    options, line = policy_placement(config, cluster)
    r = config.ray
    gpus, cpus = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    on_gpu = "num_gpus" in options
    if r.policy_replicas == "auto":
        replicas = max(1, int(gpus)) if on_gpu else 1
        how = f"ray.policy_replicas: auto -> {replicas}" + (" (one per GPU)" if on_gpu else "")
    else:
        replicas = int(r.policy_replicas)
        how = f"ray.policy_replicas: {replicas}"
    if on_gpu and replicas > gpus:
        raise ConfigError(f"ray.policy_replicas: {replicas} replicas take a GPU each, but the Ray cluster has "
                          f"{gpus:g} GPUs: use auto or at most {int(gpus)}")
    lines = [line, how]
    gpu_only = config.env.render_device == "gpu" and nodes is not None  # its workers go to GPU nodes only
    if gpu_only:  # replicas on GPUs sit on those nodes; CPU replicas may (counted there too, to be safe)
        cpus = sum(n.get("Resources", {}).get("CPU", 0.0) for n in _gpu_nodes(nodes))
    free = cpus - replicas * options.get("num_cpus", 0.0)
    fit = int(math.floor(free / r.cpus_per_worker + 1e-9)) if free > 0 else 0
    workers = min(r.num_workers, episodes) if episodes else 0
    where = "the cluster's GPU nodes (env.render_device: gpu) have" if gpu_only else "the cluster has"
    if episodes and fit < 1:
        raise ConfigError(f"{where} {cpus:g} CPUs: {replicas} policy replica(s) take "
                          f"{replicas * options.get('num_cpus', 0.0):g} and no rollout worker "
                          f"(ray.cpus_per_worker={r.cpus_per_worker:g}) fits beside them")
    if workers > fit:
        lines.append(f"rollout workers: {fit} of ray.num_workers={r.num_workers} ({where} {cpus:g} CPUs; "
                     f"each worker takes {r.cpus_per_worker:g}, the replicas {replicas * options.get('num_cpus', 0):g})")
        workers = fit
    return Plan(replicas, options, workers, r.cpus_per_worker, tuple(lines))


def required_cpus(config: SweepConfig) -> int:
    """Logical CPUs a local Ray needs for the whole configured sweep (every worker, one CPU replica each)."""
    r = config.ray
    replicas = 1 if r.policy_replicas == "auto" else int(r.policy_replicas)
    return math.ceil(r.num_workers * r.cpus_per_worker + replicas * r.policy_actor_cpus)


def runtime_env(config: SweepConfig, ship: bool) -> dict[str, Any]:
    """The job's runtime environment: the variables every actor needs and, when joining a cluster, the
    project's code (`working_dir`, large folders excluded), so worker nodes need only the dependencies."""
    env_vars = {k: os.environ[k] for k in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "WANDB_MODE") if k in os.environ}
    env_vars.setdefault("MUJOCO_GL", "egl")
    env_vars.setdefault("PYOPENGL_PLATFORM", "egl")
    env_vars.update({"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "LP_NUM_THREADS": "1"})
    key_env = config.model.api_key_env  # an openpi server's key: the policy actor connects, wherever it runs
    if key_env and key_env in os.environ:
        env_vars[key_env] = os.environ[key_env]
    env: dict[str, Any] = {"env_vars": env_vars}
    if ship:
        env["working_dir"] = str(PROJECT_ROOT)
        env["excludes"] = list(SHIP_EXCLUDES)
    return env


def shipped_model(config: SweepConfig, shipped: bool):
    """The model config the replicas get: a checkpoint inside the project travels with the shipped code, so
    its path becomes relative to the code's directory on the node; any other path must exist on the nodes."""
    model = config.model
    if not shipped or not model.checkpoint:
        return model
    path = Path(model.checkpoint)
    try:
        rel = path.resolve().relative_to(PROJECT_ROOT)
    except ValueError:
        return model
    if any(f"/{part}" in SHIP_EXCLUDES or part in SHIP_EXCLUDES for part in rel.parts[:1]):
        return model
    return dataclasses.replace(model, checkpoint=str(rel))


def init_ray(config: SweepConfig) -> bool:
    """Start a local Ray on 127.0.0.1 with enough logical CPUs for every actor, or join `ray.address`.
    Returns True when the project's code is shipped to the nodes (joining a cluster with ray.ship_code)."""
    global _STARTED_LOCALLY, _JOINED
    need = required_cpus(config)
    r = config.ray
    if ray.is_initialized():
        if (r.address and _JOINED != (r.address, r.ship_code)) or (not r.address and _JOINED is not None):
            ray.shutdown()  # connected elsewhere, or with other code shipping: start or join as asked
        elif not _STARTED_LOCALLY or ray.cluster_resources().get("CPU", 0) >= need:
            return bool(_JOINED and _JOINED[1])  # plan_cluster fits the sweep to the cluster as it is
        else:
            ray.shutdown()  # our own local Ray, started for a smaller sweep: restart it bigger
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if r.address:
        ray.init(address=r.address, runtime_env=runtime_env(config, r.ship_code), log_to_driver=False)
        _STARTED_LOCALLY, _JOINED = False, (r.address, r.ship_code)
        return r.ship_code
    ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env=runtime_env(config, False), log_to_driver=False, configure_logging=False)
    _STARTED_LOCALLY, _JOINED = True, None
    return False


def check_render_device(config: SweepConfig, cluster: dict[str, float]) -> None:
    """`env.render_device: gpu` on a cluster without GPUs, or `cpu` without Mesa's EGL: said before any
    actor starts (the Mesa check is the driver's; a node without Mesa fails its worker as env_error)."""
    device = config.env.render_device
    if device == "gpu" and cluster.get("GPU", 0.0) < 1:
        raise ConfigError(f"env.render_device: gpu, but the Ray cluster has {cluster.get('GPU', 0.0):g} GPUs: use "
                          "auto or cpu")


def _gpu_nodes(nodes: list[dict]) -> list[dict]:
    return [n for n in nodes if n.get("Alive") and n.get("Resources", {}).get("GPU", 0.0) >= 1]


def gpu_node_room(nodes: list[dict], cpus_per_worker: float, taken: dict[str, float] | None = None) -> dict[str, int]:
    """Alive nodes with a GPU (from `ray.nodes()`) -> how many rollout workers their CPUs hold beside what
    is `taken` there (node -> CPUs of the policy replicas placed on it): where `env.render_device: gpu`
    workers may go."""
    taken = taken or {}
    return {n["NodeID"]: max(0, int(math.floor((n.get("Resources", {}).get("CPU", 0.0) - taken.get(n["NodeID"], 0.0))
                                               / cpus_per_worker + 1e-9))) for n in _gpu_nodes(nodes)}


def pick_node(room: dict[str, int], assigned: dict[str, int]) -> str | None:
    """The node with the most room left for one more worker (ties: the lowest id); None when all are full."""
    left = {n: c - assigned.get(n, 0) for n, c in room.items() if c - assigned.get(n, 0) > 0}
    return max(sorted(left), key=lambda n: left[n]) if left else None


def worker_options(config: SweepConfig, index: int, node_id: str | None = None) -> dict[str, Any]:
    """Ray options of rollout worker `index`: its CPUs, spread over the nodes (or on node `node_id` only:
    `render_device: gpu` keeps workers to GPU nodes), and for `render_device: cpu` the environment that
    makes EGL render on the CPU (set before the process loads libEGL)."""
    opts: dict[str, Any] = {"num_cpus": config.ray.cpus_per_worker, "scheduling_strategy": "SPREAD"}
    if node_id is not None:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    if config.env.render_device == "cpu":
        opts["runtime_env"] = {"env_vars": cpu_render_env()}
    return opts


def cpu_render_env() -> dict[str, str]:
    vendor = next((p for p in MESA_EGL_VENDOR_FILES if os.path.isfile(p)), MESA_EGL_VENDOR_FILES[0])
    return {"__EGL_VENDOR_LIBRARY_FILENAMES": vendor, "MUJOCO_EGL_DEVICE_ID": "0"}


def render_device_env(mode: str, node_gpus: int, index: int, egl_count: int | None = None) -> tuple[dict[str, str], str]:
    """Environment variables for worker `index` on a node with `node_gpus` GPUs and `egl_count` EGL devices
    (None: not counted), and a description.

    gpu / auto with GPUs: EGL device `index mod node_gpus` (workers spread over the node's GPUs; EGL lists
    NVIDIA devices in CUDA order on the usual driver stacks). auto leaves the choice to EGL when that device
    does not exist (no NVIDIA EGL vendor in the image: only Mesa's devices); gpu refuses. cpu, or auto
    without GPUs: Mesa's software EGL (llvmpipe), as on a CPU-only machine."""
    if mode not in RENDER_DEVICES:
        raise ValueError(f"render_device: expected one of {', '.join(RENDER_DEVICES)}, got {mode!r}")
    if mode == "gpu" and node_gpus < 1:
        raise RuntimeError("env.render_device: gpu, but this worker's node has no GPU")
    if mode == "cpu":
        return cpu_render_env(), "cpu (Mesa EGL)"
    if node_gpus >= 1:
        device = index % node_gpus
        if egl_count is not None and device >= egl_count:
            if mode == "gpu":
                raise RuntimeError(f"env.render_device: gpu, but EGL lists {egl_count} device(s) for this node's "
                                   f"{node_gpus} GPU(s): is NVIDIA's EGL (libEGL_nvidia) installed?")
            return {}, f"EGL default device (EGL lists {egl_count} device(s) for {node_gpus} GPU(s))"
        return {"MUJOCO_EGL_DEVICE_ID": str(device)}, f"gpu {device} of {node_gpus} (EGL)"
    return {}, "EGL default device (no GPU on this node)"


def egl_devices() -> int | None:
    """EGL devices this process sees (None when EGL cannot be asked: not the egl backend, no libEGL)."""
    if os.environ.get("MUJOCO_GL", "egl") != "egl":
        return None
    try:
        from mujoco.egl import egl_ext  # loads libEGL: only in a rollout worker, before its first context

        return len(egl_ext.eglQueryDevicesEXT())
    except Exception as exc:  # no EGL here: the env creation will say so, as an env_error
        log.debug("EGL devices not counted: %s", exc)
        return None


def node_gpus() -> int:
    """GPUs of the node this process runs on, from Ray's view of the cluster (not CUDA's: Ray hides the GPUs
    an actor did not reserve)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return int(node.get("Resources", {}).get("GPU", 0))
    return 0
