"""Placement and dispatch logic without a cluster: replicas and workers planned from a cluster's (logical)
resources, rendering devices, the code and checkpoint shipped to the nodes, the least-loaded replica choice
and its health states, utilisation accounting."""
from __future__ import annotations

from pathlib import Path

import pytest

from libero_eval import cluster
from libero_eval.config import ConfigError, load_config
from libero_eval.dispatch import (DEAD, HEALTHY, SUSPECT, ReplicaPool, Scheduler, Utilisation, format_utilisation,
                                  utilisation_values)
from libero_eval.specs import EpisodeSpec


def config(*overrides: str):
    return load_config(None, ["model.kind=tiny", *overrides])


def test_replicas_auto_take_one_gpu_each_and_cpu_never_reserves_one():
    eight_gpus = {"CPU": 64.0, "GPU": 8.0}
    plan = cluster.plan_cluster(config("model.device=auto", "ray.num_workers=16"), eight_gpus, 100)
    assert (plan.replicas, plan.replica_options, plan.workers) == (8, {"num_gpus": 1, "num_cpus": 1}, 16)
    assert plan.gpus == 8 and "auto -> 8 (one per GPU)" in plan.lines[1]
    on_cpu = cluster.plan_cluster(config("model.device=cpu", "ray.num_workers=4"), eight_gpus, 100)
    assert (on_cpu.replicas, on_cpu.gpus) == (1, 0)  # device cpu: no GPU reserved, one replica
    two = cluster.plan_cluster(config("model.device=cpu", "ray.policy_replicas=2"), eight_gpus, 100)
    assert two.replicas == 2 and two.replica_options == {"num_cpus": 0.5}
    with pytest.raises(ConfigError, match="3 replicas take a GPU each, but the Ray cluster has 2 GPUs"):
        cluster.plan_cluster(config("model.device=cuda", "ray.policy_replicas=3"), {"CPU": 8.0, "GPU": 2.0}, 10)
    with pytest.raises(ConfigError, match="ray.policy_replicas: expected a positive integer or auto"):
        config("ray.policy_replicas=0")


def test_workers_fit_the_cluster_and_never_exceed_the_episodes():
    plan = cluster.plan_cluster(config("model.device=cpu", "ray.num_workers=3"), {"CPU": 2.0}, 50)
    assert plan.workers == 1 and "rollout workers: 1 of ray.num_workers=3" in plan.lines[-1]
    assert cluster.plan_cluster(config("ray.num_workers=8"), {"CPU": 16.0}, 3).workers == 3
    with pytest.raises(ConfigError, match="no rollout worker .* fits beside them"):
        cluster.plan_cluster(config("model.device=cpu", "ray.cpus_per_worker=2"), {"CPU": 2.0}, 5)


def test_render_device_per_worker():
    assert cluster.render_device_env("auto", 4, 6) == ({"MUJOCO_EGL_DEVICE_ID": "2"}, "gpu 2 of 4 (EGL)")
    assert cluster.render_device_env("gpu", 2, 3)[0] == {"MUJOCO_EGL_DEVICE_ID": "1"}
    env, what = cluster.render_device_env("cpu", 8, 0)
    assert env["__EGL_VENDOR_LIBRARY_FILENAMES"].endswith("50_mesa.json") and what == "cpu (Mesa EGL)"
    assert cluster.render_device_env("auto", 0, 5) == ({}, "EGL default device (no GPU on this node)")
    # a GPU node whose image has only Mesa's EGL (1 device): auto leaves the choice to EGL, gpu refuses
    assert cluster.render_device_env("auto", 4, 2, egl_count=1)[0] == {}
    with pytest.raises(RuntimeError, match="EGL lists 1 device"):
        cluster.render_device_env("gpu", 4, 2, egl_count=1)
    assert cluster.render_device_env("auto", 4, 2, egl_count=5)[0] == {"MUJOCO_EGL_DEVICE_ID": "2"}
    with pytest.raises(RuntimeError, match="has no GPU"):
        cluster.render_device_env("gpu", 0, 0)
    with pytest.raises(ConfigError, match="env.render_device: gpu, but the Ray cluster has 0 GPUs"):
        cluster.check_render_device(config("env.render_device=gpu"), {"CPU": 4.0})
    with pytest.raises(ConfigError, match="render_device: expected one of auto, gpu, cpu"):
        config("env.render_device=vulkan")
    opts = cluster.worker_options(config("env.render_device=cpu", "ray.cpus_per_worker=1"), 0)
    assert opts["num_cpus"] == 1 and "__EGL_VENDOR_LIBRARY_FILENAMES" in opts["runtime_env"]["env_vars"]


def test_render_device_gpu_workers_go_to_gpu_nodes_by_room():
    a, b = "a" * 56, "b" * 56  # Ray's node ids: 28 bytes in hex
    nodes = [{"NodeID": "0" * 56, "Alive": True, "Resources": {"CPU": 8.0}},
             {"NodeID": b, "Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0}},
             {"NodeID": a, "Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
             {"NodeID": "f" * 56, "Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}}]
    room = cluster.gpu_node_room(nodes, 2.0)
    assert room == {b: 2, a: 2}
    assert cluster.gpu_node_room(nodes, 2.0, {b: 2.0, "0" * 56: 8.0}) == {b: 1, a: 2}  # b holds 2 replica CPUs
    assert cluster.pick_node(room, {}) == a and cluster.pick_node(room, {a: 1}) == b
    assert cluster.pick_node(room, {a: 2, b: 2}) is None
    # the plan counts only the GPU nodes' CPUs, less the GPU replicas' (one per GPU there)
    c = config("model.device=auto", "env.render_device=gpu", "ray.num_workers=8", "ray.cpus_per_worker=1")
    plan = cluster.plan_cluster(c, {"CPU": 16.0, "GPU": 3.0}, 100, nodes)
    assert (plan.replicas, plan.workers) == (3, 5) and "GPU nodes (env.render_device: gpu) have 8 CPUs" in plan.lines[-1]
    assert cluster.plan_cluster(c, {"CPU": 16.0, "GPU": 3.0}, 100).workers == 8  # no node list: the whole cluster
    opts = cluster.worker_options(c, 0, b)
    assert opts["scheduling_strategy"].node_id == b and opts["scheduling_strategy"].soft is False


def test_the_code_ships_without_large_folders_and_a_project_checkpoint_travels_with_it():
    c = load_config(None, ["model.kind=checkpoint", "model.checkpoint=policies/pi05/assets/pi05_small_spatial01"])
    env = cluster.runtime_env(c, ship=True)
    assert env["working_dir"] == str(cluster.PROJECT_ROOT)
    assert {".git", ".venv", "/runs", "/data"} <= set(env["excludes"]) and "data" not in env["excludes"]
    assert "working_dir" not in cluster.runtime_env(c, ship=False)
    assert cluster.shipped_model(c, True).checkpoint == "policies/pi05/assets/pi05_small_spatial01"
    assert cluster.shipped_model(c, False).checkpoint == c.model.checkpoint and Path(c.model.checkpoint).is_absolute()


def test_replica_pool_least_loaded_and_health():
    pool = ReplicaPool(3)
    assert [pool.pick() for _ in range(4)] == [0, 1, 2, 0]
    pool.done(1)
    assert pool.pick() == 1  # the least loaded
    assert pool.suspect(2) and not pool.suspect(2)  # one probe per outage
    assert pool.state == [HEALTHY, HEALTHY, SUSPECT]
    pool.done(0), pool.done(0)
    assert pool.pick() == 0  # 2 is out of rotation
    pool.probed(2, answered=False)  # restarting: still suspect
    assert pool.state[2] == SUSPECT
    pool.probed(2, answered=True)
    assert pool.state[2] == HEALTHY
    for k in range(3):
        pool.suspect(k)
        pool.probed(k, answered=False, restartable=False)
    assert pool.state == [DEAD] * 3 and pool.all_dead() and pool.pick() is None


def test_scheduler_keeps_a_workers_task_and_serves_retries_first():
    specs = [EpisodeSpec("libero_spatial", t, k, "none", 10) for t in (0, 1) for k in range(2)]
    s = Scheduler(specs)
    first, _ = s.next(None, set())
    second, _ = s.next(None, {(first.suite, first.task_id)})
    assert first.task_id != second.task_id  # a task no other worker holds
    s.retry.append((second, 2))
    assert s.next((first.suite, first.task_id), set())[0].task_id == first.task_id  # its env's task first
    assert s.next(None, set()) == (second, 2)
    assert s.left() == 1


def test_utilisation_summary_and_lines():
    u = Utilisation()
    u.worker_ready(0)
    u.episode(0, {"reset_s": 1.0, "step_s": 2.0}, 4.0)
    u.stored = 1
    out = u.summary([{"requests": 10, "batches": 5, "mean_batch_size": 2.0, "busy_fraction": 0.25}, {}])
    assert out["episodes"] == 1 and out["workers"][0]["env_s"] == 3.0 and out["episodes_per_hour"] > 0
    text = format_utilisation(out)
    assert "episodes/h" in text and "#0 1 ep, env busy" in text and "mean batch 2.00), busy 25%" in text
    assert "policy replica 1: no stats" in text
    flat = utilisation_values(out)  # what each variant's W&B summary gets
    assert flat["sweep/workers"] == 1 and flat["sweep/replicas"] == 2 and flat["sweep/env_busy_min"] == out["workers"][0]["env_busy"]
    assert flat["sweep/replica0/mean_batch_size"] == 2.0 and "sweep/replica1/busy_fraction" not in flat
    assert utilisation_values({}) == {}


def test_dry_run_prints_the_plan_and_an_estimate_from_measured_rates(tmp_path):
    from libero_eval import dry_run
    from libero_eval.sweep import plan_episodes  # loads Ray's module only, starts nothing

    c = config("model.device=cpu", "suites={libero_spatial: [0, 1]}", "trials=4", "max_steps=100",
               "policies=[{name: none}, {name: fixed_window, window: 2}]", "ray.num_workers=3")
    rates = {"machine": "2 cores", "env": {"reset_s": 4.0, "env_step_s": 0.064}, "policy_query_ms": {"tiny": 200.0},
             "round_trip_ms": 4.5, "sweep_efficiency": 0.9}
    text = dry_run.describe(c, tmp_path / "none_yet", {"CPU": 4.0, "GPU": 0.0, "cores": 2.0}, plan_episodes(c), rates)
    assert "episodes: 16 to run of 16 = 2 task(s) x 4 init state(s) x 1 repeat(s) x 2 variant(s)" in text
    assert "1 policy replica(s) x {'num_cpus': 0.5}, 3 rollout worker(s)" in text
    # 16 episodes x (4 s + 110 steps x 64 ms) env = 176.6 s + 16 x 22 queries x 0.2 s policy = 70.4 s: 247.0 CPU s
    # on 2 cores = 123.5 s; 6 rounds x 15.4 s on 3 workers = 92.6 s; 70.4 s on the replica: CPU, / 0.9 = 137 s
    assert "estimate: ~2 min of wall time" in text and "bound by CPU" in text, text
    assert "policy query 200 ms (tiny at batch 1 on CPU)" in text
    assert "no measured rates" in dry_run.describe(c, tmp_path / "x", {"CPU": 4.0}, plan_episodes(c), None)
